"""One worker of convergence.py's transformer task: a GPT-style decoder trained with AdamW.

examples/train_transformer.py's ``CharTransformer`` (byte embedding, learned positions, pre-norm
causal self-attention blocks, a linear output over the 256 byte values; one implementation,
imported from there) learns to predict the next byte of Python's standard-library source
(lm_worker.split_text: the last ``--test-fraction`` of the text, whole other modules, is held
out). It trains as people train transformers: AdamW (betas 0.9/0.95, weight decay on the
matrices only), a linear warm-up to ``--lr`` over ``--lr-warmup`` of the steps, then cosine
decay to a tenth of it (at the last step, or at ``--decay-until`` of the steps, the rest then
keeping that rate: benchmarks/schedule.py), the averaged gradient's norm clipped to
``--clip`` after the exchange, through the stock
``hvd.DistributedOptimizer(..., compression=get_compressor(...))`` with the compressor named
by a spec (see jobs.py). Each rank draws its own random windows of the
training text; every rank starts from the same initialisation.

Beyond jobs.py's options a spec may carry ``overrides=...``, TNQCompressor's per-layer
settings: ``overrides=docs`` for docs/overrides.md's recommendation (the example's OVERRIDES:
embedding and output head at 8 bits, LayerNorms uncompressed), or ``pattern@bits`` terms joined
by ``+`` (``@none``: uncompressed), e.g. ``tnq-rht:bits=2,overrides=embed.*@8+head.*@none``.

Rank 0 prints one report line (JSON after jobs.REPORT_MARKER) with the fields convergence.py
reads, as lm_worker.py does (training loss per step, test loss and next-byte accuracy on the
held-out text at ``--eval-every`` steps and at the end, parameters, bytes handed to Horovod per
step), and, under "layer_stats", per parameter: its size, its share of the gradient's squared norm,
for TNQ's compressors the estimated quantization error summed over the run
(``compressor.metrics()``: relative error and share of the model's error, this rank's gradients)
and bits per element, and AdamW's second-moment estimate at the end (mean of ``exp_avg_sq``, to
compare across runs: quantization noise adds its variance to it); "(model)" sums them over
the parameters. ``--diagnose-every K``
also measures, every K steps, the true error of the averaged gradient per parameter against an
extra uncompressed allreduce of the local gradients (``measured_relative_error``).

    horovodrun -np 2 -H localhost:2 --gloo python -m benchmarks.transformer_worker \
        --compressor tnq-rht:bits=2 --steps 100
"""

import argparse
import json

import horovod.torch as hvd
import torch

from benchmarks.jobs import REPORT_MARKER
from benchmarks.lm_worker import (common_report, end_framework, evaluate, split_text,
                                  start_framework, test_windows, train_and_evaluate)
from benchmarks.schedule import TRANSFORMER, add_schedule_arguments, check_schedule, learning_rate
from benchmarks.worker_common import compressor_spec
from examples.train_transformer import OVERRIDES, CharTransformer
import horovod_tnq.torch as tnq
from horovod_tnq.torch import get_compressor


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compressor", default="none", help="spec: name[:key=value,...]")
    parser.add_argument("--hidden", default="64", help="model width")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=64, help="bytes per window")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--warmup", type=int, default=0,
                        help="accepted for convergence.py's common arguments; must be 0")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per worker")
    parser.add_argument("--lr", type=float, default=1e-2, help="peak learning rate")
    add_schedule_arguments(parser, **TRANSFORMER)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=1.0,
                        help="clip the averaged gradient's norm to this (0: off), after the "
                        "exchange, so every rank clips the same decoded gradient")
    parser.add_argument("--text-bytes", type=int, default=2_000_000,
                        help="bytes of standard library source to use")
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--test-windows", type=int, default=256,
                        help="held-out windows of --context characters, evenly spaced")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=0, help="0: evaluate at the end only")
    parser.add_argument("--diagnose-every", type=int, default=0,
                        help="measure the averaged gradient's error per parameter every K "
                        "steps against an extra uncompressed allreduce (0: off)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup != 0:
        parser.error(f"--steps must be >= 1 and --warmup 0, got {args.steps}, {args.warmup}")
    check_schedule(parser, args)
    return args


def parse_overrides(text):
    """TNQCompressor's overrides from a spec's ``overrides=`` value (see the docstring)."""
    if text == "docs":
        return dict(OVERRIDES)
    overrides = {}
    for term in text.split("+"):
        pattern, at, bits = term.partition("@")
        if not at or not pattern:
            raise ValueError(f"overrides term {term!r} is not pattern@bits or pattern@none")
        overrides[pattern] = None if bits == "none" else {"bits": int(bits)}
    return overrides


def adamw(model, args):
    """AdamW as GPT-style models are trained: weight decay on the matrices (embeddings
    included), none on biases and LayerNorm parameters."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.95))


class HorovodTraining:
    """Horovod's DistributedOptimizer (``fused``: horovod_tnq's fused one) around AdamW with
    the spec's compressor: ``model`` to call, ``synchronize()`` (gradients averaged when it
    returns), ``step()``, ``handed()`` (bytes handed to Horovod so far, None where not
    counted), ``metrics`` (TNQ's, else None) and ``allgather``."""

    framework = "torch"

    def __init__(self, model, args, name, options):
        fused = bool(options.pop("fused", 0))
        self.compression = get_compressor(name, **options)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        wrap = tnq.DistributedOptimizer if fused else hvd.DistributedOptimizer
        self.model = model
        self.optimizer = wrap(adamw(model, args), named_parameters=list(model.named_parameters()),
                              compression=self.compression)
        self.metrics = getattr(self.compression, "metrics", None)  # TNQ's; none for Horovod's
        self.allgather = hvd.allgather_object
        self.plain_steps = 0

    def synchronize(self):
        self.optimizer.synchronize()

    def step(self):
        with self.optimizer.skip_synchronize():
            self.optimizer.step()

    def handed(self):
        if not hasattr(self.compression, "metrics"):  # Horovod's own compressors count nothing
            return None
        counters = self.compression.metrics()["counters"]
        return counters["payload_bytes"] + counters["passthrough_bytes"]

    def allreduce(self, tensor, name):
        return hvd.allreduce(tensor, op=hvd.Average, name=name,
                             compression=hvd.Compression.none)


class DDPTraining(HorovodTraining):
    """PyTorch DistributedDataParallel with a hook of benchmarks/ddp.py: PyTorch's none, fp16,
    or PowerSGD (error feedback and warm start on) from step ``start_iter`` on, by default the
    end of the learning-rate warm-up (PyTorch's docs and the PowerSGD paper: compress once the
    early, fast-changing steps are over), or for a TNQ scheme name horovod_tnq's own tnq_hook.
    The gradients are averaged when backward returns."""

    framework = "ddp"

    def __init__(self, model, args, name, options):
        from benchmarks import ddp
        self.optimizer = adamw(model, args)
        self.metrics = None
        self.allgather = ddp.allgather_object
        start = int(options.pop("start_iter", warmup_steps(args)))
        # PyTorch's hooks, or horovod_tnq's tnq_hook for a TNQ scheme name (ddp.wrap)
        self.model, self.counter = ddp.wrap(model, name, options, start_iter=start)
        self.plain_steps = max(2, start) if name == "powersgd" else 0

    def synchronize(self):
        pass

    def step(self):
        self.optimizer.step()

    def handed(self):
        return self.counter and self.counter.total

    def allreduce(self, tensor, name):
        raise ValueError("--diagnose-every measures Horovod's exchange, not DDP's")


def warmup_steps(args):
    return max(1, round(args.lr_warmup * args.steps))


def main():
    args = parse_args()
    framework, rank, _ = start_framework(args.compressor)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    name, options = compressor_spec(args.compressor, framework)
    if name not in ("none", "fp16", "powersgd"):
        options.setdefault("seed", args.seed)  # the compressor's random rounding
    if "overrides" in options:
        options["overrides"] = parse_overrides(str(options["overrides"]))

    train_text, test_text = split_text(args.text_bytes, args.test_fraction)
    held_out = test_windows(test_text, args.test_windows, length=args.context)
    model = CharTransformer(dim=int(args.hidden), heads=args.heads, layers=args.layers,
                            context=args.context)
    training = (DDPTraining if framework == "ddp" else HorovodTraining)(model, args, name,
                                                                       options)
    optimizer = training.optimizer
    named = list(model.named_parameters())
    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)
    metrics = training.metrics

    # per parameter, summed over the run: squared norm of the averaged gradient, and (TNQ)
    # the compressor's squared error and squared norm of this rank's gradient and its bits
    layers = {n: {"numel": p.numel(), "grad_sq": 0.0, "squared_error": 0.0,
                  "squared_norm": 0.0, "bits": 0.0, "exchanges": 0,
                  "measured_error": 0.0, "measured_norm": 0.0, "adam_error": 0.0,
                  "adam_norm": 0.0} for n, p in named}

    def one_step(step):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        starts = torch.randint(0, len(train_text) - args.context - 1, (args.batch_size,),
                               generator=generator)
        window = torch.stack([train_text[s: s + args.context + 1] for s in starts.tolist()])
        optimizer.zero_grad()
        logits = training.model(window[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256),
                                                 window[:, 1:].reshape(-1))
        loss.backward()
        # (Horovod's runs only: under DDP the gradients are averaged when backward returns)
        diagnose = (args.diagnose_every and training.framework != "ddp"
                    and step % args.diagnose_every == 0)
        if diagnose:  # the local gradients, before synchronize() replaces them
            local = [p.grad.detach().clone() for _, p in named]
        training.synchronize()
        records = metrics()["tensors"] if metrics is not None else {}
        if diagnose:
            for (n, p), grad in zip(named, local):
                true = training.allreduce(grad, f"diagnose.{n}")
                # only tensors the compressor quantized: Horovod averages the others in place,
                # so their copy above may already hold (part of) the average
                if not records.get(n, {}).get("compressed_elements"):
                    continue
                error = (p.grad - true).pow(2)
                layers[n]["measured_error"] += error.sum().item()
                layers[n]["measured_norm"] += true.pow(2).sum().item()
                # the same error as Adam sees it: each coordinate over its second-moment
                # estimate's square root (before this step's update)
                v = optimizer.state.get(p, {}).get("exp_avg_sq")
                if v is not None:
                    layers[n]["adam_error"] += (error / (v + 1e-16)).sum().item()
                    layers[n]["adam_norm"] += (true.pow(2) / (v + 1e-16)).sum().item()
        for n, p in named:
            layers[n]["grad_sq"] += p.grad.pow(2).sum().item()
        for n, record in records.items():
            if n in layers and record["compressed_elements"]:
                entry = layers[n]
                entry["squared_error"] += record["squared_error"]
                entry["squared_norm"] += record["squared_norm"]
                entry["bits"] += record["bits_per_element"]
                entry["exchanges"] += 1
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        training.step()
        return loss.item()

    _, curve, mine = train_and_evaluate(args, training, one_step,
                                        lambda: evaluate(model, held_out))
    report = common_report(args, training, rank, mine, curve, model)
    if report is None:
        return
    total_grad_sq = sum(entry["grad_sq"] for entry in layers.values())
    total_error = sum(entry["squared_error"] for entry in layers.values())
    report_layers = {}
    for n, p in named:
        entry = layers[n]
        state = optimizer.state.get(p, {})
        report_layers[n] = {
            "numel": entry["numel"],
            "grad_share": entry["grad_sq"] / total_grad_sq if total_grad_sq else None,
            "relative_error": (entry["squared_error"] / entry["squared_norm"]
                               if entry["squared_norm"] else None),
            "error_share": entry["squared_error"] / total_error if total_error else None,
            "bits_per_element": (entry["bits"] / entry["exchanges"]
                                 if entry["exchanges"] else None),
            "measured_relative_error": (entry["measured_error"] / entry["measured_norm"]
                                        if entry["measured_norm"] else None),
            "adam_relative_error": (entry["adam_error"] / entry["adam_norm"]
                                    if entry["adam_norm"] else None),
            "adam_exp_avg_sq": (state["exp_avg_sq"].mean().item()
                                if "exp_avg_sq" in state else None),
        }
    report.update(task="transformer", framework=training.framework, hidden=args.hidden,
                  layers=args.layers, heads=args.heads, context=args.context,
                  layer_stats=report_layers)
    # the whole model's, as a row "(model)" of layer_stats: every layer's squared errors over
    # every layer's squared norms
    whole = {"numel": report["parameters"]}
    for key, error, norm in (("relative_error", "squared_error", "squared_norm"),
                             ("measured_relative_error", "measured_error", "measured_norm"),
                             ("adam_relative_error", "adam_error", "adam_norm")):
        norms = sum(entry[norm] for entry in layers.values())
        whole[key] = sum(entry[error] for entry in layers.values()) / norms if norms else None
    report_layers["(model)"] = whole
    print(REPORT_MARKER + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
    end_framework()
