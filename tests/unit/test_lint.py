"""Static checks of the project's own Python: pyflakes and pycodestyle rules via ruff."""

import os
import subprocess
import sys

from launch import ROOT


def test_ruff_finds_nothing():
    ruff = os.path.join(os.path.dirname(sys.executable), "ruff")
    done = subprocess.run([ruff, "check", "horovod_tnq", "tests", "examples", "benchmarks"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
