"""benchmarks/launcher.py, the one launch of the tests and the benchmarks: the command lines each
caller had built itself, the workers' environment, and the reports read back."""

import json
import os
import sys

import pytest
from launch import WORKERS, run_workers

from benchmarks import jobs, launcher, rank_averaging

HOROVODRUN = os.path.join(os.path.dirname(sys.executable), "horovodrun")


def test_the_benchmarks_command_line_is_the_one_they_always_ran():
    assert jobs.horovodrun_command(4, "h0:2,h1:2", ["--steps", "1"], extra=["--verbose"]) == [
        HOROVODRUN, "-np", "4", "-H", "h0:2,h1:2", "--gloo", "--disable-cache", "--verbose",
        sys.executable, "-m", "benchmarks.digits_worker", "--steps", "1"]


def test_the_tests_command_line_with_mpi_and_a_private_network():
    command = launcher.horovodrun_command(2, None, ["worker.py", "out"], controller="mpi",
                                          private_network=True)
    assert command == [*launcher.PRIVATE_NETWORK, HOROVODRUN, "-np", "2", "-H", "localhost:2",
                       "--mpi", sys.executable, "worker.py", "out"]


def test_worker_env_puts_this_checkout_first_and_lets_mpi_ranks_yield(monkeypatch):
    monkeypatch.delenv("OMPI_MCA_mpi_yield_when_idle", raising=False)
    env = launcher.worker_env({"EXTRA": "1"}, tf_log_level="2", controller="mpi")
    assert env["PYTHONPATH"] == launcher.ROOT and env["OMP_NUM_THREADS"] == "1"
    assert env["TF_CPP_MIN_LOG_LEVEL"] == "2" and env["EXTRA"] == "1"
    assert env["OMPI_MCA_mpi_yield_when_idle"] == "1"
    assert "OMPI_MCA_mpi_yield_when_idle" not in launcher.worker_env()
    assert launcher.worker_env()["TF_CPP_MIN_LOG_LEVEL"] == "3"  # the benchmarks' default
    assert launcher.worker_env({"OMPI_MCA_mpi_yield_when_idle": "0"}, controller="mpi")[
        "OMPI_MCA_mpi_yield_when_idle"] == "0"


def test_run_ranks_reads_each_ranks_report_and_names_a_failure(tmp_path):
    write = ("import json, sys\nfor rank in range(2):\n"
             "    json.dump({'rank': rank}, open(f'{sys.argv[1]}/rank{rank}.json', 'w'))")
    reports = launcher.run_ranks([sys.executable, "-c", write, str(tmp_path)], 2, tmp_path,
                                 launcher.worker_env())
    assert reports == [{"rank": 0}, {"rank": 1}]
    with pytest.raises(AssertionError, match=r"(?s)job failed \(3\):.*to stderr"):
        launcher.run_ranks([sys.executable, "-c", "import sys; print('to stderr', "
                            "file=sys.stderr); sys.exit(3)"], 1, tmp_path,
                           launcher.worker_env(), error=AssertionError, what="job")


def test_the_callers_launch_through_it(monkeypatch, tmp_path):
    """tests/launch.run_workers and rank_averaging.launch hand their command lines to
    launcher.run_ranks: what each asks for is what the launcher runs."""
    seen = []

    def fake_run_ranks(command, num_proc, out_dir, env, timeout=None, **kwargs):
        seen.append((command, env))
        return [json.loads("{}")] * num_proc

    monkeypatch.setattr(launcher, "run_ranks", fake_run_ranks)
    monkeypatch.setattr("launch.run_ranks", fake_run_ranks)
    assert rank_averaging.launch(3, tmp_path, ["--bits", "2"]) == [{}] * 3
    assert run_workers("torch_train.py", 2, tmp_path, args=("x",)) == [{}] * 2
    (averaging, averaging_env), (test, test_env) = seen
    assert averaging == [HOROVODRUN, "-np", "3", "-H", "localhost:3", "--gloo",
                         "--disable-cache", sys.executable, "-m",
                         "benchmarks.rank_averaging_worker", str(tmp_path), "--bits", "2"]
    assert test == [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable,
                    os.path.join(WORKERS, "torch_train.py"), str(tmp_path), "x"]
    assert averaging_env["TF_CPP_MIN_LOG_LEVEL"] == "3" and test_env["TF_CPP_MIN_LOG_LEVEL"] == "2"


def test_torchrun_runs_a_module_or_a_script():
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    assert launcher.torchrun_command("benchmarks.digits_worker_ddp", ["--steps", "1"],
                                     nproc=2) == [
        torchrun, "--standalone", "--nproc-per-node", "2", "-m", "benchmarks.digits_worker_ddp",
        "--steps", "1"]
    assert launcher.torchrun_command("w.py", ["out"], nproc=2, nodes=2, node_rank=1,
                                     master=("127.0.0.1", 29500), module=False) == [
        torchrun, "--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1",
        "--master-port", "29500", "--nproc-per-node", "2", "w.py", "out"]
