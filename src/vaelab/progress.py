"""The one progress bar of vaelab (training, evaluation, diagnostics): tqdm on stderr, quiet when stderr is a file.

On a terminal the bar redraws in place as usual. When stderr is not a terminal (a log file, a pipe, a batch job),
a carriage-return bar would fill the log with one line of thousands of redraws; there the bar writes a plain line
at most every :data:`LOG_INTERVAL_S` seconds (and at the end), with ASCII characters only.
"""

from __future__ import annotations

import math
import sys
from typing import Any, TextIO

LOG_INTERVAL_S = 30.0  # seconds between two lines of a bar whose stderr is not a terminal


class _Lines:
    """A stream for tqdm: each redraw (``"\\r" + status``) becomes one line; blank and repeated ones are dropped."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        state = text.rpartition("[")[0] or text  # without the trailing "[elapsed<left, rate]"
        if text and state != self.last:  # closing redraws the final state (at another rate): write it once
            self.stream.write(text + "\n")
            self.last = state

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, desc: str, unit: str, *, enabled: bool = True, initial: int = 0) -> Any:
    """A tqdm bar on stderr over ``total`` ``unit``s, labelled ``desc``; ``None`` when not ``enabled``.

    Under a non-terminal stderr it refreshes at most every :data:`LOG_INTERVAL_S` seconds, one line per refresh.
    """
    if not enabled:
        return None
    from tqdm import tqdm

    stream = sys.stderr
    if _is_terminal(stream):
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, dynamic_ncols=True)
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        file=_Lines(stream),
        mininterval=LOG_INTERVAL_S,
        maxinterval=math.inf,  # tqdm's monitor thread would force extra redraws: a second line right after one
        ascii=True,
        ncols=100,
    )


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False
