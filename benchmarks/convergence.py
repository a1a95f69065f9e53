"""Convergence of the compression schemes at equal bits: loss curves and final accuracy.

    python -m benchmarks.convergence [--task digits|char-lm|transformer]
                                     [--schemes tnq tnq-fit qsgd ...] [--bits 2 4]
                                     [--steps 400] [--workers 2] [--seeds 0 1 2]
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
- ``--task transformer``, benchmarks/transformer_worker.py: examples/train_transformer.py's
  GPT-style byte-level decoder (--hidden is its width, 64 by default; 2 pre-norm blocks of 4
  heads, context 64: 137k parameters) on the same text, trained as transformers are: AdamW
  (betas 0.9/0.95, weight decay 0.1 on the matrices), peak lr 0.01, linear warm-up over 5% of
  the steps then cosine decay to a tenth, the averaged gradient clipped to norm 1, 800 steps
  of 32 windows of 64 bytes per worker; test loss on held-out text. Its plot shows test loss
  and its ratio to uncompressed training of the same seed; its table adds that ratio, the
  steps and the training's wall-clock seconds (evaluations excluded) each run took to first
  reach uncompressed training's final test loss + 1% (``--target``), and seconds per step;
  convergence_transformer_time.png plots test loss against those seconds. For each
  uncompressed run it prints how much its last 20% of steps improved the test loss (the
  plateau check; ``--decay-until 0.8`` ends the decay at 80% of the steps, so that the last
  20% run at the final rate, and ``--lr-warmup``, ``--min-lr`` shape the rest of the schedule,
  for the char-lm task too, whose SGD otherwise keeps --lr constant). A spec may carry the
  worker's ``overrides=`` (per-layer settings, e.g.
  ``tnq-rht:bits=2,overrides=docs``: docs/overrides.md's recommendation) and ``fused=1``
  (horovod_tnq's fused DistributedOptimizer); ``framework=ddp`` specs train under
  DistributedDataParallel with AdamW too, PowerSGD from the end of the lr warm-up on (spec
  option ``start_iter``). The per-layer error and AdamW statistics the worker reports go to
  convergence_transformer_layers.csv (``--diagnose-every K``: with the averaged gradient's
  measured error every K steps).

``--rate-mbit R`` runs every job over emulated hosts (benchmarks/emulated_network.py, as
bandwidth.py: one rank per network namespace, each with a full-duplex link shaped to R Mbit/s,
joined by a bridge; horovodrun from host 0, DDP's torchrun on every host; needs root), so the
seconds to the target are time to accuracy over that network. Every run's report is appended
to <out>/<name>_runs.jsonl as it finishes; ``--from-runs FILE ...`` makes the tables and plots
again from such files without running anything (a long run cut short, or runs made in parts).

Every scheme in --schemes runs at
every width in --bits that it supports, next to uncompressed and fp16 Horovod; --extra-configs
adds any other compressor spec (see jobs.py), e.g. a scheme with options. A run that fails is
reported as failed and the others go on.

``--seeds 0 1 2`` runs every configuration once per seed (seeds outermost); a spec's own
``seeds=N`` option (taken off before the worker sees it) runs it at the first N of them only,
e.g. ``--seeds 0 1 2 --extra-configs tnq-rht:bits=3,seeds=1``. With several seeds the table
per run is followed by one per configuration: means over seeds, and the gap to uncompressed
training of the same seed as mean (min..max). --seeds overrides --seed.

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
convergence.png (curves per bit width; of the first seed), named convergence_char_lm.* for
char-lm, convergence_transformer.* for transformer, and with a _seed<N> suffix for a single
seed N other than 0, and prints the final numbers as a markdown table. The
MB handed to Horovod per step is the compressor's own count, and 4 or 2 bytes per parameter for
Horovod's "none" and "fp16".
"""

import argparse
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from benchmarks import schedule
from benchmarks.jobs import (ROOT, WORKER, WORKERS, horovodrun_command, markdown_table,
                             parse_spec, read_report, torchrun_command, worker_env, write_csv)
from horovod_tnq import core

HERE = os.path.dirname(os.path.abspath(__file__))
# each DDP job's rendezvous on a port of its own (bandwidth.py's reason: TIME_WAIT)
MASTER_PORTS = itertools.count(29500)

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
                    hidden="256", lr=0.5, accuracy_range=None, schedule=schedule.CHAR_LM),
    "transformer": dict(worker="benchmarks.transformer_worker", steps=800, batch_size=32,
                        hidden="64", lr=1e-2, accuracy_range=None,
                        schedule=schedule.TRANSFORMER),
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
def time_text(row):
    """Seconds to the target, "not reached", or None where there is no none row to aim at."""
    if row.get("vs_none_loss") is None:
        return None
    return "not reached" if row["s_to_target"] is None else f"{row['s_to_target']:.1f}"


# the transformer's (and the char-LM's over emulated links): the test loss against uncompressed
# training's, and the steps and seconds to reach it
TRANSFORMER_COLUMNS = [
    ("bits", "bits", "s"), ("gradients", "compressor", "s"), ("seed", "seed", "d"),
    ("test loss", "test_loss", ".4f"), ("vs none (x)", "vs_none_loss", ".4f"),
    ("steps to none + target", lambda row: row["steps_to_target"] or (
        "not reached" if row["vs_none_loss"] is not None else None), ""),
    ("s to none + target", time_text, ""),
    ("s/step", "s_per_step", ".3f"),
    ("train loss (last 10%)", "train_loss_end", ".4f"),
    ("MB handed to collectives/step", lambda row: row["compressor_bytes_per_step"] and
     row["compressor_bytes_per_step"] / 1e6, ".4f"),
    ("run s", "job_s", ".0f"), ("load before", "load_before", ".1f"),
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
        options.pop("seeds", None)
        if "bits" in options:
            bits = str(options["bits"])
        elif name == "powersgd":
            bits = f"rank {options.get('rank', 1)}"
        else:  # none and fp16 of another framework: drawn with the baselines
            bits = {"none": "32", "fp16": "16"}.get(name, "")
        chosen.append((bits, spec))
    return chosen


def split_seeds(spec):
    """(the spec without its ``seeds`` option, that option or None): how many of --seeds it
    runs at."""
    name, options = parse_spec(spec)
    if "seeds" not in options:
        return spec, None
    count = options.pop("seeds")
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"spec {spec!r}: seeds must be a positive count")
    rest = ",".join(f"{key}={value}" for key, value in options.items())
    return name + (":" + rest if rest else ""), count


def steps_to(curve, target):
    """The first evaluated step whose test loss is at most ``target``, or None."""
    return next((point["step"] for point in curve if point["test_loss"] <= target), None)


def spread(values, fmt):
    """"mean (min..max)" of ``values``, or the one value."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ({format(min(values), fmt)}..{format(max(values), fmt)})"


def seed_summary(rows, target=0.01):
    """Markdown table, one line per configuration over its seeds: test loss, its ratio to
    uncompressed training of the same seed (mean, min..max), steps and training seconds to that
    run's final loss + the target (per seed), seconds per step and the bytes."""
    lines = ["| bits | gradients | seeds | test loss | vs none (x) | steps to none + "
             f"{100 * target:g}% (per seed) | s to none + {100 * target:g}% (per seed) | "
             "s/step | train loss (last 10%) | MB handed to collectives/step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for spec in dict.fromkeys(row["compressor"] for row in rows):
        mine = [row for row in rows if row["compressor"] == spec]
        aimed = [row for row in mine if row.get("vs_none_loss") is not None]
        ratios = [row["vs_none_loss"] for row in aimed]
        steps = ", ".join(str(row["steps_to_target"] or "-") for row in aimed)
        seconds = ", ".join("-" if row.get("s_to_target") is None else
                            f"{row['s_to_target']:.0f}" for row in aimed)
        per_step = [row["s_per_step"] for row in mine if row.get("s_per_step")]
        handed = mine[0]["compressor_bytes_per_step"]
        lines.append(
            f"| {mine[0]['bits']} | {spec} | {len(mine)} | "
            f"{spread([row['test_loss'] for row in mine], '.4f')} | "
            f"{spread(ratios, '.4f') if ratios else ''} | {steps} | {seconds} | "
            f"{spread(per_step, '.3f') if per_step else ''} | "
            f"{spread([row['train_loss_end'] for row in mine], '.4f')} | "
            f"{'' if handed is None else format(handed / 1e6, '.4f')} |")
    return "\n".join(lines)


def plateau(curve, fraction=0.2):
    """(step, relative improvement of the test loss from the evaluation nearest the start of
    the last ``fraction`` of the steps to the end): how much the end of training still gave."""
    last = curve[-1]
    start = max((point for point in curve if point["step"] <= (1 - fraction) * last["step"]),
                key=lambda point: point["step"], default=curve[0])
    return start["step"], (start["test_loss"] - last["test_loss"]) / last["test_loss"]


def plot_time(rows, path, title, target=0.01):
    """Test loss against the training's wall-clock seconds, every run (the first seed's
    solid, the others' faint), and the first seed's uncompressed final loss + ``target``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    specs = list(dict.fromkeys(row["compressor"] for row in rows))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    first = min(row["seed"] for row in rows)
    for i, spec in enumerate(specs):
        for row in rows:
            if row["compressor"] != spec or not row["curve"][0].get("train_s"):
                continue
            own = row["seed"] == first
            ax.plot([p["train_s"] for p in row["curve"]], [p["test_loss"] for p in row["curve"]],
                    color=colours[i % len(colours)], alpha=1.0 if own else 0.3,
                    linestyle=":" if "framework=ddp" in spec else "-",
                    label=spec if own else None)
    base = next((row for row in rows if row["seed"] == first and row["framework"] == "torch"
                 and parse_spec(row["compressor"])[0] == "none"), None)
    if base:
        ax.axhline(base["test_loss"] * (1 + target), color="red", linewidth=0.7,
                   label=f"uncompressed final + {100 * target:g}% (seed {first})")
        ax.set_ylim(base["test_loss"] * 0.97, base["test_loss"] * 1.25)
    ax.set_xlabel("training wall-clock seconds (evaluations excluded)")
    ax.set_ylabel("test loss (nats per byte)")
    ax.legend(fontsize=8)
    ax.set_title(textwrap.fill(title, 110), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def smoothed(losses, curve):
    """Mean training loss over the steps since the previous evaluation, at each evaluation."""
    out, start = [], 0
    for point in curve:
        window = losses[start:point["step"]]
        out.append(sum(window) / len(window))
        start = point["step"]
    return out


def run_worker(worker, workers, worker_args, timeout=None, framework="torch", network=None):
    """jobs.run_local with another worker script (torchrun for DDP): rank 0's report. With
    ``network`` (an EmulatedNetwork of ``workers`` hosts) one rank on each emulated host, their
    collectives over its shaped links (as bandwidth.py runs them)."""
    env = worker_env()
    if network is not None:
        if framework == "ddp":
            master = (network.addresses[0], next(MASTER_PORTS))
            commands = [torchrun_command(worker, worker_args, nproc=1, nodes=workers,
                                         node_rank=host, master=master)
                        for host in range(workers)]
            done = network.run_on_hosts(commands, dict(env, GLOO_SOCKET_IFNAME="eth0"),
                                        timeout)
            done = subprocess.CompletedProcess(
                done[0].args, next((d.returncode for d in done if d.returncode), 0),
                "".join(d.stdout for d in done), "".join(d.stderr for d in done))
        else:
            command = horovodrun_command(workers, network.hosts_argument(workers), worker_args,
                                         ["--network-interfaces", "eth0"], worker=worker)
            done = network.horovodrun(command, env, timeout=timeout)
        return read_report(done, " ".join(worker_args))
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


def plot(rows, curves, path, title, accuracy_range=(80, 100), loss_ratio=False):
    """Training loss and test accuracy per bit width; ``loss_ratio``: test loss and its ratio
    to the uncompressed run's instead of accuracy (the language models')."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = [b for b in dict.fromkeys(row["bits"] for row in rows) if b not in ("32", "16")]
    panels = 3 if loss_ratio else 2
    fig, axes = plt.subplots(panels, max(1, len(widths)),
                             figsize=(6 * max(1, len(widths)), 4 * panels), squeeze=False)
    none = next((curves[row["compressor"]] for row in rows
                 if parse_spec(row["compressor"])[0] == "none"), None)
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
            if loss_ratio:
                axes[1][column].plot(steps, [p["test_loss"] for p in curve],
                                     label=row["compressor"], **style)
                if none:
                    base = {p["step"]: p["test_loss"] for p in none}
                    axes[2][column].plot(steps, [p["test_loss"] / base[p["step"]]
                                                 if p["step"] in base else float("nan")
                                                 for p in curve],
                                         label=row["compressor"], **style)
            else:
                axes[1][column].plot(steps, [100 * p["test_accuracy"] for p in curve],
                                     label=row["compressor"], **style)
        axes[0][column].set_yscale("log")
        width = f"{bits} bits" if bits.isdigit() else bits  # PowerSGD's: "rank R"
        axes[0][column].set_title(f"{width}: training loss")
        if loss_ratio:
            axes[1][column].set_title(f"{width}: test loss (nats per byte)")
            axes[1][column].set_yscale("log")
            axes[2][column].set_title(f"{width}: test loss / uncompressed test loss")
            axes[2][column].axhline(1.01, color="red", linewidth=0.5)
            axes[2][column].set_ylim(0.95, 1.15)
        else:
            axes[1][column].set_title(f"{width}: test accuracy (%)")
        axes[panels - 1][column].set_xlabel("step")
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
    parser.add_argument("--steps", type=int, help="default: the task's (400 digits, 300 char-lm, "
                        "800 transformer)")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--batch-size", type=int, help="per worker; default: the task's "
                        "(16 digits, 32 char-lm windows, 32 transformer windows)")
    parser.add_argument("--hidden", help="hidden widths; default: the task's (256,256 digits, "
                        "256 char-lm, 64 transformer)")
    parser.add_argument("--lr", type=float, help="default: the task's (0.05 digits, 0.5 char-lm, "
                        "0.01 transformer: AdamW's peak)")
    parser.add_argument("--lr-warmup", type=float, help="language models: fraction of the "
                        "steps of linear warm-up (default: the worker's, 0 char-lm, 0.05 "
                        "transformer)")
    parser.add_argument("--min-lr", type=float, help="language models: the cosine decay ends "
                        "at this fraction of --lr (default: the worker's, 1 (constant) char-lm, "
                        "0.1 transformer)")
    parser.add_argument("--decay-until", type=float, help="language models: fraction of the "
                        "steps at which the decay ends, the rest kept at --min-lr (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="run every configuration at each of these seeds (a spec's "
                        "seeds=N: at the first N); default: --seed")
    parser.add_argument("--target", type=float, default=0.01,
                        help="transformer: steps to the uncompressed run's final test loss "
                        "times 1 + this")
    parser.add_argument("--diagnose-every", type=int, default=0,
                        help="transformer: measure each layer's averaged-gradient error every "
                        "K steps (an extra uncompressed allreduce; training unchanged)")
    parser.add_argument("--rate-mbit", type=float, default=0,
                        help="run each job's ranks on emulated hosts (one rank each) whose "
                        "links are shaped to this rate per direction "
                        "(benchmarks/emulated_network.py; needs root); 0: loopback")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--from-runs", nargs="+", metavar="JSONL",
                        help="run nothing: the tables and plots of the runs saved in these "
                        "files (each run writes <out>/<name>_runs.jsonl as it goes); the other "
                        "arguments only name the task, outputs and --target")
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    args = parser.parse_args()
    task = TASKS[args.task]
    for key in ("steps", "batch_size", "hidden", "lr"):
        if getattr(args, key) is None:
            setattr(args, key, task[key])
    if args.seeds is None:
        args.seeds = [args.seed]
    if args.diagnose_every and args.task != "transformer":
        parser.error("--diagnose-every is the transformer task's")
    given = schedule_options(args)
    if args.task == "digits":
        if any(value is not None for value in given.values()):
            parser.error("--lr-warmup, --min-lr and --decay-until are the language models'")
    else:  # checked here with the worker's defaults, before any run starts
        defaults = task["schedule"]
        error = schedule.schedule_error(
            defaults["warmup"] if args.lr_warmup is None else args.lr_warmup,
            defaults["floor"] if args.min_lr is None else args.min_lr,
            1.0 if args.decay_until is None else args.decay_until)
        if error:
            parser.error(f"{args.task}: {error}")
    return args


def schedule_options(args):
    """The language-model workers' learning-rate schedule options given (None: the worker's
    default)."""
    return {"--lr-warmup": args.lr_warmup, "--min-lr": args.min_lr,
            "--decay-until": args.decay_until}


def schedule_text(rows, task):
    """The plots' words for the runs' learning-rate schedule (runs saved before the reports
    carried it: the task's worker's default)."""
    first = rows[0] if rows else {}
    floor = first.get("min_lr", task["schedule"]["floor"])
    until = first.get("decay_until", 1.0)
    if floor == 1:
        return ""
    return f" cosine to {floor:g}x" + (f" at {until:.0%} of the steps, then flat"
                                       if until < 1 else "")


def stem_for(args):
    """The output files' name: convergence[_char_lm|_transformer][_seed<N>]."""
    return "convergence" + {"char-lm": "_char_lm", "transformer": "_transformer"}.get(
        args.task, "") + (f"_seed{args.seeds[0]}" if args.seeds != [0] and
                          len(args.seeds) == 1 else "")


def main():
    args = parse_args()
    task = TASKS[args.task]
    os.makedirs(args.out, exist_ok=True)
    rows, curves, points, failed, layers = [], {}, [], [], []
    if args.from_runs:  # the tables and plots again, from runs saved before
        saved = []
        for path in args.from_runs:
            with open(path) as f:
                saved += [json.loads(line) for line in f if line.strip()]
        first = min(entry["seed"] for entry in saved)
        for entry in saved:
            add_run(entry["report"], entry["bits"], entry["spec"], entry["seed"],
                    entry["seed"] == first, rows, curves, points, layers)
        args.seeds = sorted({entry["seed"] for entry in saved})
        report = saved[0]["report"]
        args.steps, args.hidden, args.batch_size, args.lr, args.workers, args.rate_mbit = (
            report["steps"], report["hidden"], report["batch_size"], report["lr"],
            report["workers"], report.get("rate_mbit", 0))
        finish(args, task, rows, curves, points, failed, layers)
        return
    chosen = [(bits, *split_seeds(spec)) for bits, spec in
              configs(args.baselines, args.schemes, args.bits, args.extra_configs)]
    network = contextlib.nullcontext()
    if args.rate_mbit:
        from benchmarks.emulated_network import EmulatedNetwork, remove_stale_namespaces
        # SIGTERM ends the run like Ctrl-C, so the namespaces are removed either way
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        remove_stale_namespaces()
        network = EmulatedNetwork(args.workers, rate_mbit=args.rate_mbit)
    # every run's report as it comes, for --from-runs (a long run cut short keeps its runs);
    # appended, so that runs made in parts (several invocations) all stay
    saved = os.path.join(args.out, stem_for(args) + "_runs.jsonl")
    with network as network, open(saved, "a") as save:
        for index, seed in enumerate(args.seeds):
            for bits, spec, seed_count in chosen:
                if seed_count is not None and index >= seed_count:
                    continue
                report = run_config(args, task, spec, seed, failed, network)
                if report is None:
                    continue
                save.write(json.dumps({"bits": bits, "spec": spec, "seed": seed,
                                       "report": report}) + "\n")
                save.flush()
                add_run(report, bits, spec, seed, index == 0, rows, curves, points, layers)
    finish(args, task, rows, curves, points, failed, layers)


def add_run(report, bits, spec, seed, first, rows, curves, points, layers):
    """File one run's report: its evaluations in ``points``, its curve in ``curves`` (of the
    first seed), its per-layer statistics in ``layers``, the report in ``rows``."""
    curve = report.pop("curve")
    for point, loss in zip(curve, smoothed(report.pop("train_loss_per_step"), curve)):
        point["train_loss_window"] = loss
        points.append({"compressor": spec, "bits": bits, "seed": seed, **point})
    if first:
        curves[spec] = curve
    for name, stats in report.pop("layer_stats", {}).items():
        layers.append({"compressor": spec, "seed": seed, "parameter": name, **stats})
    tail = curve[-max(1, len(curve) // 10):]
    report.update(bits=bits, seed=seed, compressor=spec, curve=curve,
                  train_loss_end=sum(p["train_loss_window"] for p in tail) / len(tail))
    rows.append(report)
    print(f"  {spec}, seed {seed}: test accuracy {100 * report['test_accuracy']:.2f}%, "
          f"test loss {report['test_loss']:.4f} ({report['job_s']:.0f} s, load before "
          f"{report['load_before']:.1f})", flush=True)


def finish(args, task, rows, curves, points, failed, layers):
    """Ratios to uncompressed training, the CSVs, plots and tables."""
    transformer = args.task == "transformer"
    def none_row(framework, seed):
        return next((other for other in rows if other["framework"] == framework
                     and other["seed"] == seed
                     and parse_spec(other["compressor"])[0] == "none"), None)

    for row in rows:  # against the none row of the row's own framework (Horovod's, DDP's)
        base = none_row(row["framework"], row["seed"])
        if base is None and transformer:
            # the transformer worker's DDP and Horovod runs train the same model the same way
            # (uncompressed, the same losses to the last digit): a seed without DDP's none
            # aims at Horovod's
            base = none_row("torch", row["seed"])
        row["vs_none_pp"] = 100 * (row["test_accuracy"] - base["test_accuracy"]) if base else None
        row["vs_none_loss"] = row["test_loss"] / base["test_loss"] if base else None
        target = base["test_loss"] * (1 + args.target) if base else None
        row["steps_to_target"] = steps_to(row["curve"], target) if base else None
        # the training's own wall time (evaluations excluded) when it first got there
        row["s_to_target"] = (next((point.get("train_s") for point in row["curve"]
                                    if point["test_loss"] <= target), None) if base else None)
        row["s_per_step"] = row["train_s"] / row["steps"] if row.get("train_s") else None
    stem = stem_for(args)
    write_csv(os.path.join(args.out, stem + ".csv"), points)
    if layers:
        write_csv(os.path.join(args.out, stem + "_layers.csv"), layers)
    parameters = rows[0]["parameters"] if rows else 0
    if args.task == "digits":
        title = f"MLP 64-{args.hidden.replace(',', '-')}-10 ({parameters} parameters) on digits"
    elif transformer:
        title = (f"byte-level GPT, width {args.hidden} ({parameters} parameters) on Python "
                 f"stdlib source, AdamW lr {args.lr}{schedule_text(rows, task)}")
    else:
        title = (f"char GRU {args.hidden} ({parameters} parameters) on Python stdlib source, "
                 f"lr {args.lr}{schedule_text(rows, task)}")
    steps = rows[0].get("steps", args.steps) if rows else args.steps  # saved runs: theirs
    title += f", {args.workers} workers, batch {args.batch_size}/worker, {steps} steps"
    if len(args.seeds) > 1:
        title += f", seed {args.seeds[0]} of {len(args.seeds)}"
    elif args.seeds[0]:
        title += f", seed {args.seeds[0]}"
    if rows:
        plot([row for row in rows if row["seed"] == args.seeds[0]], curves,
             os.path.join(args.out, stem + ".png"), title, task["accuracy_range"],
             loss_ratio=transformer)
    if rows and args.rate_mbit:
        title += f", {args.rate_mbit:g} Mbit/s emulated links"
    # time to target: the transformer's table, and any language model's over emulated links
    timed = transformer or (args.task == "char-lm" and args.rate_mbit and
                            any(row.get("train_s") for row in rows))
    if rows and timed and any(row.get("train_s") for row in rows):
        plot_time(rows, os.path.join(args.out, stem + "_time.png"), title, args.target)
    print(f"\n{title}\n")
    print(markdown_table(rows, TRANSFORMER_COLUMNS if timed else COLUMNS))
    for row in rows:
        if parse_spec(row["compressor"])[0] == "none" and len(row["curve"]) > 1:
            step, gain = plateau(row["curve"])
            print(f"\n{row['compressor']}, seed {row['seed']}: test loss improved "
                  f"{100 * gain:.2f}% from step {step} to the last ({row['curve'][-1]['step']})")
    if len(args.seeds) > 1:
        print(f"\nOver seeds (vs none: test loss over uncompressed training's of the same "
              f"seed; steps to that run's final test loss x {1 + args.target:g}):\n")
        print(seed_summary(rows, args.target))
    for spec, reason in failed:
        print(f"\nFAILED {spec}: {reason}")
    print(f"\nwrote {os.path.join(args.out, stem + '.csv')} and {stem}.png")
    if failed:
        sys.exit(1)


def run_config(args, task, spec, seed, failed, network=None):
    """One run of ``spec`` at ``seed``: its report with job_s and framework added, or None
    (added to ``failed``) when it failed."""
    worker_args = ["--compressor", spec, "--steps", str(args.steps), "--warmup", "0",
                   "--eval-every", str(args.eval_every), "--batch-size",
                   str(args.batch_size), "--hidden", args.hidden, "--lr", str(args.lr),
                   "--seed", str(seed)]
    if args.diagnose_every:
        worker_args += ["--diagnose-every", str(args.diagnose_every)]
    for option, value in schedule_options(args).items():
        if value is not None:
            worker_args += [option, str(value)]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    framework = parse_spec(spec)[1].get("framework", "torch")
    try:
        report = run_worker(worker_for(task, framework), args.workers, worker_args,
                            timeout=args.timeout, framework=framework, network=network)
    except Exception as error:  # one broken scheme must not hide the others' results
        failed.append((f"{spec} (seed {seed})", str(error).splitlines()[0]))
        print(f"  {spec}, seed {seed}: FAILED: {str(error)[-1500:]}", flush=True)
        return None
    report["job_s"] = time.perf_counter() - start
    report["load_before"] = load
    report["rate_mbit"] = args.rate_mbit
    name = parse_spec(spec)[0]
    if report.get("compressor_bytes_per_step") is None and name in BASELINE_BYTES:
        report["compressor_bytes_per_step"] = BASELINE_BYTES[name] * report["parameters"]
    report["framework"] = framework
    return report


if __name__ == "__main__":
    main()
