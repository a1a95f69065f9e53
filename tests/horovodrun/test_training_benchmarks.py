"""The training benchmarks' harness and a 2-step run of each benchmark.

These need root for network namespaces and tc, as the project's machines and CI give. Without
them they fail with the harness's error rather than skip: a skipped test would hide that the
bandwidth benchmark cannot run here.
"""

import ast
import csv
import math
import os
import subprocess
import sys

import pytest

from launch import ROOT

from benchmarks.bandwidth import split_framework
from benchmarks.emulated_network import ETC_NETNS, EmulatedNetwork, namespace_names
from benchmarks.jobs import parse_spec
from benchmarks.netns_ssh import split_ssh_arguments
from benchmarks.worker_common import compressor_spec


def ours(names):
    return [name for name in names if name.startswith(f"tnqbench-{os.getpid()}-")]


def test_shaped_link_is_capped_at_its_rate_and_is_removed_after_an_error():
    with pytest.raises(RuntimeError, match="inside"):
        with EmulatedNetwork(2, rate_mbit=100) as network:
            assert len(ours(namespace_names())) == 3  # two hosts and the switch
            assert len(ours(os.listdir(ETC_NETNS))) == 2  # each host's /etc/hosts
            # every host's upload (its eth0) and download (its switch port) is shaped to the
            # rate; the rate a transfer reaches depends on the machine's load, so the benchmark
            # reports it (bandwidth.py's first line) and the test checks the configuration
            for namespace, device in ((network.hosts[0], "eth0"), (network.hosts[1], "eth0"),
                                      (network.switch, "port0"), (network.switch, "port1")):
                shown = subprocess.run(["ip", "netns", "exec", namespace, "tc", "qdisc", "show",
                                        "dev", device], capture_output=True, text=True,
                                       check=True).stdout
                assert "tbf" in shown and "rate 100Mbit" in shown, shown
            for source, target in ((0, 1), (1, 0)):
                network.throughput_mbit(source, target, megabytes=8)
            sent, received = network.counters(0)
            assert sent >= 8 * 2**20 and received >= 8 * 2**20  # both directions carried it
            raise RuntimeError("inside")
    assert ours(namespace_names()) == []
    assert ours(os.listdir(ETC_NETNS) if os.path.isdir(ETC_NETNS) else []) == []


def test_ssh_stand_in_reads_horovodruns_command_line():
    # exactly what horovod.runner.util.remote.get_ssh_command builds
    argv = ("-o PasswordAuthentication=no -o StrictHostKeyChecking=no host1 -p 22 -i key "
            "-o ConnectTimeout=10").split() + ["cd /x ; env A=1 python w.py"]
    assert split_ssh_arguments(argv) == ("host1", ["cd /x ; env A=1 python w.py"])
    assert split_ssh_arguments(["-T", "user@host2", "true"]) == ("host2", ["true"])


def test_compressor_specs():
    assert parse_spec("none") == ("none", {})
    assert parse_spec("tnq:bits=4,exchange=alltoall,error_feedback=0.5") == \
        ("tnq", {"bits": 4, "exchange": "alltoall", "error_feedback": 0.5})
    with pytest.raises(ValueError, match="key=value"):
        parse_spec("tnq:bits")
    # bandwidth.py: the framework option picks the worker and leaves the table's label
    assert split_framework("none") == ("torch", "none")
    assert split_framework("none:framework=tf") == ("tf", "none")
    assert split_framework("tnq-rht:bits=4,framework=tf,exchange=allgather") == \
        ("tf", "tnq-rht:bits=4,exchange=allgather")
    with pytest.raises(ValueError, match="framework"):
        split_framework("none:framework=jax")
    assert split_framework("powersgd:rank=4,framework=ddp") == ("ddp", "powersgd:rank=4")
    # PyTorch DDP's hooks run on the DDP worker only; horovod_tnq's schemes on both (DDP: as
    # tnq_hook), Horovod's own compressors and unknown names on Horovod's only
    assert compressor_spec("powersgd:rank=1,framework=ddp", "ddp") == ("powersgd", {"rank": 1})
    for spec in ("powersgd:rank=1", "noop"):
        with pytest.raises(ValueError, match="add framework=ddp"):
            compressor_spec(spec, "torch")
    assert compressor_spec("tnq-rht:bits=4,framework=ddp", "ddp") == ("tnq-rht", {"bits": 4})
    with pytest.raises(ValueError, match="as a DDP hook"):
        compressor_spec("tnq-nonesuch:bits=4,framework=ddp", "ddp")


def run_benchmark(script, *args):
    # a limit for a loaded CI machine (2 cores, load 10+), not a quiet one: the 9 jobs of the
    # bandwidth test took 23-35 s each at load 6
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{script}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


def test_bandwidth_benchmark_two_steps(tmp_path):
    tf_none, tf_tnq = "none:framework=tf", "tnq-rht:bits=4,framework=tf"
    ddp_none, ddp_fp16 = "none:framework=ddp", "fp16:framework=ddp"
    ddp_rank1, ddp_rank4 = "powersgd:rank=1,framework=ddp", "powersgd:rank=4,framework=ddp"
    ddp_tnq = "tnq-rht:bits=4,framework=ddp"  # horovod_tnq's DDP hook on DDP's engine
    ddp_noop = "noop:framework=ddp"  # PyTorch's hook that sends nothing: the compute floor
    configs = ["none", "tnq:bits=4", tf_none, tf_tnq, ddp_none, ddp_fp16, ddp_rank1, ddp_rank4,
               ddp_tnq, ddp_noop]
    # 2 warm-up steps: PowerSGD's plain allreduce steps (benchmarks/ddp.py), so that both timed
    # steps are compressed
    out = run_benchmark("bandwidth", "--workers", "2", "--steps", "2", "--warmup", "2",
                        "--configs", *configs, "--free-codec", ddp_tnq,
                        "--hidden", "512,512", "--rate-mbit", "200", "--out", str(tmp_path))
    with open(tmp_path / "bandwidth.csv") as f:
        everything = list(csv.DictReader(f))
    rows = {row["compressor"]: row for row in everything if row["replayed_codec"] == "False"}
    assert set(rows) == set(configs)
    # the DDP hook with its codec replayed (the exchange's speed, codec free): its own row,
    # about the payload bytes of the hook's real run (the replayed first step's zero runs may
    # differ from a later step's)
    [free] = [row for row in everything if row["replayed_codec"] == "True"]
    assert free["compressor"] == ddp_tnq and free["label"].endswith("(codec free)")
    replayed_bytes = float(free["compressor_bytes_per_step"])
    assert 0.8 <= replayed_bytes / float(rows[ddp_tnq]["compressor_bytes_per_step"]) <= 1.25
    assert (tmp_path / "bandwidth.png").stat().st_size > 10_000
    gradient_bytes = 4 * int(rows["none"]["parameters"])
    for spec in (tf_none, ddp_none):  # the same model
        assert int(rows[spec]["parameters"]) == int(rows["none"]["parameters"])
    for none, tnq in (("none", "tnq:bits=4"), (tf_none, tf_tnq)):
        none, tnq = rows[none], rows[tnq]
        # a 2-rank ring allreduce sends each rank's whole gradient once; TNQ 4-bit about 1/7
        assert 1.0 <= float(none["tx_bytes_per_step"]) / gradient_bytes <= 1.3
        assert float(tnq["tx_bytes_per_step"]) / gradient_bytes <= 0.25
        assert 0 < float(tnq["compressor_bytes_per_step"]) / gradient_bytes <= 0.15
    # DDP: fp32 buckets, fp16 half of them, PowerSGD rank 1 about (rows + columns) / (rows x
    # columns) of each weight plus the biases: 1% here; rank 4 about 4 times that
    sent = {spec: float(rows[spec]["tx_bytes_per_step"]) / gradient_bytes
            for spec in (ddp_none, ddp_fp16, ddp_rank1, ddp_rank4, ddp_noop)}
    assert 1.0 <= sent[ddp_none] <= 1.3 and 0.5 <= sent[ddp_fp16] <= 0.65
    assert sent[ddp_rank1] <= 0.05 and sent[ddp_rank1] < sent[ddp_rank4] <= 0.15
    assert sent[ddp_noop] < min(0.01, sent[ddp_rank1])  # no gradient crosses the network
    handed = float(rows[ddp_fp16]["compressor_bytes_per_step"])
    assert handed == 2 * int(rows["none"]["parameters"])  # what the hook gave allreduce
    assert rows[ddp_none]["compressor_bytes_per_step"] == ""  # C++ reducer: not seen
    # tnq_hook at 4 bits: its payloads (what its state counts) and what crossed the NIC, about
    # 1/8 of the fp32 gradient; it trains the same model (below: the loss)
    assert 0 < float(rows[ddp_tnq]["compressor_bytes_per_step"]) / gradient_bytes <= 0.15
    assert float(rows[ddp_tnq]["tx_bytes_per_step"]) / gradient_bytes <= 0.25
    # each framework's ratios are against its own uncompressed run
    for none, others in (("none", ["tnq:bits=4"]), (tf_none, [tf_tnq]),
                         (ddp_none, [ddp_fp16, ddp_rank1, ddp_rank4, ddp_tnq, ddp_noop])):
        assert float(rows[none]["vs_none"]) == 1.0
        for spec in others:
            assert math.isclose(float(rows[spec]["vs_none"]), float(rows[spec]["samples_per_s"])
                                / float(rows[none]["samples_per_s"]))
    # DDP without a hook trains the same model from the same data as Horovod: the same result
    # up to the order of float sums
    assert abs(float(rows[ddp_none]["test_loss"]) - float(rows["none"]["test_loss"])) < 1e-3
    phases = ("compute_s", "encode_s", "decode_s", "comm_wait_s")
    for spec, row in rows.items():
        assert row["framework"] == split_framework(spec)[0]
        if row["framework"] == "torch":
            parts = sum(float(row[key]) for key in phases)
        elif row["framework"] == "ddp":  # hooks inside backward: not split
            assert all(row[key] == "" for key in phases)
            parts = float(row["step_s"])
        else:  # one graph call: only the codec's callbacks are timed, and only for TNQ
            assert row["compute_s"] == row["comm_wait_s"] == ""
            if spec == tf_none:
                assert row["encode_s"] == row["decode_s"] == ""
                parts = float(row["step_s"])
            else:
                assert float(row["encode_s"]) > 0 and float(row["decode_s"]) > 0
                parts = float(row["encode_s"]) + float(row["decode_s"])
        assert 0 < parts <= 1.05 * float(row["step_s"])
        assert 0 <= float(row["test_accuracy"]) <= 1
        assert 0 < float(row["train_loss"]) < 3 and 0 < float(row["test_loss"]) < 3
        # each emulated host's worker on a core of its own, where the machine has two
        cores = ast.literal_eval(row["core_by_rank"])
        assert len(set(cores)) == min(2, len(os.sched_getaffinity(0)))
        # every rank, the remote host's included, got the malloc setting (--reuse-freed-memory)
        assert ast.literal_eval(row["malloc_mmap_threshold_by_rank"]) == [str(1 << 30)] * 2
        # bytes counted on the emulated NIC, for torchrun's workers as for horovodrun's
        assert row["interface"] == "eth0"
    assert "| 2 | torch | tnq:bits=4 |" in out
    assert "| 2 | tf | tnq-rht:bits=4 |" in out
    assert "| 2 | ddp | powersgd:rank=4 |" in out


def test_convergence_benchmark_short_run(tmp_path):
    out = run_benchmark("convergence", "--baselines", "none", "--schemes", "tnq", "--bits", "2",
                        "--steps", "20", "--eval-every", "10", "--out", str(tmp_path))
    with open(tmp_path / "convergence.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(row["compressor"], int(row["step"])) for row in rows] == [
        (spec, step) for spec in ("none", "tnq:bits=2") for step in (10, 20)]
    for row in rows:
        assert 0 < float(row["train_loss_window"]) < 3  # below chance level's ln(10) = 2.3 + noise
    assert (tmp_path / "convergence.png").stat().st_size > 10_000
    assert "| 2 | tnq:bits=2 |" in out


def test_convergence_benchmark_char_lm_beside_ddp_hooks(tmp_path):
    ddp_none, ddp_rank1 = "none:framework=ddp", "powersgd:rank=1,framework=ddp"
    specs = ("none", "tnq-rht:bits=2", ddp_none, ddp_rank1)
    # 4 steps: PowerSGD's 2 plain ones (benchmarks/ddp.py), then 2 compressed
    out = run_benchmark("convergence", "--task", "char-lm", "--baselines", "none",
                        "--schemes", "tnq-rht", "--bits", "2", "--steps", "4", "--eval-every",
                        "2", "--hidden", "64", "--extra-configs", ddp_none, ddp_rank1,
                        "--out", str(tmp_path))
    with open(tmp_path / "convergence_char_lm.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(row["compressor"], int(row["step"])) for row in rows] == [
        (spec, step) for spec in specs for step in (2, 4)]
    for row in rows:
        # next-byte cross-entropy starts near chance level's ln(256) = 5.5 and can only fall
        assert 0 < float(row["train_loss_window"]) < 6
        assert 0 < float(row["test_loss"]) < 6
        assert 0 <= float(row["test_accuracy"]) <= 1
    assert (tmp_path / "convergence_char_lm.png").stat().st_size > 10_000
    table = {line.split("|")[2].strip(): [cell.strip() for cell in line.split("|")]
             for line in out.splitlines()
             if line.startswith("| ") and not line.startswith("| bits")}  # rows, not header
    assert set(table) == set(specs)
    assert table["tnq-rht:bits=2"][1] == "2" and table[ddp_rank1][1] == "rank 1"
    # DDP without a hook trains what Horovod trains (same start, data, clipping)
    assert abs(float(table[ddp_none][5]) - float(table["none"][5])) < 1e-3
    # MB handed per step: 4 bytes a parameter uncompressed (Horovod's and DDP's alike), far
    # less at 2 bits, and a few percent for PowerSGD rank 1
    assert float(table[ddp_none][7]) == float(table["none"][7]) > 0
    assert float(table["tnq-rht:bits=2"][7]) < 0.2 * float(table["none"][7])
    assert 0 < float(table[ddp_rank1][7]) < 0.1 * float(table[ddp_none][7])
    # accuracy against the uncompressed row of the row's own framework
    assert table[ddp_none][4] == "+0.00"
    assert math.isclose(float(table[ddp_rank1][4]),
                        float(table[ddp_rank1][3]) - float(table[ddp_none][3]), abs_tol=0.011)


def test_convergence_benchmark_char_lm_time_to_target(tmp_path):
    # over emulated 1 Gbit/s links (needs root, as the bandwidth test): the time-to-target
    # table; a target 10x the uncompressed final loss is met at the first evaluation (step 2)
    specs = ("none", "tnq-rht:bits=4")
    out = run_benchmark("convergence", "--task", "char-lm", "--baselines", "none",
                        "--schemes", "tnq-rht", "--bits", "4", "--steps", "4", "--eval-every",
                        "2", "--hidden", "64", "--rate-mbit", "1000", "--target", "10",
                        "--out", str(tmp_path))
    table = {line.split("|")[2].strip(): [cell.strip() for cell in line.split("|")]
             for line in out.splitlines()
             if line.startswith("| ") and not line.startswith("| bits")}
    assert set(table) == set(specs)
    for spec in specs:
        cells = table[spec]
        assert cells[6] == "2", (spec, cells)  # steps to target
        seconds, per_step = float(cells[7]), float(cells[8])
        # the training's own seconds at step 2 of 4, evaluations excluded: within the run's
        assert 0 < seconds < 4 * per_step, (spec, cells)
    assert "1000 Mbit/s emulated links" in out
    assert (tmp_path / "convergence_char_lm_time.png").stat().st_size > 10_000


def test_scaling_bytes_benchmark_two_and_three_workers(tmp_path):
    allgather, scalable = "tnq:bits=4,exchange=allgather", "tnq:bits=4,exchange=reduce-scatter"
    out = run_benchmark("scaling_bytes", "--workers", "2", "3", "--configs", "none",
                        allgather, scalable, "--steps", "2", "--out", str(tmp_path))
    with open(tmp_path / "scaling_bytes.csv") as f:
        ratio = {(int(row["workers"]), row["compressor"]): float(row["vs_fp32_gradient"])
                 for row in csv.DictReader(f)}
    # ring allreduce: 2(N-1)/N of the gradient per rank, 1 at N=2, 4/3 at N=3 (plus headers)
    assert 0.95 <= ratio[2, "none"] <= 1.1 and 1.25 <= ratio[3, "none"] <= 1.45
    # allgather: N-1 payloads of ~1/8 of the gradient each (less where zero runs are left out),
    # so it doubles from 2 to 3 ranks
    assert 0.10 <= ratio[2, allgather] <= 0.17
    assert 1.8 <= ratio[3, allgather] / ratio[2, allgather] <= 2.2
    # the reduce-scatter: (N-1)/N payloads at 4 bits and again at the second round's 7
    # (protocol.plan.second_bits): about the allgather's bytes at 3 ranks (7.3 against 8 bits
    # per element, plus a header per chunk; NIC counters also carry Horovod's coordination,
    # kept to a few messages a step by the benchmark's 50 ms cycle), but growing by a third
    # from 2 ranks where the allgather's double
    assert ratio[3, scalable] < 1.15 * ratio[3, allgather]
    assert ratio[3, scalable] < 1.6 * ratio[2, scalable]
    assert (tmp_path / "scaling_bytes.png").stat().st_size > 10_000
    assert "| 3 |" in out


def test_overlap_timeline_sees_transfers_inside_backward(tmp_path):
    out = run_benchmark("overlap_timeline", "--steps", "4", "--out", str(tmp_path))
    with open(tmp_path / "overlap.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({(row["compression"], int(row["step"])) for row in rows}) == [
        (c, s) for c in ("none", "tnq") for s in (1, 2)]
    for compression in ("none", "tnq"):
        mine = [row for row in rows if row["compression"] == compression]
        for row in mine:
            assert int(row["collectives"]) >= 6  # a gradient collective per layer at least
            assert 0 <= int(row["finished_before_backward_end"]) <= int(row["collectives"])
            assert 0 <= float(row["hidden_fraction"]) <= 1
        # collectives start while backward still runs, for TNQ as for stock Horovod
        assert sum(float(row["hidden_ms"]) for row in mine) > 0
    assert (tmp_path / "overlap.png").stat().st_size > 10_000
    assert "| tnq | 2 |" in out


def test_response_cache_benchmark_runs_with_the_cache_on_and_off():
    out = run_benchmark("response_cache", "--layers", "4", "--steps", "3", "--warmup", "1",
                        "--repeats", "1")
    assert "cache on :" in out and "cache off:" in out, out
    assert "off / on = " in out, out
