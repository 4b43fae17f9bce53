"""What every tutorial chapter shares: where figures go, the quick switch, and a figure saver.

Each chapter runs as ``python docs/tutorial/NN_name.py [--out DIR] [--quick]``. Figures go next to the chapter's
markdown page unless ``--out`` (or ``$VAELAB_TUTORIAL_OUT``) names another folder; ``--quick`` (or
``$VAELAB_TUTORIAL_QUICK=1``) shrinks the settings of the chapters that have slow ones (chapter 8).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed

HERE = Path(__file__).resolve().parent


def arguments(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``--out`` and ``--quick``; create the output folder; run torch on one thread."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("VAELAB_TUTORIAL_OUT", HERE)),
                        help="folder for the figures (default: beside this script)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", default=os.environ.get("VAELAB_TUTORIAL_QUICK") == "1",
                        help="small settings (what CI runs)")  # fmt: skip
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # the chapters' models are tiny: more threads only contend on a shared machine
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def save(fig, out: Path, name: str) -> Path:
    """Save ``fig`` as ``out/name`` (PNG, 100 dpi) and close it."""
    import matplotlib.pyplot as plt

    path = out / name
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
    return path
