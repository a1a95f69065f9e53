"""Training speed over a bandwidth-limited network: real horovodrun workers on emulated hosts.

    python -m benchmarks.bandwidth [--rate-mbit 1000] [--workers 2 4] [--ranks-per-host 1]
                                   [--steps 30] [--configs none fp16 tnq:bits=4 ...]
                                   [--profile tnq:bits=4]

Builds an emulated network (benchmarks/emulated_network.py: one network namespace per host, each
with its own full-duplex NIC shaped to --rate-mbit, joined by a bridge), checks the link's
goodput with one TCP stream, then for each worker count and compressor spec runs
``horovodrun -np N -H host0:L,host1:L,... --gloo`` from host 0 (remote hosts through an ssh
stand-in that enters their namespace) on benchmarks/digits_worker.py: a 10.8M-parameter MLP on
scikit-learn's digits, the same data, initialisation and steps for every configuration. Each
worker runs on one core (rank modulo the machine's cores; --no-pin-cores lets them float).

``--workers`` counts ranks in all, ``--ranks-per-host L`` (default 1) puts L of them on each
emulated host: N workers run on N / L hosts (N must be a multiple of every L given), horovodrun
gets ``-np N -H host0:L,...,host{N/L-1}:L`` (ranks numbered host by host, so Horovod's
local_size is L and cross_size N / L) and DDP's torchrun ``--nnodes N/L --nproc-per-node L`` on
each host. The ranks of a host share its namespace and reach each other through its loopback,
unshaped: a fast link inside the host, the shaped NIC between hosts. Several values run each
layout, e.g. ``--workers 4 --ranks-per-host 2 1``: 2 hosts x 2 ranks, then 4 hosts x 1 rank.
Pinning stays rank modulo the cores, so on a 2-core machine the two ranks of a host get a core
each and share it with the other host's ranks. Where some layout has L > 1 the table gains the
columns "ranks/host" and "exchanges/step" (the tensors or buckets per step each of TNQ's
exchanges took, from the compressor's counters: the way to see that ``exchange=hierarchical``
ran rather than falling back to a flat exchange). The Horovod worker starts Horovod with dynamic
process sets, which the hierarchical exchange needs (spec option ``process_sets=static``: without).

Reports per configuration: samples/s, each step split into compute / encode / decode /
communication wait, bytes each host's NIC sent per step, and test accuracy and loss after the
run. Writes bandwidth.csv and bandwidth.png to --out and prints a markdown table. Needs root.
A compressor spec is a get_compressor name with options (see jobs.py), so a new scheme or exchange
is benchmarked by naming it in --configs.

The option ``framework=tf`` runs a spec on the TensorFlow worker (benchmarks/digits_worker_tf.py:
the same model, data and steps through ``hvd.DistributedGradientTape`` in a tf.function), e.g.
``--configs none fp16 none:framework=tf tnq-rht:bits=4,framework=tf``. Each row's "vs none" and
"vs fp16" are against the none and fp16 rows of its own framework (and worker count); phases the
TF worker cannot split (compute, wait; encode and decode of Horovod's own compressors) are empty.

The option ``framework=ddp`` runs PyTorch's own alternative instead of Horovod: the same model,
data and steps with ``torch.nn.parallel.DistributedDataParallel`` over Gloo
(benchmarks/digits_worker_ddp.py), no hook (``none``), ``fp16_compress_hook`` (``fp16``) or
``powerSGD_hook`` (``powersgd:rank=R``; see benchmarks/ddp.py), or this project's codec as a DDP
hook (a scheme name, ``tnq-rht:bits=2,framework=ddp``: codec against codec on one engine),
started as a DDP user starts a multi-node job: ``torchrun --nnodes N --node-rank i --master-addr
<host 0> ...`` in every host's namespace, Gloo on eth0. Same pinning, allocator setting and
counters; its "vs none" is against DDP's own none, and its step is not split (the hooks run
inside backward), e.g. ``--configs none tnq-rht:bits=4,fused=1 none:framework=ddp
powersgd:rank=4,framework=ddp tnq-rht:bits=2,framework=ddp``.

Hosts of several ranks, TNQ's exchanges side by side (docs/benchmarks.md, "Hosts of several
ranks"): ``--workers 4 --ranks-per-host 2 1 --configs none tnq-rht:bits=2,exchange=allgather
tnq-rht:bits=2,exchange=hierarchical tnq-rht:bits=2,exchange=hierarchical,fused=1
none:framework=ddp powersgd:rank=4,framework=ddp``.
"""

import argparse
import itertools
import os
import signal
import subprocess
import sys
import time

from benchmarks.emulated_network import EmulatedNetwork, remove_stale_namespaces
from benchmarks.jobs import (WORKERS, horovodrun_command, markdown_table, parse_spec,
                             read_report, torchrun_command, worker_env, write_csv)

HERE = os.path.dirname(os.path.abspath(__file__))

CONFIGS = ["none", "fp16", "tnq:bits=4", "tnq:bits=3", "tnq:bits=2", "qsgd:bits=4",
           "tnq:bits=4,fused=1"]
PHASES = {"compute_s": "compute", "encode_s": "encode", "decode_s": "decode",
          "comm_wait_s": "wait (network, peers, CPU)"}
COLUMNS = [
    ("workers", "workers", "d"), ("framework", "framework", "s"), ("gradients", "label", "s"),
    ("samples/s", "samples_per_s", ".1f"), ("vs none", "vs_none", ".2f"),
    ("vs fp16", "vs_fp16", ".2f"), ("s/step", "step_s", ".3f"),
    ("compute", "compute_s", ".3f"), ("encode", "encode_s", ".3f"),
    ("decode", "decode_s", ".3f"), ("wait", "comm_wait_s", ".3f"),
    ("MB sent/step/host", lambda row: row["tx_bytes_per_step"] / 1e6, ".2f"),
    ("test acc", lambda row: 100 * row["test_accuracy"], ".2f"),
    ("test loss", "test_loss", ".3f"),
]
# added after "workers" and at the end where some layout has several ranks per host
RANKS_COLUMN = ("ranks/host", "ranks_per_host", "d")
EXCHANGES_COLUMN = ("exchanges/step", lambda row: exchanges_text(row.get("exchanges_per_step")),
                    "s")


def exchanges_text(counts):
    """"hierarchical 3" from the worker's tensors per step by exchange (None: not TNQ)."""
    if not counts:
        return None
    return ", ".join(f"{kind} {count:g}" for kind, count in counts.items() if count) or "-"


def columns_for(rows):
    if all(row.get("ranks_per_host", 1) == 1 for row in rows):
        return COLUMNS
    return COLUMNS[:1] + [RANKS_COLUMN] + COLUMNS[1:] + [EXCHANGES_COLUMN]


def layout_text(workers, ranks_per_host):
    if ranks_per_host == 1:
        return f"{workers} workers"
    return f"{workers // ranks_per_host} hosts x {ranks_per_host} ranks"


# glibc gives every freed block of more than 32 MB back to the OS (munmap), so each step's
# fresh gradient buffers (autograd allocates them anew after zero_grad) are page-faulted in
# again: measured on this VM, a 2560x4096 float32 matmul into a new tensor takes 20 ms with
# glibc's defaults and 5 ms with this (THP_MEM_ALLOC_ENABLE=1, PyTorch's huge pages: 8 ms).
# jemalloc or tcmalloc, which PyTorch's CPU performance guide recommends, keep them too.
REUSE_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30),
                      "MALLOC_TRIM_THRESHOLD_": str(1 << 31)}


def split_framework(spec):
    """(framework, the spec without its "framework" option): the option picks the worker, the
    rest names the compressor in the table."""
    framework = parse_spec(spec)[1].get("framework", "torch")
    if framework not in WORKERS:
        raise ValueError(f"spec {spec!r}: framework must be one of {sorted(WORKERS)}")
    name, _, rest = spec.partition(":")
    kept = [item for item in rest.split(",") if item and item.partition("=")[0] != "framework"]
    return framework, name + (":" + ",".join(kept) if kept else "")


def run_config(network, workers, ranks_per_host, spec, args, profile=False, replay=False):
    framework, label = split_framework(spec)
    worker_args = ["--compressor", spec, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--batch-size", str(args.batch_size), "--hidden",
                   args.hidden, "--lr", str(args.lr), "--seed", str(args.seed)]
    if args.pin_cores:
        worker_args.append("--pin-core")
    if profile:
        worker_args.append("--profile")
    if replay:
        worker_args.append("--replay-codec")
    extra = ["--network-interfaces", "eth0"]
    if args.timeline:
        os.makedirs(args.timeline, exist_ok=True)
        flat_spec = spec.replace(':', '-').replace(',', '-').replace('=', '')
        name = f"{workers}w{ranks_per_host}l-{flat_spec}" + \
            ("-codec-free" if replay else "") + ".json"
        extra += ["--timeline-filename", os.path.join(os.path.abspath(args.timeline), name)]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    env = worker_env(REUSE_FREED_MEMORY if args.reuse_freed_memory else None)
    if framework == "ddp":
        done = run_torchrun(network, workers, ranks_per_host, worker_args, env, args.timeout)
    else:
        command = horovodrun_command(workers, network.hosts_argument(workers, ranks_per_host),
                                     worker_args, extra, worker=WORKERS[framework])
        done = network.horovodrun(command, env, timeout=args.timeout)
    report = read_report(done, f"{layout_text(workers, ranks_per_host)}, {spec}")
    report["job_s"] = time.perf_counter() - start
    report["load_before"] = load
    report["framework"] = framework
    report["ranks_per_host"] = ranks_per_host
    report["hosts"] = workers // ranks_per_host
    report["label"] = label + (" (codec free)" if replay else "")
    return report


# each DDP job's rendezvous on a port of its own, so that one never meets the last one's sockets
# (TIME_WAIT) on host 0
MASTER_PORTS = itertools.count(29500)


def run_torchrun(network, workers, ranks_per_host, worker_args, env, timeout):
    """A DDP job: torchrun on each of the first workers / ranks_per_host hosts, node i of them
    with ``ranks_per_host`` processes (ranks numbered host by host), the rendezvous at host 0,
    Gloo on the hosts' eth0 (PyTorch's counterpart of horovodrun's --network-interfaces). One
    CompletedProcess for read_report: host 0's output first (rank 0's report), then the
    others' (for the error message when there is no report)."""
    master = (network.addresses[0], next(MASTER_PORTS))
    hosts = workers // ranks_per_host
    commands = [torchrun_command(WORKERS["ddp"], worker_args, nproc=ranks_per_host, nodes=hosts,
                                 node_rank=host, master=master) for host in range(hosts)]
    done = network.run_on_hosts(commands, dict(env, GLOO_SOCKET_IFNAME="eth0"), timeout)
    return subprocess.CompletedProcess(
        done[0].args, next((d.returncode for d in done if d.returncode), 0),
        "".join(d.stdout for d in done),
        "".join(f"--- host {host}\n{d.stderr}" for host, d in enumerate(done)))


def median_runs(runs):
    """Per (workers, ranks per host, framework, spec), the run with the median samples/s (the
    lower middle one of an even count), so that its time split stays one run's."""
    groups = {}
    for run in runs:
        key = (run["workers"], run["ranks_per_host"], run["framework"], run["label"])
        groups.setdefault(key, []).append(run)
    rows = []
    for group in groups.values():
        group.sort(key=lambda run: run["samples_per_s"])
        row = dict(group[(len(group) - 1) // 2], repeats=len(group))
        row["samples_per_s_all"] = " ".join(f"{run['samples_per_s']:.1f}" for run in group)
        rows.append(row)
    return rows


def add_ratios(rows):
    """vs_none and vs_fp16: samples/s against the none and fp16 rows of the same worker count,
    ranks per host and framework, so a TF row compares with TF's own uncompressed run."""
    def key(row):
        return row["workers"], row.get("ranks_per_host", 1), row["framework"]

    for group_key in {key(row) for row in rows}:
        group = [row for row in rows if key(row) == group_key]
        base = {row["label"]: row["samples_per_s"] for row in group}
        for row in group:
            for name in ("none", "fp16"):
                row[f"vs_{name}"] = row["samples_per_s"] / base[name] if name in base else None


def shown(row):
    """A row's name in the plot, which has no framework column."""
    return row["label"] if row["framework"] == "torch" else f"{row['label']} [{row['framework']}]"


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # each worker count and ranks per host, in the order they ran
    layouts = list(dict.fromkeys((row["workers"], row.get("ranks_per_host", 1)) for row in rows))
    specs = list(dict.fromkeys(shown(row) for row in rows))
    # room below the axes for the slanted names, above the bars for the legends
    height = 3.0 + 0.07 * max(len(spec) for spec in specs)
    fig, axes = plt.subplots(1, 1 + len(layouts), figsize=(5 + 5 * len(layouts), height))
    width = 0.8 / len(layouts)
    for i, layout in enumerate(layouts):
        by_spec = {shown(row): row for row in rows
                   if (row["workers"], row.get("ranks_per_host", 1)) == layout}
        xs = [j + i * width for j, spec in enumerate(specs) if spec in by_spec]
        axes[0].bar(xs, [by_spec[s]["samples_per_s"] for s in specs if s in by_spec],
                    width, label=layout_text(*layout))
        ax = axes[1 + i]
        bottom = [0.0] * len(by_spec)
        labels = [s for s in specs if s in by_spec]
        for phase in PHASES:
            values = [by_spec[s][phase] or 0.0 for s in labels]  # None: not measured
            ax.bar(labels, values, bottom=bottom, label=PHASES[phase])
            bottom = [b + v for b, v in zip(bottom, values)]
        # the rest of the steps whose worker could not split them (TF, DDP): every bar a step
        rest = [by_spec[s]["step_s"] - b if None in (by_spec[s][p] for p in PHASES) else 0.0
                for s, b in zip(labels, bottom)]
        if any(rest):
            ax.bar(labels, rest, bottom=bottom, label="not split (TF graph, DDP)",
                   color="lightgray")
        ax.set_title(f"seconds per step, {layout_text(*layout)}")
        ax.set_ylim(0, 1.6 * max(by_spec[s]["step_s"] for s in labels))
        plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
        ax.legend(fontsize=8, loc="upper left", ncol=2)
    axes[0].set_xticks([j + width * (len(layouts) - 1) / 2 for j in range(len(specs))])
    axes[0].set_xticklabels(specs, rotation=45, ha="right")
    axes[0].set_ylabel("samples / s")
    axes[0].set_ylim(0, 1.3 * max(row["samples_per_s"] for row in rows))
    axes[0].set_title("training throughput")
    axes[0].legend(fontsize=8, loc="upper left", ncol=len(layouts))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate-mbit", type=float, default=1000.0,
                        help="each host's link rate, each direction")
    parser.add_argument("--rtt-ms", type=float, default=0.0,
                        help="added round-trip time between hosts (needs the netem qdisc)")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4],
                        help="ranks in all, on workers / L hosts of --ranks-per-host L")
    parser.add_argument("--ranks-per-host", type=int, nargs="+", default=[1], metavar="L",
                        help="ranks on each emulated host (several: each layout in turn); "
                        "every worker count must be a multiple of each")
    parser.add_argument("--configs", nargs="+", default=CONFIGS, help="compressor specs")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--hidden", default="4096,2560", help="hidden widths (10.8M parameters)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each configuration; the table shows the median one")
    parser.add_argument("--free-codec", nargs="*", default=[], metavar="SPEC",
                        help="also run these specs with each tensor's first payload and decoded "
                        "sum replayed: the speed the exchange allows if encoding and decoding "
                        "cost nothing (accuracy meaningless)")
    parser.add_argument("--profile", nargs="*", default=[], metavar="SPEC",
                        help="also run these specs with rank 0 profiled and print the profiles")
    parser.add_argument("--pin-cores", action=argparse.BooleanOptionalAction, default=True,
                        help="each worker on one core (rank modulo the cores), as a host of its "
                        "own would be: unpinned, the workers of the emulated hosts and the "
                        "kernel's work for their links migrate between the shared cores")
    parser.add_argument("--reuse-freed-memory", action=argparse.BooleanOptionalAction,
                        default=True,
                        help="workers' malloc keeps freed large blocks for reuse instead of "
                        "returning them to the OS (see REUSE_FREED_MEMORY), for every "
                        "configuration alike")
    parser.add_argument("--timeline", metavar="DIR", help="write a Horovod timeline per run")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    args = parser.parse_args()
    try:
        args.layouts = layouts(args.workers, args.ranks_per_host)
    except ValueError as error:
        parser.error(str(error))
    return args


def layouts(workers, ranks_per_host):
    """(workers, ranks per host) of each job layout, in the order they run."""
    for count, per_host in itertools.product(workers, ranks_per_host):
        if count < 1 or per_host < 1 or count % per_host:
            raise ValueError(f"--workers {count} is not a whole number of hosts of "
                             f"--ranks-per-host {per_host}")
    return list(itertools.product(workers, ranks_per_host))


def main():
    args = parse_args()
    # SIGTERM ends the run like Ctrl-C, so the namespaces are removed either way
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    os.makedirs(args.out, exist_ok=True)
    remove_stale_namespaces()
    runs, profiles = [], []
    shaping = f"{args.rate_mbit:g} Mbit/s per host and direction" if args.rate_mbit else \
        "unshaped"
    hosts = max(workers // per_host for workers, per_host in args.layouts)
    with EmulatedNetwork(hosts, rate_mbit=args.rate_mbit or None,
                         rtt_ms=args.rtt_ms) as network:
        goodput = network.throughput_mbit(0, 1) if hosts > 1 else None
        if goodput is not None:
            print(f"emulated hosts: {shaping}; one TCP stream host0 -> host1 measured "
                  f"{goodput:.0f} Mbit/s", flush=True)
        for workers, per_host in args.layouts:
            where = layout_text(workers, per_host)
            # repeats go round all configurations, so a burst of load elsewhere on a shared
            # machine hits one run of each rather than every run of one
            for repeat in range(args.repeats):
                for spec, replay in [(s, False) for s in args.configs] + \
                        [(s, True) for s in args.free_codec]:
                    row = run_config(network, workers, per_host, spec, args, replay=replay)
                    row.update(repeat=repeat, rate_mbit=args.rate_mbit, rtt_ms=args.rtt_ms,
                               link_goodput_mbit=goodput, pinned=args.pin_cores,
                               reuse_freed_memory=args.reuse_freed_memory)
                    runs.append(row)
                    ran = exchanges_text(row.get("exchanges_per_step"))
                    print(f"  {where}, {shown(row)}: {row['samples_per_s']:.1f} "
                          f"samples/s, {row['step_s']:.3f} s/step, "
                          f"{row['tx_bytes_per_step'] / 1e6:.2f} MB sent/step/host, test accuracy "
                          f"{100 * row['test_accuracy']:.2f}%"
                          + (f", exchanges/step: {ran}" if ran else "")
                          + f" (job {row['job_s']:.0f} s, load before {row['load_before']:.1f})",
                          flush=True)
            for spec in args.profile:
                report = run_config(network, workers, per_host, spec, args, profile=True)
                profiles.append((where, spec, report["profile"]))
    for run in runs:
        run.pop("curve")
        run.pop("train_loss_per_step")
    rows = median_runs(runs)
    add_ratios(rows)
    write_csv(os.path.join(args.out, "bandwidth.csv"), rows)
    if args.repeats > 1:
        write_csv(os.path.join(args.out, "bandwidth_runs.csv"), runs)
    title = (f"{rows[0]['parameters'] / 1e6:.1f}M-parameter MLP on digits, {shaping}, "
             f"{args.steps} timed steps")
    plot(rows, os.path.join(args.out, "bandwidth.png"), title)
    print(f"\n{title}, batch {args.batch_size} per worker; vs none and vs fp16 against the row of "
          f"the same framework\n")
    print(markdown_table(rows, columns_for(rows)))
    for where, spec, text in profiles:
        print(f"\nprofile of rank 0, {where}, {spec} (timed steps, by own time):\n")
        print(text)
    print(f"\nwrote {os.path.join(args.out, 'bandwidth.csv')} and bandwidth.png")


if __name__ == "__main__":
    main()
