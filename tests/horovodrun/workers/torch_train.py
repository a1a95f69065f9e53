"""Runs under `horovodrun -np N`: trains a small MLP with hvd.DistributedOptimizer + TNQ.

Covers the stock optimizer paths (per-parameter hooks, grouped allreduce,
backward_passes_per_step, gradient_predivide_factor) and records, per step, a digest of all
parameters so the test can check every rank holds identical weights throughout.
"""

import copy
import hashlib
import json
import os
import sys

import horovod.torch as hvd
import torch

import horovod_tnq.torch as tnq
from horovod_tnq.torch import TNQCompressor

OUT_DIR = sys.argv[1]

CONFIGS = {
    "named": dict(compression=TNQCompressor(bits=3)),
    "class_accumulate_predivide": dict(compression=TNQCompressor, backward_passes_per_step=2,
                                       gradient_predivide_factor=2.0),
    "grouped": dict(compression=TNQCompressor(bits=4), groups=2),
    "error_feedback": dict(compression=TNQCompressor(bits=2, error_feedback=1.0)),
    "no_feedback_2bit": dict(compression=TNQCompressor(bits=2)),
    "reduce_scatter": dict(compression=TNQCompressor(bits=3, exchange="reduce-scatter",
                                                     error_feedback=1.0, min_numel=256)),
    "uncompressed": dict(),
    # adaptive Top-K at 1 bit per element (about 5% of the elements per step); error feedback
    # is its default, the second run turns it off
    "topk": dict(compression=TNQCompressor(scheme="topk", bits=1)),
    "topk_no_feedback": dict(compression=TNQCompressor(scheme="topk", bits=1,
                                                       error_feedback=0.0)),
    # sparse TNQ at 1 bit per element, the same way
    "tnq_sparse": dict(compression=TNQCompressor(scheme="tnq-sparse", bits=1)),
    "tnq_sparse_no_feedback": dict(compression=TNQCompressor(scheme="tnq-sparse", bits=1,
                                                             error_feedback=0.0)),
    "dqsgd": dict(compression=TNQCompressor(scheme="dqsgd", bits=8)),
    # the fused optimizer: a few buckets per step instead of one exchange per parameter
    "fused": dict(optimizer=tnq.DistributedOptimizer, compression=TNQCompressor(bits=3),
                  bucket_elements=5000),
    "fused_accumulate_sum": dict(optimizer=tnq.DistributedOptimizer,
                                 compression=TNQCompressor(bits=4, error_feedback=1.0),
                                 backward_passes_per_step=2, op=hvd.Sum),
    "fused_reduce_scatter": dict(optimizer=tnq.DistributedOptimizer,
                                 compression=TNQCompressor(bits=3, exchange="reduce-scatter",
                                                           error_feedback=1.0)),
}


def parameters_digest(model):
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


def train(name, options, steps=30):
    torch.manual_seed(0)  # same initial weights everywhere
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    options = dict(options)
    wrap = options.pop("optimizer", hvd.DistributedOptimizer)
    lr = 0.1 / hvd.size() if options.get("op") == hvd.Sum else 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    opt = wrap(opt, named_parameters=model.named_parameters(), **options)
    generator = torch.Generator().manual_seed(100 + hvd.rank())  # different data per rank
    teacher = torch.nn.Linear(32, 4)
    torch.nn.init.normal_(teacher.weight, generator=torch.Generator().manual_seed(1))
    passes = options.get("backward_passes_per_step", 1)
    losses, digests = [], []
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(passes):
            x = torch.randn(64, 32, generator=generator)
            y = teacher(x).argmax(1)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
        opt.step()
        losses.append(float(loss))
        digests.append(parameters_digest(model))
    compressor = options.get("compression")
    stats = compressor.metrics()["counters"] if hasattr(compressor, "metrics") else {}
    return {"losses": losses, "digests": digests,
            "compressed_per_step": stats.get("compressed_tensors", 0) / steps}


def checkpoint_resume(exchange, before=8, after=6):
    """Train, checkpoint (model, optimizer, compressor), train on; then restore the checkpoint
    into fresh objects and train the same steps again: the weights must come out identical."""
    teacher = torch.nn.Linear(32, 4)
    torch.nn.init.normal_(teacher.weight, generator=torch.Generator().manual_seed(1))

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(),
                                    torch.nn.Linear(128, 4))
        # min_numel=1: every tensor takes the compressed path, whose reduction order is fixed.
        # Horovod's own float allreduce is not bitwise reproducible with 3+ ranks: how tensors
        # are fused into one buffer (timing) decides the summation order of each element.
        compressor = TNQCompressor(bits=2, error_feedback=0.9, seed=5, min_numel=1,
                                   exchange=exchange)
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                       named_parameters=model.named_parameters(),
                                       compression=compressor)
        return model, opt, compressor

    def run(model, opt, steps):
        for step in steps:
            x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1000 * hvd.rank() +
                                                                              step))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), teacher(x).argmax(1)).backward()
            opt.step()
        return parameters_digest(model)

    model, opt, compressor = build()
    run(model, opt, range(before))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), compressor.state_dict()))
    continued = run(model, opt, range(before, before + after))
    model, opt, compressor = build()
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    compressor.load_state_dict(saved[2])
    resumed = run(model, opt, range(before, before + after))
    return {"continued": continued, "resumed": resumed,
            "residuals": sorted(saved[2]["residuals"])}


def fused_edge_cases(steps=5):
    """The fused optimizer with a parameter that only rank 0 uses (the others send zeros for
    it), and built with settings that differ by rank (refused on every rank)."""
    torch.manual_seed(0)
    trunk, heads = torch.nn.Linear(32, 64), torch.nn.ModuleList(
        [torch.nn.Linear(64, 4), torch.nn.Linear(64, 4)])
    model = torch.nn.ModuleDict({"trunk": trunk, "heads": heads})
    opt = tnq.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(),
                                   compression=TNQCompressor(bits=3, min_numel=100))
    generator = torch.Generator().manual_seed(hvd.rank())
    digests = []
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(16, 32, generator=generator)
        head = heads[0] if hvd.rank() == 0 else heads[1]
        head(torch.relu(trunk(x))).square().mean().backward()
        opt.step()
        digests.append(parameters_digest(model))
    other = torch.nn.Linear(32, 64)  # a model of its own: its hooks feed only this optimizer
    try:  # the ranks' check runs at the first step
        mismatched = tnq.DistributedOptimizer(torch.optim.SGD(other.parameters(), lr=0.1),
                                              compression=TNQCompressor(bits=2 + hvd.rank() % 2))
        other(torch.randn(16, 32, generator=generator)).square().mean().backward()
        mismatched.step()
        mismatch = {"raised": None}
    except ValueError as error:
        mismatch = {"raised": "ValueError", "message": str(error)}
    return {"unused_digests": digests, "mismatch": mismatch}


def main():
    hvd.init()
    report = {name: train(name, options) for name, options in CONFIGS.items()}
    report["fused_edge_cases"] = fused_edge_cases()
    report["checkpoint"] = checkpoint_resume("allgather")
    report["checkpoint_reduce_scatter"] = checkpoint_resume("reduce-scatter")
    with open(os.path.join(OUT_DIR, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
