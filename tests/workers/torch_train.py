"""Runs under `horovodrun -np N`: trains a small MLP with hvd.DistributedOptimizer + TNQ.

Covers the stock optimizer paths (per-parameter hooks, grouped allreduce,
backward_passes_per_step, gradient_predivide_factor) and records, per step, a digest of all
parameters so the test can check every rank holds identical weights throughout.
"""

import hashlib
import json
import os
import sys

import horovod.torch as hvd
import torch

from horovod_tnq.torch import TNQCompressor

OUT_DIR = sys.argv[1]

CONFIGS = {
    "named": dict(compression=TNQCompressor(bits=3)),
    "class_accumulate_predivide": dict(compression=TNQCompressor, backward_passes_per_step=2,
                                       gradient_predivide_factor=2.0),
    "grouped": dict(compression=TNQCompressor(bits=4), groups=2),
    "uncompressed": dict(),
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
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), **options)
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
    return {"losses": losses, "digests": digests}


def main():
    hvd.init()
    report = {name: train(name, options) for name, options in CONFIGS.items()}
    with open(os.path.join(OUT_DIR, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
