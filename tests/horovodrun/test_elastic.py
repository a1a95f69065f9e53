"""Elastic Horovod with TNQ, with the compressor's or the fused optimizer's reset() registered
as the elastic state's reset callback: a job whose hosts shrink from 2 workers to 1 and grow
back to 2 (a new process joining with fresh state), and a job one of whose workers is killed
and replaced, finish in step and average over the world they have at each step. (Without the
callback the grown job waits forever: the survivor's collective names and the checks of the
fused optimizer no longer pair with the newcomer's.)"""

import json
import os
import socket
import subprocess
import sys

import pytest
from launch import ROOT, WORKERS


def run_elastic(mode, event, tmp_path, steps=20):
    hosts, out = tmp_path / "hosts", tmp_path / "out"
    out.mkdir()
    # a killed worker's host is blacklisted for a while: two names of this machine, one slot
    # each, so the survivor keeps its host and the replacement comes back on the other
    hosts.write_text("localhost:2\n" if event == "resize" else
                     f"localhost:1\n{socket.gethostname()}:1\n")
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discover.chmod(0o755)
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    command = [horovodrun, "-np", "2", "--min-np", "1", "--max-np", "2",
               "--network-interfaces", "lo", "--blacklist-cooldown-range", "1", "2",
               "--host-discovery-script", str(discover), "--gloo",
               sys.executable, os.path.join(WORKERS, "elastic_train.py"), str(out), mode,
               str(hosts), str(steps), event]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("event", ["resize", "kill"])
@pytest.mark.parametrize("mode", ["stock", "fused"])
def test_a_job_that_loses_and_regains_a_worker_trains_in_step(mode, event, tmp_path):
    first, second = run_elastic(mode, event, tmp_path)
    assert first["size"] == second["size"] == 2 and first["steps"] == second["steps"] == 20
    assert first["sizes_seen"] == [1, 2]  # rank 0 ran through the shrink; rank 1 is the newcomer
    assert first["digest"] == second["digest"]
    assert first["solo_ratios"] and all(abs(r - 1) < 0.05 for r in first["solo_ratios"])
    assert abs(first["last_ratio"] - 1) < 0.05 and abs(second["last_ratio"] - 1) < 0.05
