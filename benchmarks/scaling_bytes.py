"""Bytes each worker sends per step as the number of workers grows, per gradient exchange.

    python -m benchmarks.scaling_bytes [--workers 2 3 4 6 8] [--configs none tnq:bits=4 ...]

For each worker count N and compressor spec, runs real horovodrun workers (digits_worker.py, an
MLP of --hidden widths on digits) on N emulated hosts (benchmarks/emulated_network.py, links not
shaped: only bytes are measured here), and reads each host's NIC counters over the timed steps
(Horovod's cycle at 50 ms: 50x fewer coordination messages than at its 1 ms default, on a
machine where a step's length moves with the load). Uncompressed Horovod (ring allreduce) sends
about 2 (N-1)/N of the gradient per rank, flat in N; an allgather of compressed payloads sends
(N-1) payloads per rank, growing with N.
A new exchange is measured by adding its spec, e.g. ``tnq:bits=4,exchange=NAME``, to --configs.

Writes scaling_bytes.csv and scaling_bytes.png to --out and prints a markdown table of bytes sent
per rank and step, relative to the fp32 gradient size. Needs root.
"""

import argparse
import os
import signal
import sys

from benchmarks.emulated_network import EmulatedNetwork, remove_stale_namespaces
from benchmarks.jobs import horovodrun_command, read_report, worker_env, write_csv

HERE = os.path.dirname(os.path.abspath(__file__))

CONFIGS = ["none", "tnq:bits=4,exchange=allgather", "tnq:bits=4,exchange=reduce-scatter"]
CYCLE_MS = 50  # Horovod's cycle time in these runs (see measure)


def measure(network, workers, spec, args):
    worker_args = ["--compressor", spec, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--hidden", args.hidden, "--batch-size", "16"]
    command = horovodrun_command(workers, network.hosts_argument(workers), worker_args,
                                 ["--network-interfaces", "eth0"])
    # Horovod's background loop coordinates the ranks once a cycle (every HOROVOD_CYCLE_TIME ms,
    # 1 by default) whether there is a tensor to reduce or not: on a busy machine a step takes
    # more cycles, and those messages are counted on the NIC with the payloads (a loaded test
    # run measured the 3-rank allgather at 2.30x the 2-rank one, where payloads predict 2x).
    # Only bytes are measured here, so a long cycle keeps them to a few messages a step.
    env = worker_env({"HOROVOD_CYCLE_TIME": str(CYCLE_MS)})
    report = read_report(network.horovodrun(command, env, timeout=args.timeout),
                         f"{workers} workers, {spec}")
    by_rank = report["tx_bytes_per_step_by_rank"]
    gradient_bytes = 4 * report["parameters"]
    return {"workers": workers, "compressor": spec, "parameters": report["parameters"],
            "tx_bytes_per_rank_step": sum(by_rank) / len(by_rank),
            "max_tx_bytes_per_rank_step": max(by_rank),
            "vs_fp32_gradient": sum(by_rank) / len(by_rank) / gradient_bytes,
            "compressor_bytes_per_step": report["compressor_bytes_per_step"]}


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for spec in dict.fromkeys(row["compressor"] for row in rows):
        mine = [row for row in rows if row["compressor"] == spec]
        ax.plot([row["workers"] for row in mine], [row["vs_fp32_gradient"] for row in mine],
                marker="o", label=spec)
    ax.set_xlabel("workers")
    ax.set_ylabel("bytes sent per rank and step / fp32 gradient bytes")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 3, 4, 6, 8])
    parser.add_argument("--configs", nargs="+", default=CONFIGS, help="compressor specs")
    parser.add_argument("--hidden", default="1024,512", help="hidden widths (0.6M parameters)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    os.makedirs(args.out, exist_ok=True)
    remove_stale_namespaces()
    rows = []
    with EmulatedNetwork(max(args.workers)) as network:
        for workers in args.workers:
            for spec in args.configs:
                rows.append(measure(network, workers, spec, args))
                print(f"  {workers} workers, {spec}: {rows[-1]['tx_bytes_per_rank_step']:.0f} "
                      f"bytes/rank/step", flush=True)
    write_csv(os.path.join(args.out, "scaling_bytes.csv"), rows)
    title = (f"MLP 64-{args.hidden.replace(',', '-')}-10 ({rows[0]['parameters']} parameters), "
             "NIC counters, mean over ranks")
    plot(rows, os.path.join(args.out, "scaling_bytes.png"), title)
    specs = list(dict.fromkeys(row["compressor"] for row in rows))
    print(f"\n{title}: bytes sent per rank and step / fp32 gradient bytes\n")
    print("| workers | " + " | ".join(specs) + " |")
    print("|---|" + "---|" * len(specs))
    for workers in args.workers:
        cells = {row["compressor"]: row for row in rows if row["workers"] == workers}
        print(f"| {workers} | " + " | ".join(f"{cells[s]['vs_fp32_gradient']:.3f}"
                                             for s in specs) + " |")
    print(f"\nwrote {os.path.join(args.out, 'scaling_bytes.csv')} and scaling_bytes.png")


if __name__ == "__main__":
    main()
