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


def test_the_docstring_hook_flags_a_public_name_without_one(tmp_path: Path):
    import importlib.util

    import griffe

    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        '"""A package."""\n\n\ndef documented():\n    """Yes."""\n\n\ndef bare():\n    pass\n\n\n'
        'def _private():\n    pass\n\n\nclass Net:\n    """A module."""\n\n    def forward(self):\n        pass\n\n'
        "    def step(self):\n        pass\n"
    )
    loaded = griffe.load("pkg", search_paths=[str(tmp_path)])
    assert hooks._missing(loaded) == ["pkg.bare", "pkg.Net.step"]  # forward is exempt, _private is not public
