"""Launching real Horovod workers from tests."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = os.path.join(ROOT, "tests", "horovodrun", "workers")


def run_workers(script, num_proc, out_dir, timeout=600, extra_env=None, args=()):
    """Run tests/horovodrun/workers/<script> under horovodrun with Gloo; return each rank's
    JSON report."""
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    command = [horovodrun, "-np", str(num_proc), "-H", f"localhost:{num_proc}", "--gloo",
               sys.executable, os.path.join(WORKERS, script), str(out_dir),
               *args]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2",
               **(extra_env or {}))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"horovodrun failed ({done.returncode}):\n{done.stdout[-6000:]}\n"
                             f"{done.stderr[-6000:]}")
    reports = []
    for rank in range(num_proc):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            reports.append(json.load(f))
    return reports


def same_on_all_ranks(reports, *path):
    """The value at ``path`` in every rank's report, asserting they are all equal."""
    values = []
    for report in reports:
        for key in path:
            report = report[key]
        values.append(report)
    assert all(v == values[0] for v in values), values
    return values[0]
