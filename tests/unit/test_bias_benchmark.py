"""benchmarks/bias.py runs, and shows what the README says: no bias floor for the default
scheme, a floor for the paper's closed form on heavy tails."""

import subprocess
import sys

from launch import ROOT


def test_bias_benchmark():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bias", "--draws", "16",
         "--elements", "8192", "--bits", "2", "4", "--schemes", "tnq-rht", "tnq"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    ratios = {}
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[2].isdigit():
            ratios[(cells[0], cells[1], int(cells[2]))] = float(cells[5])
    assert len(ratios) == 8, done.stdout
    for bits in (2, 4):
        assert ratios[("student_t3", "tnq-rht", bits)] < 2.0, ratios
        assert ratios[("student_t3", "tnq", bits)] > 5.0, ratios
