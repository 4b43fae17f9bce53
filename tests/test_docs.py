"""The documentation site builds in strict mode: no broken link or cross-reference, no docstring that fails to parse,
no public name on the API reference's pages without a docstring (scripts/docs_hooks.py), zero warnings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_site_builds_strictly_with_zero_warnings(tmp_path: Path):
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{log[-5000:]}"
    warnings = [line for line in log.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert not warnings, "\n".join(warnings)
    for page in ("index.html", "tutorial/index.html", "reference/estimators/index.html", "theory/index.html"):
        assert (site / page).is_file(), f"{page} was not built"
    # the reference really holds the generated API (not an empty page): a public function's signature and docstring
    estimators = (site / "reference/estimators/index.html").read_text()
    assert "log_marginal" in estimators and "importance sampling" in estimators
