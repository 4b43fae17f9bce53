"""Every tutorial chapter (docs/tutorial/NN_name.py) runs, small and seeded, and its stated claim still holds.

The claims are asserted inside the chapters themselves; here each one runs in a subprocess with ``--quick`` and a
temporary output folder, and must exit 0 and write its figures. Chapter 8 needs MNIST or Fashion-MNIST (found as
vaelab.data finds them) and is skipped, saying so, when neither is present.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "tutorial"
CHAPTERS = sorted(TUTORIAL.glob("[0-9][0-9]_*.py"))
FIGURE = re.compile(r"!\[[^\]]*\]\(([^)]+\.png)\)")


def _has_mnist_like_data() -> bool:
    from vaelab.data import DataError, find_dataset

    beside = ROOT.parent / "shared" / "data"
    for name in ("mnist", "fashion-mnist"):
        try:
            find_dataset(name, data_dir=beside if beside.is_dir() else None)
            return True
        except DataError:
            continue
    return False


def test_every_chapter_has_a_page_listed_in_the_index():
    assert len(CHAPTERS) == 8, [c.name for c in CHAPTERS]
    index = (TUTORIAL / "index.md").read_text()
    for chapter in CHAPTERS:
        page = chapter.with_suffix(".md")
        assert page.is_file(), f"{chapter.name} has no page {page.name}"
        assert f"({page.name})" in index, f"index.md does not link {page.name}"
        for figure in FIGURE.findall(page.read_text()):
            assert (TUTORIAL / figure).is_file(), f"{page.name} embeds {figure}, which is not committed"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_runs_and_its_claim_holds(chapter: Path, tmp_path: Path):
    if chapter.stem.startswith("08") and not _has_mnist_like_data():
        pytest.skip("neither MNIST nor Fashion-MNIST found (vaelab.data's search order)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    env.update(VAELAB_TUTORIAL_QUICK="1", MPLBACKEND="Agg", PYTHONWARNINGS="error")
    done = subprocess.run(
        [sys.executable, str(chapter), "--out", str(tmp_path), "--quick"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, f"{chapter.name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    expected = set(FIGURE.findall(chapter.with_suffix(".md").read_text()))
    written = {p.name for p in tmp_path.glob("*.png")}
    assert expected, f"{chapter.with_suffix('.md').name} embeds no figure"
    assert expected <= written, f"{chapter.name} did not write {sorted(expected - written)}"
