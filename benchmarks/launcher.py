"""Starting horovodrun and torchrun jobs on this machine: the one place that builds their command
lines, gives their workers an environment and runs them, for the benchmarks and the tests alike
(tests/launch.py adds pytest's skips on top of it).

    horovodrun_command(2, "localhost:2", ["-m", "benchmarks.digits_worker", ...],
                       disable_cache=True)
    # -> [<venv>/bin/horovodrun, -np, 2, -H, localhost:2, --gloo, --disable-cache,
    #     <python>, -m, benchmarks.digits_worker, ...]
    reports = run_ranks(command, 2, out_dir, worker_env(), timeout=600)

A worker is named by the ``program`` words after the Python interpreter: a script's path or
``-m module`` (run from the repository root), then its arguments. Workers that write a report
per rank write ``<out_dir>/rank<r>.json`` (``read_rank_reports``); the digits benchmark workers
print one line for rank 0 instead (benchmarks/jobs.py's ``read_report``).
"""

import functools
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a command run after this prefix runs in a new network namespace with only loopback, up: the
# loopback interface then carries that command's traffic and nothing else
PRIVATE_NETWORK = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


def venv_executable(name):
    """``name`` (horovodrun, torchrun) beside this process's Python interpreter."""
    return os.path.join(os.path.dirname(sys.executable), name)


def horovodrun_command(num_proc, hosts, program, controller="gloo", disable_cache=False,
                       extra=(), private_network=False):
    """``horovodrun -np num_proc -H hosts --<controller> [--disable-cache] *extra`` running
    this Python on ``program`` (a script's path or "-m", a module; then its arguments).
    ``hosts``: horovodrun's -H ("host:slots,..."), None for "localhost:<num_proc>";
    ``controller``: "gloo" or "mpi"; ``extra``: further horovodrun options (elastic ones, say);
    ``private_network``: prefixed with PRIVATE_NETWORK, so the job has a network namespace of
    its own."""
    hosts = f"localhost:{num_proc}" if hosts is None else hosts
    return [*(PRIVATE_NETWORK if private_network else []),
            venv_executable("horovodrun"), "-np", str(num_proc), "-H", hosts, f"--{controller}",
            *(["--disable-cache"] if disable_cache else []), *extra, sys.executable, *program]


def torchrun_command(worker, worker_args, nproc=1, nodes=1, node_rank=0, master=None,
                     module=True):
    """torchrun running ``worker`` (a module, or with ``module=False`` a script's path):
    ``nproc`` processes here, and with ``master`` = (address, port) node ``node_rank`` of
    ``nodes`` (static rendezvous at the master, as a multi-node user starts it on every node);
    without it a standalone job on this host (its rendezvous store on a free port)."""
    if master is None:
        where = ["--standalone"]
    else:
        where = ["--nnodes", str(nodes), "--node-rank", str(node_rank),
                 "--master-addr", master[0], "--master-port", str(master[1])]
    return [venv_executable("torchrun"), *where, "--nproc-per-node", str(nproc),
            *(["-m"] if module else []), worker, *worker_args]


def worker_env(extra=None, tf_log_level="3", controller="gloo"):
    """The workers' environment: this one, with the repository root as PYTHONPATH (so workers
    import this checkout's horovod_tnq and benchmarks), one OpenMP thread, TensorFlow's C++ log
    at ``tf_log_level``, then ``extra``. Under MPI (``controller="mpi"``) idle ranks yield
    instead of busy-polling, unless ``extra`` or the environment says otherwise."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1",
               TF_CPP_MIN_LOG_LEVEL=tf_log_level, **(extra or {}))
    if controller == "mpi":
        # OpenMPI ranks busy-poll while they wait in a collective; with more ranks than cores
        # (CI has 2) that spinning takes the CPU the other ranks need: torch_train.py at 2
        # ranks took 90 s instead of 40 s on a loaded 2-core machine. Yielding when idle fixes it.
        env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    return env


def wait_for_launchers(processes, timeout=None, linger=60.0):
    """Wait for launchers started together, one per node (torchrun, as a multi-node job starts
    one on every node). Returns early when one fails (its peers would wait for it in a
    collective until their timeout: the caller ends them); raises TimeoutExpired when any is
    still running after ``timeout`` seconds. Once one has ended successfully the others get
    ``linger`` seconds to end; returns the indices of those still running then, which the
    caller ends and may count as successful: their job is done (its ranks finish together),
    but torchrun's agent that holds the rendezvous store sometimes waits out its exit barrier
    (300 s, not settable from torchrun's command line) after the other agents have left
    (pytorch/pytorch issue 69520; seen here in about 1 of 7 two-node jobs)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while None in [process.poll() for process in processes]:  # (poll every one)
        if any(process.returncode for process in processes):
            return set()
        if deadline is not None and time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(processes[0].args, timeout)
        if any(process.returncode == 0 for process in processes):
            until = time.monotonic() + linger
            while time.monotonic() < until and \
                    any(process.poll() is None for process in processes):
                time.sleep(0.1)
            return {index for index, process in enumerate(processes) if process.poll() is None}
        time.sleep(0.1)
    return set()


def run(command, env, timeout=None):
    """``command`` run from the repository root, its output captured (text); the finished
    process, whatever its exit status."""
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def failure(done, what="horovodrun", tail=6000):
    """A message for a job that exited non-zero: its status and the ends of its output."""
    return (f"{what} failed ({done.returncode}):\n{done.stdout[-tail:]}\n"
            f"{done.stderr[-tail:]}")


def read_rank_reports(out_dir, num_proc):
    """Each rank's JSON report, ``<out_dir>/rank<r>.json``, in rank order."""
    reports = []
    for rank in range(num_proc):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            reports.append(json.load(f))
    return reports


def run_ranks(command, num_proc, out_dir, env, timeout=None, error=RuntimeError,
              what="horovodrun"):
    """Run ``command`` (its workers write one report per rank into ``out_dir``) and return the
    reports in rank order; ``error`` (the exception class) with ``failure``'s message where the
    job exits non-zero."""
    done = run(command, env, timeout)
    if done.returncode != 0:
        raise error(failure(done, what))
    return read_rank_reports(out_dir, num_proc)


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
