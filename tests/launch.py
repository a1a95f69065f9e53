"""Launching real Horovod workers from tests: benchmarks/launcher.py's launch (the one the
benchmarks use too), with pytest's skips where this environment cannot run a job."""

import os

import pytest

from benchmarks.launcher import (  # noqa: F401  (ROOT and the rest: for the tests)
    PRIVATE_NETWORK, ROOT, horovodrun_command, mpi_unavailable, private_network_unavailable,
    read_rank_reports, run, run_ranks, torchrun_command, venv_executable, wait_for_launchers,
    worker_env)

WORKERS = os.path.join(ROOT, "tests", "horovodrun", "workers")


def worker_runs(*runs):
    """pytest params for a fixture that launches workers: (controller, num_proc) pairs, with ids
    np2 for Gloo (the ids the tests had before MPI), mpi-np2 for MPI."""
    return [pytest.param((controller, num_proc), id=f"np{num_proc}" if controller == "gloo"
                         else f"{controller}-np{num_proc}")
            for controller, num_proc in runs]


def run_workers(script, num_proc, out_dir, timeout=600, extra_env=None, args=(),
                controller="gloo", private_network=False):
    """Run tests/horovodrun/workers/<script> under horovodrun with the given controller ("gloo"
    or "mpi": `horovodrun --mpi`, skipping the calling test with the reason when this
    environment has no MPI); return each rank's JSON report. ``private_network``: the job runs
    in a network namespace of its own (PRIVATE_NETWORK; the test skips where it cannot)."""
    if controller == "mpi" and mpi_unavailable():
        pytest.skip(f"MPI: {mpi_unavailable()}")
    if private_network and private_network_unavailable():
        pytest.skip(f"private network: {private_network_unavailable()}")
    command = horovodrun_command(num_proc, None, [os.path.join(WORKERS, script), str(out_dir),
                                                  *args],
                                 controller=controller, private_network=private_network)
    env = worker_env(extra_env, tf_log_level="2", controller=controller)
    return run_ranks(command, num_proc, out_dir, env, timeout, error=AssertionError)


def same_on_all_ranks(reports, *path):
    """The value at ``path`` in every rank's report, asserting they are all equal."""
    values = []
    for report in reports:
        for key in path:
            report = report[key]
        values.append(report)
    assert all(v == values[0] for v in values), values
    return values[0]
