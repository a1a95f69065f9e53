"""Convergence of the compression schemes at equal bits: loss curves and final accuracy.

    python -m benchmarks.convergence [--task digits|char-lm] [--schemes tnq tnq-fit qsgd ...]
                                     [--bits 2 4] [--steps 400] [--workers 2]
                                     [--extra-configs tnq:bits=2,error_feedback=1]

Each run is ``horovodrun -np W -H localhost:W --gloo`` on the task's worker, trained with SGD +
momentum through ``hvd.DistributedOptimizer(..., compression=get_compressor(...))``, with the
same initialisation, data order and step count for every scheme:

- ``--task digits`` (default), benchmarks/digits_worker.py: an MLP (64-256-256-10 by default)
  on scikit-learn's digits. Easy: most schemes end within noise of uncompressed training.
- ``--task char-lm``, benchmarks/lm_worker.py: gradients.py's character-level GRU language
  model (--hidden is the GRU width, 256 by default: 329k parameters) on the source text of
  Python's standard library, gradient norm clipped to 1 after the exchange, 300 steps of 32
  windows of 64 characters per worker; test loss (nats per character) and next-character
  accuracy on a held-out tenth of the text. Harder, and the gradients (a sparse embedding, a
  heavy-tailed output layer) are less kind to quantisation.

Every scheme in --schemes runs at
every width in --bits that it supports, next to uncompressed and fp16 Horovod; --extra-configs
adds any other compressor spec (see jobs.py), e.g. a scheme with options. A run that fails is
reported as failed and the others go on.

A spec with ``framework=ddp`` runs PyTorch's DistributedDataParallel instead of Horovod, started
by ``torchrun --standalone --nproc-per-node W`` (Gloo on loopback), with PyTorch's own hook:
``none:framework=ddp``, ``fp16:framework=ddp``, ``powersgd:rank=R,framework=ddp`` (PowerSGD
from step 3 on, see benchmarks/ddp.py), e.g. PyTorch's options beside TNQ on the language model:

    --task char-lm --baselines none --schemes tnq-rht --bits 2 3 4 --extra-configs \
        none:framework=ddp fp16:framework=ddp powersgd:rank=1,framework=ddp \
        powersgd:rank=4,framework=ddp

Its "vs none" is against DDP's own none row, and its bytes per step are what the hook hands to
allreduce (PowerSGD's: over the steps it compresses).

Writes convergence.csv (one row per evaluation: training loss averaged over the steps since the
previous evaluation and over ranks, test loss and accuracy on the held-out data) and
convergence.png (curves per bit width), named convergence_char_lm.* for char-lm and with a
_seed<N> suffix for --seed N other than 0, and prints the final numbers as a markdown table. The
MB handed to Horovod per step is the compressor's own count, and 4 or 2 bytes per parameter for
Horovod's "none" and "fp16".
"""

import argparse
import os
import subprocess
import sys
import time

from benchmarks.jobs import (ROOT, WORKER, WORKERS, horovodrun_command, markdown_table,
                             parse_spec, read_report, torchrun_command, worker_env, write_csv)
from horovod_tnq import core

HERE = os.path.dirname(os.path.abspath(__file__))

# the schemes of the quality benchmark's equal-bits comparison (dqsgd picks its own width and
# dp-binomial adds privacy noise; add them with --schemes or --extra-configs)
SCHEMES = [name for name, scheme in core.SCHEMES.items()
           if scheme.body is None and scheme.choose_bits is None] + ["topk", "tnq-sparse"]
BASELINES = ["none", "fp16"]
# per task: the worker script, the defaults of the arguments left unset, and the plot's
# accuracy axis
TASKS = {
    "digits": dict(worker=WORKER, steps=400, batch_size=16, hidden="256,256", lr=0.05,
                   accuracy_range=(80, 100)),
    "char-lm": dict(worker="benchmarks.lm_worker", steps=300, batch_size=32,
                    hidden="256", lr=0.5, accuracy_range=None),
}
BASELINE_BYTES = {"none": 4, "fp16": 2}  # per parameter, what Horovod's own compressors hand it
COLUMNS = [
    ("bits", "bits", "s"), ("gradients", "compressor", "s"),
    ("test acc", lambda row: 100 * row["test_accuracy"], ".2f"),
    ("vs none (pp)", "vs_none_pp", "+.2f"), ("test loss", "test_loss", ".4f"),
    ("train loss (last 10%)", "train_loss_end", ".4f"),
    # handed to Horovod, or to allreduce by a DDP hook
    ("MB handed to collectives/step", lambda row: row["compressor_bytes_per_step"] and
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
        name, options = parse_spec(spec)
        if "bits" in options:
            bits = str(options["bits"])
        elif name == "powersgd":
            bits = f"rank {options.get('rank', 1)}"
        else:  # none and fp16 of another framework: drawn with the baselines
            bits = {"none": "32", "fp16": "16"}.get(name, "")
        chosen.append((bits, spec))
    return chosen


def smoothed(losses, curve):
    """Mean training loss over the steps since the previous evaluation, at each evaluation."""
    out, start = [], 0
    for point in curve:
        window = losses[start:point["step"]]
        out.append(sum(window) / len(window))
        start = point["step"]
    return out


def run_worker(worker, workers, worker_args, timeout=None, framework="torch"):
    """jobs.run_local with another worker script (torchrun for DDP): rank 0's report."""
    env = worker_env()
    if framework == "ddp":
        command = torchrun_command(worker, worker_args, nproc=workers)
        env["GLOO_SOCKET_IFNAME"] = "lo"  # not whatever this machine's hostname resolves to
    else:
        command = horovodrun_command(workers, f"localhost:{workers}", worker_args,
                                     worker=worker)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return read_report(done, " ".join(worker_args))


def worker_for(task, framework):
    """The module a spec of ``framework`` runs for ``task``: the char-lm worker trains with
    Horovod or DDP itself; digits has a worker per framework."""
    return task["worker"] if task["worker"] != WORKER else WORKERS[framework]


def plot(rows, curves, path, title, accuracy_range=(80, 100)):
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
        width = f"{bits} bits" if bits.isdigit() else bits  # PowerSGD's: "rank R"
        axes[0][column].set_title(f"{width}: training loss")
        axes[1][column].set_title(f"{width}: test accuracy (%)")
        axes[1][column].set_xlabel("step")
        if accuracy_range:
            axes[1][column].set_ylim(*accuracy_range)
        axes[0][column].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits", choices=sorted(TASKS))
    parser.add_argument("--schemes", nargs="*", default=SCHEMES,
                        help="get_compressor names, each run at every width in --bits")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--baselines", nargs="*", default=BASELINES, choices=BASELINES,
                        help="Horovod's own compressors to run beside the schemes")
    parser.add_argument("--extra-configs", nargs="*", default=[], metavar="SPEC")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, help="default: the task's (400 digits, 300 char-lm)")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--batch-size", type=int, help="per worker; default: the task's "
                        "(16 digits, 32 char-lm windows)")
    parser.add_argument("--hidden", help="hidden widths; default: the task's (256,256 digits, "
                        "256 char-lm)")
    parser.add_argument("--lr", type=float, help="default: the task's (0.05 digits, 0.5 char-lm)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    args = parser.parse_args()
    task = TASKS[args.task]
    for key in ("steps", "batch_size", "hidden", "lr"):
        if getattr(args, key) is None:
            setattr(args, key, task[key])
    return args


def main():
    args = parse_args()
    task = TASKS[args.task]
    os.makedirs(args.out, exist_ok=True)
    rows, curves, points, failed = [], {}, [], []
    for bits, spec in configs(args.baselines, args.schemes, args.bits, args.extra_configs):
        worker_args = ["--compressor", spec, "--steps", str(args.steps), "--warmup", "0",
                       "--eval-every", str(args.eval_every), "--batch-size",
                       str(args.batch_size), "--hidden", args.hidden, "--lr", str(args.lr),
                       "--seed", str(args.seed)]
        start = time.perf_counter()
        framework = parse_spec(spec)[1].get("framework", "torch")
        try:
            report = run_worker(worker_for(task, framework), args.workers, worker_args,
                                timeout=args.timeout, framework=framework)
        except Exception as error:  # one broken scheme must not hide the others' results
            failed.append((spec, str(error).splitlines()[0]))
            print(f"  {spec}: FAILED: {str(error)[-1500:]}", flush=True)
            continue
        report["job_s"] = time.perf_counter() - start
        name = parse_spec(spec)[0]
        if report.get("compressor_bytes_per_step") is None and name in BASELINE_BYTES:
            report["compressor_bytes_per_step"] = BASELINE_BYTES[name] * report["parameters"]
        report["framework"] = framework
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
    for row in rows:  # against the none row of the row's own framework (Horovod's, DDP's)
        base = next((other for other in rows if other["framework"] == row["framework"]
                     and parse_spec(other["compressor"])[0] == "none"), None)
        row["vs_none_pp"] = 100 * (row["test_accuracy"] - base["test_accuracy"]) if base else None
    stem = "convergence" + ("_char_lm" if args.task == "char-lm" else "") + \
        (f"_seed{args.seed}" if args.seed else "")
    write_csv(os.path.join(args.out, stem + ".csv"), points)
    parameters = rows[0]["parameters"] if rows else 0
    if args.task == "digits":
        title = f"MLP 64-{args.hidden.replace(',', '-')}-10 ({parameters} parameters) on digits"
    else:
        title = (f"char GRU {args.hidden} ({parameters} parameters) on Python stdlib source, "
                 f"lr {args.lr}")
    title += f", {args.workers} workers, batch {args.batch_size}/worker, {args.steps} steps"
    if args.seed:
        title += f", seed {args.seed}"
    if rows:
        plot(rows, curves, os.path.join(args.out, stem + ".png"), title,
             task["accuracy_range"])
    print(f"\n{title}\n")
    print(markdown_table(rows, COLUMNS))
    for spec, reason in failed:
        print(f"\nFAILED {spec}: {reason}")
    print(f"\nwrote {os.path.join(args.out, stem + '.csv')} and {stem}.png")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
