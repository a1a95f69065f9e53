"""Convergence of the compression schemes at equal bits: loss curves and final accuracy.

    python benchmarks/convergence.py [--schemes tnq tnq-fit qsgd ...] [--bits 2 4] [--steps 400]
                                     [--workers 2] [--extra-configs tnq:bits=2,error_feedback=1]

Each run is ``horovodrun -np W -H localhost:W --gloo`` on benchmarks/digits_worker.py: an MLP
(64-256-256-10 by default) on scikit-learn's digits with SGD + momentum, the same
initialisation, data order and step count for every scheme. Every scheme in --schemes runs at
every width in --bits that it supports, next to uncompressed and fp16 Horovod; --extra-configs
adds any other compressor spec (see jobs.py), e.g. a scheme with options. A run that fails is
reported as failed and the others go on.

Writes convergence.csv (one row per evaluation: training loss averaged over the steps since the
previous evaluation and over ranks, test loss and accuracy on the 450 held-out digits) and
convergence.png (curves per bit width), and prints the final numbers as a markdown table.
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from jobs import markdown_table, parse_spec, run_local, write_csv  # noqa: E402

from horovod_tnq import core  # noqa: E402

# the schemes of the quality benchmark's equal-bits comparison (dqsgd picks its own width and
# dp-binomial adds privacy noise; add them with --schemes or --extra-configs)
SCHEMES = [name for name, scheme in core.SCHEMES.items()
           if scheme.body is None and scheme.choose_bits is None] + ["topk", "tnq-sparse"]
BASELINES = ["none", "fp16"]
COLUMNS = [
    ("bits", "bits", "s"), ("gradients", "compressor", "s"),
    ("test acc", lambda row: 100 * row["test_accuracy"], ".2f"),
    ("vs none (pp)", "vs_none_pp", "+.2f"), ("test loss", "test_loss", ".4f"),
    ("train loss (last 10%)", "train_loss_end", ".4f"),
    ("MB handed to Horovod/step", lambda row: row["compressor_bytes_per_step"] and
     row["compressor_bytes_per_step"] / 1e6, ".4f"),
    ("run s", "job_s", ".0f"),
]


def configs(baselines, schemes, bits_list, extra):
    """(bits label, spec) for the baselines, every scheme at every width it supports, then the
    extra specs."""
    chosen = [({"none": "32", "fp16": "16"}[name], name) for name in baselines]
    for bits in bits_list:
        for scheme in schemes:
            if scheme in core.SCHEMES and not core.supports(scheme, bits):
                continue
            chosen.append((str(bits), f"{scheme}:bits={bits}"))
    for spec in extra:
        chosen.append((str(parse_spec(spec)[1].get("bits", "")), spec))
    return chosen


def smoothed(losses, curve):
    """Mean training loss over the steps since the previous evaluation, at each evaluation."""
    out, start = [], 0
    for point in curve:
        window = losses[start:point["step"]]
        out.append(sum(window) / len(window))
        start = point["step"]
    return out


def plot(rows, curves, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = [b for b in dict.fromkeys(row["bits"] for row in rows) if b not in ("32", "16")]
    fig, axes = plt.subplots(2, max(1, len(widths)), figsize=(6 * max(1, len(widths)), 8),
                             squeeze=False)
    for column, bits in enumerate(widths or ["32"]):
        for row in rows:
            if row["bits"] not in (bits, "32", "16"):
                continue
            curve = curves[row["compressor"]]
            steps = [point["step"] for point in curve]
            style = dict(linestyle="--", color="black" if row["bits"] == "32" else "grey") \
                if row["bits"] in ("32", "16") else {}
            axes[0][column].plot(steps, [p["train_loss_window"] for p in curve],
                                 label=row["compressor"], **style)
            axes[1][column].plot(steps, [100 * p["test_accuracy"] for p in curve],
                                 label=row["compressor"], **style)
        axes[0][column].set_yscale("log")
        axes[0][column].set_title(f"{bits} bits: training loss")
        axes[1][column].set_title(f"{bits} bits: test accuracy (%)")
        axes[1][column].set_xlabel("step")
        axes[1][column].set_ylim(80, 100)
        axes[0][column].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", nargs="*", default=SCHEMES,
                        help="get_compressor names, each run at every width in --bits")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--baselines", nargs="*", default=BASELINES, choices=BASELINES,
                        help="Horovod's own compressors to run beside the schemes")
    parser.add_argument("--extra-configs", nargs="*", default=[], metavar="SPEC")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="per worker")
    parser.add_argument("--hidden", default="256,256")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    return parser.parse_args()


def main():
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows, curves, points, failed = [], {}, [], []
    for bits, spec in configs(args.baselines, args.schemes, args.bits, args.extra_configs):
        worker_args = ["--compressor", spec, "--steps", str(args.steps), "--warmup", "0",
                       "--eval-every", str(args.eval_every), "--batch-size",
                       str(args.batch_size), "--hidden", args.hidden, "--lr", str(args.lr),
                       "--seed", str(args.seed)]
        start = time.perf_counter()
        try:
            report = run_local(args.workers, worker_args, timeout=args.timeout)
        except Exception as error:  # one broken scheme must not hide the others' results
            failed.append((spec, str(error).splitlines()[0]))
            print(f"  {spec}: FAILED: {str(error)[-1500:]}", flush=True)
            continue
        report["job_s"] = time.perf_counter() - start
        curve = report.pop("curve")
        for point, loss in zip(curve, smoothed(report.pop("train_loss_per_step"), curve)):
            point["train_loss_window"] = loss
            points.append({"compressor": spec, "bits": bits, **point})
        curves[spec] = curve
        tail = curve[-max(1, len(curve) // 10):]
        report.update(bits=bits, train_loss_end=sum(p["train_loss_window"] for p in tail) /
                      len(tail))
        rows.append(report)
        print(f"  {spec}: test accuracy {100 * report['test_accuracy']:.2f}%, test loss "
              f"{report['test_loss']:.4f} ({report['job_s']:.0f} s)", flush=True)
    base = next((row for row in rows if row["compressor"] == "none"), None)
    for row in rows:
        row["vs_none_pp"] = 100 * (row["test_accuracy"] - base["test_accuracy"]) if base else None
    write_csv(os.path.join(args.out, "convergence.csv"), points)
    parameters = rows[0]["parameters"] if rows else 0
    title = (f"MLP 64-{args.hidden.replace(',', '-')}-10 ({parameters} parameters) on digits, "
             f"{args.workers} workers, batch {args.batch_size}/worker, {args.steps} steps")
    if rows:
        plot(rows, curves, os.path.join(args.out, "convergence.png"), title)
    print(f"\n{title}\n")
    print(markdown_table(rows, COLUMNS))
    for spec, reason in failed:
        print(f"\nFAILED {spec}: {reason}")
    print(f"\nwrote {os.path.join(args.out, 'convergence.csv')} and convergence.png")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
