"""The progress bar: a normal tqdm bar on a terminal, a few plain lines (no carriage returns) in a log file."""

from __future__ import annotations

import io
import sys

import pytest

from vaelab import progress
from vaelab.progress import LOG_INTERVAL_S, progress_bar


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_into_a_log_file_writes_a_few_plain_lines(monkeypatch):
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", log)
    bar = progress_bar(10_000, "phase one", "example")
    for _ in range(10_000):  # far faster than LOG_INTERVAL_S: only the first and the final state are written
        bar.update(1)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 1 <= len(lines) <= 3, lines
    assert lines[-1].startswith("phase one: 100%") and "10000/10000" in lines[-1]
    assert LOG_INTERVAL_S >= 10


def test_a_logged_bar_writes_each_state_once(monkeypatch):
    # with no minimum interval every update is a line; closing redraws the final state, which must not repeat
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    bar = progress_bar(5, "phase", "step")
    for _ in range(5):
        bar.update(1)
    bar.close()
    counts = [line.split("|")[-1].split()[0] for line in log.getvalue().splitlines()]
    assert counts == [f"{i}/5" for i in range(6)]


def test_a_bar_on_a_terminal_redraws_in_place(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = progress_bar(3, "phase two", "step")
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert "\r" in terminal.getvalue() and "phase two" in terminal.getvalue()


@pytest.mark.parametrize("initial", [0, 5])
def test_a_disabled_bar_is_none_and_initial_counts(monkeypatch, initial):
    assert progress_bar(10, "off", "step", enabled=False) is None
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    bar = progress_bar(10, "resumed", "step", initial=initial)
    bar.close()
    assert f"{initial}/10" in log.getvalue()
