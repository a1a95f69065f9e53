"""Launching real Horovod workers from tests."""

import functools
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = os.path.join(ROOT, "tests", "horovodrun", "workers")


@functools.cache
def mpi_unavailable():
    """Why this environment cannot run workers over MPI, or None when it can: mpirun must be on
    the path and this venv's Horovod built with MPI (scripts/install.sh builds it so when mpirun
    and mpicxx were present at build time; .ci/run installs OpenMPI first)."""
    if shutil.which("mpirun") is None:
        return ("no mpirun on the path: install OpenMPI (apt-get install openmpi-bin "
                "libopenmpi-dev, as .ci/run does) and rebuild Horovod (bash scripts/install.sh)")
    # what horovod.common.util.mpi_built() asks, of the PyTorch extension only: one build makes
    # both frameworks' extensions, and this skips importing TensorFlow (seconds)
    done = subprocess.run([sys.executable, "-c", "import horovod.torch as hvd; "
                           "print(bool(hvd.mpi_built()))"],
                          capture_output=True, text=True, timeout=300)
    if done.stdout.strip().splitlines()[-1:] != ["True"]:
        return (f"Horovod in {sys.prefix} was built without MPI (mpirun or mpicxx was missing "
                "when scripts/install.sh built it): rebuild it with bash scripts/install.sh")
    return None


# a command run after this prefix runs in a new network namespace with only loopback, up: the
# loopback interface then carries that command's traffic and nothing else
PRIVATE_NETWORK = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


@functools.cache
def private_network_unavailable():
    """Why this environment cannot run a command in a private network namespace (unshare -n
    needs root or user namespaces), or None when it can."""
    try:
        done = subprocess.run(PRIVATE_NETWORK + ["true"], capture_output=True, text=True,
                              timeout=60)
    except OSError as exc:
        return f"cannot run unshare: {exc}"
    if done.returncode != 0:
        return f"unshare --net failed (needs root or user namespaces): {done.stderr.strip()}"
    return None


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
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    command = [*(PRIVATE_NETWORK if private_network else []),
               horovodrun, "-np", str(num_proc), "-H", f"localhost:{num_proc}", f"--{controller}",
               sys.executable, os.path.join(WORKERS, script), str(out_dir),
               *args]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2",
               **(extra_env or {}))
    if controller == "mpi":
        # OpenMPI ranks busy-poll while they wait in a collective; with more ranks than cores
        # (CI has 2) that spinning takes the CPU the other ranks need: torch_train.py at 2
        # ranks took 90 s instead of 40 s on a loaded 2-core machine. Yielding when idle fixes it.
        env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
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
