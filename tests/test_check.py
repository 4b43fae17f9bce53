"""`vaelab check` end to end, as a real process, and its verdict rule."""

from __future__ import annotations

import json
import subprocess
import sys

from vaelab.check import MODELS, _verdict


def test_vaelab_check_passes_and_writes_json(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, "-m", "vaelab", "check", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "check passed" in proc.stdout
    report = json.loads(out.read_text())
    assert len(report["rows"]) == 3 * len(MODELS) and report["problems"] == []
    for row in report["rows"]:
        # the exact posterior as q: tight bound, exact IS estimate
        if row["proposal"] == "exact posterior":
            assert abs(row["elbo"]["joint"]["value"] - row["log_px"]) < 1e-9
            assert row["importance"]["verdict"] == "ok"
    # the naive estimator fails on the 50-dimensional model, and says so
    big = [r for r in report["rows"] if r["model"].startswith("pPCA D=50")]
    assert all(r["naive"]["verdict"] == "flagged" and r["naive"]["value"] < r["log_px"] - 10 for r in big)


def test_verdict_rule():
    assert _verdict(1.0, 1.01, 0.01) == "ok"
    assert _verdict(1.0, 1.1, 0.01) == "FAIL"
    assert _verdict(1.0, 1.1, 0.01, pareto_k=0.9) == "flagged"
    assert _verdict(1.0, 1.0, 0.01, pareto_k=0.9) == "flagged"  # an unreliable estimate is never 'ok'


def test_cli_usage_errors_exit_nonzero():
    proc = subprocess.run([sys.executable, "-m", "vaelab", "check", "--seed", "x"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid int value" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "vaelab"], capture_output=True, text=True)
    assert proc.returncode == 2
