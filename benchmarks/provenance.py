"""Where a benchmark run comes from: the repository, its commit, the interpreter, the default data folder; and
:func:`vaelab`, the one way a benchmark runs the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_DATA_DIR = os.environ.get("VAELAB_DATA_DIR") or str(REPO.parent / "shared" / "data")


def vaelab_commit() -> str | None:
    """The repository's HEAD commit (with "+dirty" when tracked files differ from it), or None without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def command_python() -> str:
    """This interpreter as a path relative to the repository when it is inside it (e.g. benchmarks/.venv-peers)."""
    path = Path(sys.executable)
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def command_line(script: str, argv: list[str] | None) -> str:
    """How a run was started, for its results: the interpreter (:func:`command_python`), the script, its arguments."""
    return " ".join([command_python(), f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])


def write_results(path: Path, results: dict) -> None:
    """``results`` as indented JSON at ``path``, its folder created if needed; written whole or not at all (a
    temporary file renamed over it), so that a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(results, indent=2))
    os.replace(partial, path)


def vaelab(*args) -> float:
    """``python -m vaelab ARGS``, its output shown as it comes; returns the wall time in seconds, exits on failure.

    Ctrl-C reaches the command too (one process group): it is waited for, so that a training run saves its checkpoint
    and stops cleanly (``subprocess.run`` would kill it 0.25 s after the interrupt), and then this exits too."""
    start = time.perf_counter()
    interrupted = False
    with subprocess.Popen([sys.executable, "-m", "vaelab", *map(str, args)]) as proc:
        while proc.returncode is None:
            try:
                proc.wait()
            except KeyboardInterrupt:
                interrupted = True
    if proc.returncode or interrupted:
        sys.exit(f"vaelab {' '.join(map(str, args))} stopped with exit code {proc.returncode}")
    return time.perf_counter() - start
