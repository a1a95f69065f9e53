"""Every exchange on real Horovod workers at 3, 4 and 8 ranks (issue 23, item 4): the ranks end
bit-identical, each tensor takes the exchange protocol/plan.py chooses, and the averaged
gradient's error is what benchmarks/scale_simulator.py (N ranks in one process, core payloads)
says for the same gradients.

workers/scale_exchange.py averages g + 0.01 n_i (Student-t(3), the simulator's gradients()) at
2 bits, tensors of 65536, 10000, 4099 and 1500 elements for 3 steps, with each exchange. The
error is told as the simulator tells it: NMSE of the average x N / one rank's own NMSE (1.0: the
ranks' errors average away like 1/N). Simulated at 2 bits (6 seeds, these sizes): the allgather
1.00 +- 0.03, the reduce-scatter 1.04 to 1.10 (its second round at protocol.plan.second_widths);
measured here (PyTorch and TensorFlow alike): 1.00 to 1.03 and 1.04 to 1.09, each exchange's
mean within 0.02 of the simulator's. The reduce-scatter's second round at the first round's
width gave 4 at 3 ranks, 5 at 4 and 9 at 8. So each tensor's ratio (mean of its steps) must stay
under RATIO_LIMIT, and each exchange's mean over its tensors within SIMULATOR_TOLERANCE of the
simulator's on the same gradients. PyTorch runs at 3 and 8 ranks and on 2 x 2 and 2 x 4 hosts
(the forced exchanges at 4 and 8 ranks there), TensorFlow at 3, 4 and 8 and on 2 x 2 (its
8-rank job took 85 s on a loaded 2-core machine).

"hierarchical" on one host is the flat "auto" choice (plan.choose_exchange without hosts). On
two emulated hosts (`-H localhost:L,127.0.0.1:L`: local_size L, cross_size 2) it and "auto" take
the hierarchical exchange for tensors of at least a bucket per local rank: each host's sum, in
float32, quantized at plan.host_bits and sent between hosts as plan.cross_config says
(benchmarks.scale_simulator.hierarchical). Simulated here: NMSE x N /
single 0.54 at L = 2 (3 bits between hosts), 1.07 at L = 4.
"""

import functools
import os

import numpy as np
import pytest
from launch import WORKERS, horovodrun_command, run_ranks, same_on_all_ranks, worker_env

from horovod_tnq import CompressorConfig, core
from horovod_tnq.protocol import Hosts, choose_exchange, second_round_configs

from benchmarks import scale_simulator


EXCHANGES = ("allgather", "reduce-scatter", "auto", "hierarchical")
KINDS = ("allgather", "reduce-scatter", "hierarchical")  # the exchanges a tensor can take
RATIO_LIMIT = 1.5  # NMSE x N / single of each tensor
SIMULATOR_TOLERANCE = 0.15  # |measured - simulated| of an exchange's mean ratio

# (framework, horovodrun -H): one host of N ranks, or two emulated hosts of L ranks each
# (PyTorch at 4 ranks on one host is left to the 2 x 2 hosts, where the forced exchanges run
# at 4 ranks too: each job costs 15-85 s of a loaded 2-core machine)
LAYOUTS = [("torch", "localhost:3"), ("torch", "localhost:8"),
           ("tensorflow", "localhost:3"), ("tensorflow", "localhost:4"),
           ("tensorflow", "localhost:8"),
           ("torch", "localhost:2,127.0.0.1:2"), ("torch", "localhost:4,127.0.0.1:4"),
           ("tensorflow", "localhost:2,127.0.0.1:2")]


def layout_id(layout):
    framework, hosts = layout
    slots = [int(host.split(":")[1]) for host in hosts.split(",")]
    shape = f"np{slots[0]}" if len(slots) == 1 else "hosts" + "x".join(map(str, slots))
    return f"{'tf' if framework == 'tensorflow' else framework}-{shape}"


def run_job(framework, hosts, out_dir, timeout=600):
    """workers/scale_exchange.py under `horovodrun --gloo -H hosts`; each rank's report."""
    num_proc = sum(int(host.split(":")[1]) for host in hosts.split(","))
    command = horovodrun_command(num_proc, hosts, [os.path.join(WORKERS, "scale_exchange.py"),
                                                   str(out_dir), framework])
    return run_ranks(command, num_proc, out_dir, worker_env(tf_log_level="2"), timeout,
                     error=AssertionError)


@pytest.fixture(scope="module", params=LAYOUTS, ids=layout_id)
def job(request, tmp_path_factory):
    framework, hosts = request.param
    reports = run_job(framework, hosts, tmp_path_factory.mktemp("scale_exchanges"))
    slots = [int(host.split(":")[1]) for host in hosts.split(",")]
    for report in reports:  # the job ran where the layout says (the harness's own check)
        assert (report["local_size"], report["cross_size"]) == (slots[0], len(slots)), report
    return reports


def config_of(report, exchange):
    """The settings the worker's compressor had for ``exchange``."""
    return CompressorConfig(bits=report["bits"], exchange=exchange, min_numel=1)


def hosts_of(report):
    """The Hosts that the hierarchical exchange is available with in this job (several hosts
    of several ranks), else None."""
    if report["cross_size"] > 1 and report["local_size"] > 1:
        return Hosts(report["local_size"], report["cross_size"], report["local_rank"])
    return None


def planned(report, exchange, numel):
    return choose_exchange(config_of(report, exchange), numel, report["size"],
                           hosts_of(report))


def entry_of(reports, exchange):
    for report in reports:
        assert "error" not in report["exchanges"][exchange], \
            f"rank {report['rank']}: {report['exchanges'][exchange]['error']}"
    return [report["exchanges"][exchange] for report in reports]


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_ranks_end_bit_identical(job, exchange):
    entries = entry_of(job, exchange)
    digests = same_on_all_ranks(entries, "digests_by_rank")  # as each rank received them
    assert len(digests) == len(job) and len(digests[0]) == len(job[0]["sizes"]) * job[0]["steps"]
    assert all(rank_digests == digests[0] for rank_digests in digests), digests
    for index, row in enumerate(entries[0]["rows"]):  # and as each rank wrote them
        same_on_all_ranks(entries, "rows", index, "digest")
        assert row["dtype"] == "float32" and row["shape"] == [row["numel"]], row


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_each_tensor_takes_the_planned_exchange(job, exchange):
    report = job[0]
    expected = dict.fromkeys(KINDS, 0)
    for numel in report["sizes"]:
        expected[planned(report, exchange, numel)] += report["steps"]
    for report, entry in zip(job, entry_of(job, exchange)):
        ran = {kind: entry["stats"].get(kind, 0) for kind in KINDS}
        if expected["hierarchical"]:
            assert ran["hierarchical"], \
                f"rank {report['rank']}: no tensor took the hierarchical exchange on " \
                f"{report['cross_size']} hosts of {report['local_size']}: {entry['stats']}"
        assert ran == expected, (report["rank"], entry["stats"])


@functools.cache
def rank_gradients(size, numel, noise, seed):
    """The job's inputs (the worker draws them the same way) and their float64 average."""
    grads = scale_simulator.gradients(size, numel, noise, seed)
    return grads, np.mean([g.astype(np.float64) for g in grads], axis=0)


@functools.cache
def single_nmse(size, numel, noise, seed, bits):
    """One rank's own NMSE at ``bits``, the mean over the ranks (core, as the simulator)."""
    grads, _ = rank_gradients(size, numel, noise, seed)
    config = CompressorConfig(bits=bits)
    return float(np.mean([scale_simulator.nmse(
        core.decode(scale_simulator._encode(g, config, rank, "t"))[0], g.astype(np.float64))
        for rank, g in enumerate(grads)]))


def simulated_nmse(reports, exchange, row):
    """The simulator's NMSE of the average for ``row``'s gradients and planned exchange."""
    report = reports[0]
    size, config = report["size"], config_of(report, exchange)
    grads, truth = rank_gradients(size, row["numel"], report["noise"], row["seed"])
    kind = planned(report, exchange, row["numel"])
    if kind == "allgather":
        result, _ = scale_simulator.allgather(grads, config)
    elif kind == "reduce-scatter":
        result, _ = scale_simulator.reduce_scatter(grads, config,
                                                   second_round_configs(config, size))
    else:
        local = report["local_size"]
        groups = [sorted(r["rank"] for r in reports if r["cross_rank"] == host)
                  for host in range(report["cross_size"])]
        # the simulator's hosts are consecutive ranks, as horovodrun -H places them
        assert groups == [list(range(h * local, (h + 1) * local)) for h in range(len(groups))]
        result = scale_simulator.hierarchical(grads, config, local)[0]
    return scale_simulator.nmse(result, truth)


def ratios(reports, exchange):
    """Per tensor size, (measured, simulated) NMSE x N / single, each the mean of its steps."""
    report = reports[0]
    size = report["size"]
    by_numel = {}
    for row in entry_of(reports, exchange)[0]["rows"]:
        single = single_nmse(size, row["numel"], report["noise"], row["seed"], report["bits"])
        measured = row["nmse"] * size / single
        simulated = simulated_nmse(reports, exchange, row) * size / single
        by_numel.setdefault(row["numel"], []).append((measured, simulated))
    return {numel: tuple(np.mean(pairs, axis=0)) for numel, pairs in by_numel.items()}


@pytest.mark.parametrize("exchange", EXCHANGES)
def test_averaged_error_is_the_simulators(job, exchange):
    by_numel = ratios(job, exchange)
    for numel, (measured, simulated) in by_numel.items():
        assert measured <= RATIO_LIMIT, (numel, measured, simulated)
    measured, simulated = np.mean(list(by_numel.values()), axis=0)
    assert abs(measured - simulated) <= SIMULATOR_TOLERANCE, by_numel
    # every rank measured the same error (their results are the same)
    for index in range(len(by_numel) * job[0]["steps"]):
        same_on_all_ranks(entry_of(job, exchange), "rows", index, "nmse")


@pytest.mark.parametrize("size", [3, 4, 8])
def test_limit_fails_the_same_width_second_round(size):
    """In the simulator, the reduce-scatter whose second round quantizes at the first round's
    width (the exchange before plan.second_bits) breaks RATIO_LIMIT at every size above by far,
    and the one at second_bits meets it."""
    rows = {name.split(",")[-1].strip(): ratio
            for name, _, ratio, _ in scale_simulator.simulate(size, 2, 4099, seed=1)}
    wide = next(ratio for name, ratio in rows.items() if name.startswith("second round"))
    assert rows["same bits (2)"] > 2 * RATIO_LIMIT, rows
    assert wide <= RATIO_LIMIT and rows["allgather"] <= RATIO_LIMIT, rows
