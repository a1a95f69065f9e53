"""Elastic Horovod with TNQ, with the compressor's or the fused optimizer's reset() registered
as the elastic state's reset callback: a job whose hosts shrink from 2 workers to 1 and grow
back to 2 (a new process joining with fresh state), and a job one of whose workers is killed
and replaced, finish in step and average over the world they have at each step. (Without the
callback the grown job waits forever: the survivor's collective names and the checks of the
fused optimizer no longer pair with the newcomer's.)

TensorFlow (elastic_train_tf.py): hvd.DistributedGradientTape in a tf.function with
hvd.elastic.TensorFlowKerasState, whose reset callbacks are compressor.reset and a new
tf.function for the step (a graph keeps the world it was traced in). Besides 2 -> 1 -> 2 and the
killed worker, a job shrinks from 3 workers to 2 and grows back: with one worker left Horovod's
tape skips the allreduce, compressor included, while 2 ranks do compress (in an allgather,
where 3 ranks send the larger tensor in a reduce-scatter)."""

import json
import os
import socket
import sys

import pytest
from launch import WORKERS, run, venv_executable, worker_env


def run_elastic(mode, event, tmp_path, steps=20, workers=2, extra_env=None, check=True):
    """Run an elastic job of ``workers`` workers at most and one fewer at least; ``mode``:
    "stock" or "fused" (PyTorch, elastic_train.py) or "tf" (elastic_train_tf.py). ``check``:
    assert it succeeded and return each rank's report, else return the finished process."""
    hosts, out = tmp_path / "hosts", tmp_path / "out"
    out.mkdir()
    # a killed worker's host is blacklisted for a while: two names of this machine, one slot
    # each, so the survivor keeps its host and the replacement comes back on the other
    if mode == "hierarchical":  # two emulated hosts of workers / 2 ranks each
        hosts.write_text(f"localhost:{workers // 2}\n127.0.0.1:{workers // 2}\n")
    else:
        hosts.write_text(f"localhost:{workers}\n" if event == "resize" else
                         f"localhost:1\n{socket.gethostname()}:1\n")
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discover.chmod(0o755)
    horovodrun = venv_executable("horovodrun")
    worker = ([os.path.join(WORKERS, "elastic_train_tf.py"), str(out), str(hosts), str(steps),
               event, str(workers)] if mode == "tf" else
              [os.path.join(WORKERS, "elastic_train.py"), str(out), mode, str(hosts), str(steps),
               event])
    command = [horovodrun, "-np", str(workers), "--min-np", str(workers - 1),
               "--max-np", str(workers), "--network-interfaces", "lo",
               "--blacklist-cooldown-range", "1", "2",
               "--host-discovery-script", str(discover), "--gloo", sys.executable, *worker]
    # (elastic: no -H, so not launcher.horovodrun_command's line; its environment and run)
    # 22-67 s measured at load 6-8 on 2 cores; CI at load 15-20 is slower still. The workers
    # wait for each change of the world at a known step (workers/elastic_hosts.py), 2 min at most
    done = run(command, worker_env(extra_env), timeout=360)
    if not check:
        return done
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(workers)]


@pytest.mark.parametrize("event", ["resize", "kill"])
@pytest.mark.parametrize("mode", ["stock", "fused"])
def test_a_job_that_loses_and_regains_a_worker_trains_in_step(mode, event, tmp_path):
    first, second = run_elastic(mode, event, tmp_path)
    assert first["size"] == second["size"] == 2 and first["steps"] == second["steps"] == 20
    assert first["sizes_seen"] == [1, 2]  # rank 0 ran through the shrink; rank 1 is the newcomer
    assert first["digest"] == second["digest"]
    assert first["solo_ratios"] and all(abs(r - 1) < 0.05 for r in first["solo_ratios"])
    assert abs(first["last_ratio"] - 1) < 0.05 and abs(second["last_ratio"] - 1) < 0.05


@pytest.mark.parametrize("event, workers", [("resize", 2), ("resize", 3), ("kill", 2)],
                         ids=["resize-np2", "resize-np3", "kill-np2"])
def test_a_tensorflow_job_that_loses_and_regains_a_worker_trains_in_step(event, workers,
                                                                          tmp_path):
    reports = run_elastic("tf", event, tmp_path, workers=workers)
    first = reports[0]
    assert all(r["size"] == workers and r["steps"] == 20 for r in reports)
    assert first["sizes_seen"] == [workers - 1, workers]  # rank 0 ran through the shrink
    assert len({r["digest"] for r in reports}) == 1
    # the shrunk world averaged over itself: every rank had the same data there
    assert first["shrunk_ratios"] and all(abs(ratio - 1) < 0.05 for r in reports
                                          for ratio in r["shrunk_ratios"])
    assert all(abs(r["last_ratio"] - 1) < 0.05 for r in reports)
    # every rank's compressor started afresh at the same step, the survivors' after the event,
    # and every process traced its step once each time it (re)started
    fresh = first["fresh_since"]
    assert fresh > 3 and all(r["fresh_since"] == fresh for r in reports)
    assert first["compressor_steps"] and all(
        r["compressor_steps"] == {name: 20 - fresh for name in first["compressor_steps"]}
        for r in reports)
    assert first["entries"] == 3 and all(r["traces"] == r["entries"] for r in reports)


def test_a_tensorflow_graph_traced_before_the_reset_fails_instead_of_hanging(tmp_path):
    """Without a new tf.function after the reset, the survivor's old graph (old world size,
    old exchanges) would wait forever for the newcomer, which traces and checks settings
    anew: it refuses to run, before its collectives."""
    done = run_elastic("tf", "resize", tmp_path, extra_env={"RETRACE": "0"}, check=False)
    assert done.returncode != 0
    assert "traced before the compressor's reset()" in done.stdout + done.stderr


def test_the_hierarchical_exchange_survives_a_host_that_loses_and_regains_a_rank(tmp_path):
    """2 emulated hosts x 2 ranks shrink to 2 + 1 and grow back: the compressor's reset drops
    the process sets; the job of unequal hosts runs the flat exchange (every rank decides so
    from Horovod's is_homogeneous(), none waits in a gather); back at 2 x 2 the sets are
    registered anew, the newcomer's included, and the hierarchical exchange runs again."""
    reports = run_elastic("hierarchical", "resize", tmp_path, workers=4)
    assert all(r["size"] == 4 and r["steps"] == 20 for r in reports)
    assert reports[0]["sizes_seen"] == [3, 4]  # rank 0 ran through the shrink
    assert reports[0]["hierarchical_at"] == [4]  # not with hosts of 2 and 1 ranks
    assert all(r["hierarchical_at"] == [4] for r in reports)
    assert len({r["digest"] for r in reports}) == 1
