"""benchmarks/bandwidth.py's hosts of several ranks (--ranks-per-host) and the report of which
exchange TNQ ran, without running a job (tests/horovodrun/test_training_benchmarks.py runs one).
"""

import subprocess
import sys

import pytest

from benchmarks import bandwidth
from benchmarks.emulated_network import EmulatedNetwork
from benchmarks.jobs import REPORT_EXTRA_MARKER, REPORT_MARKER, read_report, torchrun_command


def test_layouts_are_every_worker_count_by_every_ranks_per_host():
    assert bandwidth.layouts([2, 4], [1]) == [(2, 1), (4, 1)]  # the default: a rank a host
    assert bandwidth.layouts([4], [2, 1]) == [(4, 2), (4, 1)]  # in the order given
    with pytest.raises(ValueError, match="whole number of hosts"):
        bandwidth.layouts([2, 3], [2])
    with pytest.raises(ValueError, match="whole number of hosts"):
        bandwidth.layouts([4], [0])


def test_parse_args_refuses_workers_that_do_not_fill_hosts(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bandwidth", "--workers", "4", "--ranks-per-host", "2",
                                      "1"])
    assert bandwidth.parse_args().layouts == [(4, 2), (4, 1)]
    monkeypatch.setattr(sys, "argv", ["bandwidth", "--workers", "3", "--ranks-per-host", "2"])
    with pytest.raises(SystemExit):
        bandwidth.parse_args()
    assert "--ranks-per-host 2" in capsys.readouterr().err


def test_horovodrun_hosts_and_torchrun_nodes_of_a_layout():
    network = EmulatedNetwork(4)  # not set up: names only
    assert network.hosts_argument(4) == "host0:1,host1:1,host2:1,host3:1"
    assert network.hosts_argument(4, 2) == "host0:2,host1:2"
    assert network.hosts_argument(2, 2) == "host0:2"
    with pytest.raises(ValueError, match="do not fill"):
        network.hosts_argument(3, 2)
    with pytest.raises(ValueError, match="need 5 hosts"):
        network.hosts_argument(5)
    command = torchrun_command("benchmarks.digits_worker_ddp", ["--steps", "1"], nproc=2,
                               nodes=2, node_rank=1, master=("198.18.0.1", 29500))
    text = " ".join(command)
    assert "--nnodes 2 --node-rank 1" in text and "--nproc-per-node 2" in text


def row(workers, per_host, label, samples, framework="torch", **extra):
    return dict(workers=workers, ranks_per_host=per_host, framework=framework, label=label,
                samples_per_s=samples, **extra)


def test_ratios_and_medians_are_per_layout():
    runs = [row(4, 2, "none", 100.0), row(4, 2, "tnq", 300.0), row(4, 1, "none", 200.0),
            row(4, 1, "tnq", 400.0), row(4, 2, "tnq", 250.0), row(4, 2, "tnq", 350.0)]
    rows = bandwidth.median_runs(runs)
    assert len(rows) == 4
    bandwidth.add_ratios(rows)
    ratios = {(r["ranks_per_host"], r["label"]): r["vs_none"] for r in rows}
    # 2 hosts x 2 ranks against their own uncompressed run, 4 hosts x 1 against theirs
    assert ratios == {(2, "none"): 1.0, (2, "tnq"): 3.0, (1, "none"): 1.0, (1, "tnq"): 2.0}
    assert next(r for r in rows if r["ranks_per_host"] == 2 and r["label"] == "tnq")[
        "samples_per_s_all"] == "250.0 300.0 350.0"


def test_table_shows_ranks_per_host_and_exchanges_only_for_hosts_of_several_ranks():
    assert bandwidth.columns_for([row(2, 1, "none", 1.0)]) is bandwidth.COLUMNS
    headers = [header for header, _, _ in bandwidth.columns_for([row(4, 2, "none", 1.0)])]
    assert headers[:3] == ["workers", "ranks/host", "framework"]
    assert headers[-1] == "exchanges/step"
    assert bandwidth.exchanges_text(None) is None  # not TNQ: an empty cell
    assert bandwidth.exchanges_text({"allgather": 0.0, "reduce-scatter": 0.0,
                                     "hierarchical": 3.0}) == "hierarchical 3"
    assert bandwidth.exchanges_text({"allgather": 1.0, "hierarchical": 2.0}) == \
        "allgather 1, hierarchical 2"
    assert bandwidth.exchanges_text({"allgather": 0.0}) == "-"  # TNQ, nothing compressed
    assert bandwidth.layout_text(4, 2) == "2 hosts x 2 ranks"
    assert bandwidth.layout_text(4, 1) == "4 workers"


def test_read_report_adds_the_workers_extra_keys():
    stdout = "\n".join(["[1,0]<stdout>:noise", f"[1,0]<stdout>:{REPORT_MARKER}" + '{"a": 1}',
                        f"[1,0]<stdout>:{REPORT_EXTRA_MARKER}" +
                        '{"exchanges_per_step": {"hierarchical": 3.0}}'])
    done = subprocess.CompletedProcess([], 0, stdout, "")
    assert read_report(done, "job") == {"a": 1, "exchanges_per_step": {"hierarchical": 3.0}}
    only = subprocess.CompletedProcess([], 0, REPORT_MARKER + '{"a": 1}\n', "")
    assert read_report(only, "job") == {"a": 1}
    with pytest.raises(RuntimeError, match="no report"):
        read_report(subprocess.CompletedProcess([], 1, REPORT_EXTRA_MARKER + "{}\n", ""), "job")


class _LocalHosts(EmulatedNetwork):
    """EmulatedNetwork.run_on_hosts on this machine: no namespaces, each "host" a process."""

    def __init__(self):  # (no namespaces to make)
        self.hosts = []

    def exec_prefix(self, host):
        return []


def test_run_on_hosts_ends_a_launcher_that_lingers_after_its_peer_succeeded():
    # torchrun's agent on the first host may wait out its 300 s exit barrier after the job is
    # done: once a host succeeded, the others get `linger` seconds, then count as succeeded
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    done = [sys.executable, "-c", "print('report')"]
    first, second = _LocalHosts().run_on_hosts([sleeper, done], {}, timeout=120, linger=1.0)
    assert (first.returncode, second.returncode, second.stdout) == (0, 0, "report\n")
    # a failure is not hidden: the failed host's code stays, the other is ended
    failed = [sys.executable, "-c", "raise SystemExit(3)"]
    first, second = _LocalHosts().run_on_hosts([sleeper, failed], {}, timeout=120, linger=1.0)
    assert second.returncode == 3 and first.returncode != 0
