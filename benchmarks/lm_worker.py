"""One worker of convergence.py's char-lm task (Horovod, or PyTorch DDP): a character-level LM.

gradients.py's ``CharModel`` (byte embedding, one GRU layer, linear output over the 256 byte
values) learns to predict the next byte of the source text of Python's own standard library
(gradients.py's ``stdlib_text()``), trained with SGD + momentum (at a constant ``--lr`` unless the
schedule options ask for a warm-up or a decay: benchmarks/schedule.py) through the stock
``hvd.DistributedOptimizer(..., compression=get_compressor(...))`` and the compressor named by a
spec (see jobs.py). The last ``--test-fraction`` of the text (whole other modules, since the
text is the library's files in name order) is held out. Each rank draws its own random windows
of the training text; every rank starts from the same initialisation.

Rank 0 prints one report line (JSON after jobs.REPORT_MARKER) with the fields convergence.py
reads, as digits_worker.py does: training loss per step (mean over ranks), test loss and
next-character accuracy on the held-out text at ``--eval-every`` steps and at the end, the
parameter count, and what the compressor handed to Horovod per step when it keeps such counts.

A spec with ``framework=ddp`` (``none``, ``fp16``, ``powersgd:rank=R``, or a horovod_tnq scheme
as ``tnq_hook``, e.g. ``tnq-rht:bits=2``; benchmarks/ddp.py) trains the same model, data and
steps with torch's DistributedDataParallel and that communication hook instead, started by
torchrun; its bytes are what the hook hands to torch.distributed per step, counted over the
steps after PowerSGD's 2 plain (uncompressed) ones.

    horovodrun -np 2 -H localhost:2 --gloo python -m benchmarks.lm_worker \
        --compressor tnq-rht:bits=2
"""

import argparse
import json
import time

import horovod.torch as hvd
import torch

from benchmarks.gradients import CharModel, stdlib_text
from benchmarks.jobs import REPORT_MARKER, parse_spec
from benchmarks.schedule import CHAR_LM, add_schedule_arguments, check_schedule, learning_rate
from benchmarks.worker_common import compressor_spec
from horovod_tnq.torch import get_compressor


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compressor", default="none", help="spec: name[:key=value,...]")
    parser.add_argument("--hidden", default="256", help="GRU width (one layer)")
    parser.add_argument("--embedding", type=int, default=64, help="byte embedding width")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=0,
                        help="accepted for convergence.py's common arguments; must be 0")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per worker")
    parser.add_argument("--length", type=int, default=64, help="characters per window")
    parser.add_argument("--lr", type=float, default=0.5)
    add_schedule_arguments(parser, **CHAR_LM)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--clip", type=float, default=1.0,
                        help="clip the averaged gradient's norm to this (0: off), as RNNs "
                        "trained with SGD usually are; after the exchange, so every rank clips "
                        "the same decoded gradient")
    parser.add_argument("--text-bytes", type=int, default=400_000,
                        help="bytes of standard library source to use")
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--test-windows", type=int, default=64,
                        help="held-out windows of 256 characters, evenly spaced")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=0, help="0: evaluate at the end only")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup != 0:
        parser.error(f"--steps must be >= 1 and --warmup 0, got {args.steps}, {args.warmup}")
    check_schedule(parser, args)
    return args


def split_text(text_bytes, test_fraction):
    """(training text, held-out text) as int64 tensors of byte values."""
    text = torch.from_numpy(stdlib_text(text_bytes).astype("int64"))
    cut = int(len(text) * (1 - test_fraction))
    return text[:cut], text[cut:]


def test_windows(text, count, length=256):
    """``count`` evenly spaced windows of ``length`` + 1 characters of ``text``."""
    starts = torch.linspace(0, len(text) - length - 1, count).long()
    return torch.stack([text[s: s + length + 1] for s in starts.tolist()])


def evaluate(model, windows):
    """(mean cross-entropy in nats, next-character accuracy) over every position of ``windows``;
    each window starts from an empty state, so its first characters are predicted blind."""
    with torch.no_grad():
        logits = model(windows[:, :-1]).reshape(-1, 256)
        target = windows[:, 1:].reshape(-1)
        loss = torch.nn.functional.cross_entropy(logits, target).item()
        accuracy = (logits.argmax(1) == target).float().mean().item()
    return loss, accuracy


class Training:
    """One way to train the model across ranks: ``model`` to call, the ``optimizer``,
    ``after_backward()`` (gradients averaged when it returns), ``step()``, ``handed()``: bytes
    handed to the collectives so far (None where not counted), ``allgather`` (an object per
    rank) and ``plain_steps``: leading steps that exchange uncompressed (PowerSGD's)."""

    def __init__(self, model, optimizer, after_backward, step, handed, allgather, plain_steps=0):
        self.model, self.optimizer = model, optimizer
        self.after_backward, self.step, self.handed = after_backward, step, handed
        self.allgather, self.plain_steps = allgather, plain_steps


def end_framework():
    """After main(): a ``framework=ddp`` worker leaves through ddp.end_process (PyTorch's Gloo
    can abort at interpreter exit); Horovod's shuts down at exit as usual."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from benchmarks import ddp
        ddp.end_process()


def start_framework(spec):
    """(framework, rank, size) of a language-model worker: torch.distributed under torchrun for
    a ``framework=ddp`` spec (benchmarks/ddp.py), else Horovod."""
    framework = parse_spec(spec)[1].get("framework", "torch")
    if framework == "ddp":
        from benchmarks import ddp
        rank, size = ddp.init_from_env()
    else:
        hvd.init()
        rank, size = hvd.rank(), hvd.size()
    return framework, rank, size


def train_and_evaluate(args, training, one_step, evaluate_model):
    """The language-model workers' loop: ``one_step(step)`` (returns the step's training loss)
    for steps 1..args.steps, timed (evaluations excluded), ``evaluate_model()`` (test loss and
    accuracy) every ``args.eval_every`` steps and at the end, the bytes ``training.handed()``
    counts before each step. Returns this rank's (losses, curve, summary for the allgather)."""
    handed = [training.handed()]  # so far, before each step and after the last
    losses, curve = [], []
    train_s = 0.0  # wall time of the training steps so far, evaluations excluded
    for step in range(1, args.steps + 1):
        started = time.perf_counter()
        losses.append(one_step(step))
        handed.append(training.handed())
        train_s += time.perf_counter() - started
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            test_loss, test_accuracy = evaluate_model()
            curve.append({"step": step, "test_loss": test_loss, "test_accuracy": test_accuracy,
                          "train_s": train_s})
    mine = {"losses": losses, "train_s": train_s}
    if handed[-1] is not None:
        # per step once compression runs: PowerSGD's plain first steps would otherwise count
        # as much as hundreds of its compressed ones
        skip = training.plain_steps if args.steps > training.plain_steps else 0
        mine["compressor_bytes_per_step"] = (handed[-1] - handed[skip]) / (args.steps - skip)
    return losses, curve, mine


def common_report(args, training, rank, mine, curve, model):
    """Every rank's summaries gathered; on rank 0 the report fields both language-model
    workers print (the training loss per step as the mean over ranks), None on the others."""
    everyone = training.allgather(mine)
    if rank != 0:
        return None
    train_loss = [sum(values) / len(values) for values in zip(*(r["losses"] for r in everyone))]
    for point in curve:
        point["train_loss"] = train_loss[point["step"] - 1]
    return {
        "compressor": args.compressor, "workers": len(everyone),
        "plain_steps": training.plain_steps,
        "train_s": max(r["train_s"] for r in everyone),
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch_size": args.batch_size, "steps": args.steps, "clip": args.clip,
        "lr": args.lr, "lr_warmup": args.lr_warmup, "min_lr": args.min_lr,
        "decay_until": args.decay_until,
        "compressor_bytes_per_step": (
            sum(r["compressor_bytes_per_step"] for r in everyone) / len(everyone)
            if "compressor_bytes_per_step" in mine else None),
        "train_loss": sum(train_loss[-10:]) / len(train_loss[-10:]),
        "test_loss": curve[-1]["test_loss"], "test_accuracy": curve[-1]["test_accuracy"],
        "curve": curve, "train_loss_per_step": train_loss,
    }


def horovod_training(name, options, model, args):
    compression = get_compressor(name, **options)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=compression)

    def step():
        with optimizer.skip_synchronize():
            optimizer.step()

    def handed():
        if not hasattr(compression, "metrics"):  # Horovod's own compressors count nothing
            return None
        counters = compression.metrics()["counters"]
        return counters["payload_bytes"] + counters["passthrough_bytes"]

    return Training(model, optimizer, optimizer.synchronize, step, handed, hvd.allgather_object)


def ddp_training(name, options, model, args):
    """DDP with the hook of the spec (benchmarks/ddp.py); PowerSGD from step 3 on, after
    the 2 plain steps PyTorch requires (its docs' advice for short runs: start early)."""
    from benchmarks import ddp
    ddp_model, counter = ddp.wrap(model, name, options, start_iter=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    return Training(ddp_model, optimizer, lambda: None, optimizer.step,
                    lambda: counter and counter.total, ddp.allgather_object,
                    plain_steps=2 if name == "powersgd" else 0)


def main():
    args = parse_args()
    framework, rank, _ = start_framework(args.compressor)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    name, options = compressor_spec(args.compressor, framework)

    train_text, test_text = split_text(args.text_bytes, args.test_fraction)
    held_out = test_windows(test_text, args.test_windows)
    model = CharModel(dim=args.embedding, hidden=int(args.hidden))
    training = (ddp_training if framework == "ddp" else horovod_training)(name, options, model,
                                                                          args)
    optimizer = training.optimizer
    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)

    def one_step(step):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        starts = torch.randint(0, len(train_text) - args.length - 1, (args.batch_size,),
                               generator=generator)
        window = torch.stack([train_text[s: s + args.length + 1] for s in starts.tolist()])
        optimizer.zero_grad()
        logits = training.model(window[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256),
                                                 window[:, 1:].reshape(-1))
        loss.backward()
        training.after_backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        training.step()
        return loss.item()

    _, curve, mine = train_and_evaluate(args, training, one_step,
                                        lambda: evaluate(model, held_out))
    report = common_report(args, training, rank, mine, curve, model)
    if report is None:
        return
    report.update(task="char-lm", framework=framework, hidden=args.hidden, length=args.length)
    print(REPORT_MARKER + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
    end_framework()
