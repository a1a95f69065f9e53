"""Runs under `horovodrun -np 2`: what a compressor keeps per tensor, with stock horovod.torch.

1. A GAN-like pair: two models whose parameters have the same names, each with a stock
   hvd.DistributedOptimizer, given one error-feedback compressor (also with num_groups=1), or
   one compressor each, or none; the updates each run made.
2. Unnamed allreduces: `hvd.allreduce(t, compression=c)` without a name, many times, with error
   feedback; what the compressor holds afterwards.

Writes OUT_DIR/rank<r>.json for tests/horovodrun/test_shared_state.py.
"""

import json
import os
import sys
import warnings

import horovod.torch as hvd
import torch

from horovod_tnq.torch import TNQCompressor

OUT_DIR = sys.argv[1]
STEPS = 20
UNNAMED_CALLS = int(sys.argv[2]) if len(sys.argv) > 2 else 1000


def model(seed):
    """The generator (seed 1) and the discriminator (seed 2): one architecture, so one set of
    parameter names ("0.weight", "0.bias", "2.weight", "2.bias")."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 32))


def flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def train(compressions, **options):
    """Alternate steps of the two models (one compression each, maybe the same; ``options``
    for hvd.DistributedOptimizer); their updates (final minus initial parameters)."""
    models = [model(1), model(2)]
    optimizers = [hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1),
                                           named_parameters=m.named_parameters(),
                                           compression=c, **options)
                  for m, c in zip(models, compressions)]
    initial = [flat(m) for m in models]
    for step in range(STEPS):
        for index, (m, optimizer) in enumerate(zip(models, optimizers)):
            data = torch.Generator().manual_seed(1000 * step + 10 * index + hvd.rank())
            # the discriminator's gradients larger, as a GAN's two losses differ
            inputs = torch.randn(32, 64, generator=data)
            targets = torch.randn(32, 32, generator=data) * (1 + 9 * index)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(m(inputs), targets).backward()
            optimizer.step()
    return [flat(m) - start for m, start in zip(models, initial)]


def gan_report():
    exact = train([hvd.Compression.none] * 2)
    shared, grouped = TNQCompressor(error_feedback=1.0), TNQCompressor(error_feedback=1.0)
    runs = {"shared": train([shared, shared]),
            "each": train([TNQCompressor(error_feedback=1.0), TNQCompressor(error_feedback=1.0)]),
            # one grouped allreduce per model: its tensors share one Horovod name
            "grouped": train([grouped, grouped], num_groups=1)}
    report = {"steps": dict(shared.state.steps), "grouped_steps": dict(grouped.state.steps)}
    for run, updates in runs.items():
        report[run] = [float((u - e).norm() / e.norm()) for u, e in zip(updates, exact)]
    return report


def unnamed_report():
    compressor = TNQCompressor(error_feedback=1.0)
    torch.manual_seed(7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for call in range(UNNAMED_CALLS):
            tensor = torch.randn(2048) * (hvd.rank() + 1)
            reduced = hvd.allreduce(tensor, compression=compressor)
    truth = hvd.allgather(tensor[None]).mean(0)
    state = compressor.state
    entries = {"steps": len(state.steps), "residuals": len(state.residuals),
               "metrics": sorted(compressor.metrics()["tensors"]),
               "in_flight": len(state.namer._in_flight) + len(compressor._in_flight)}
    exchanges = compressor.metrics()["total"]["exchanges"]
    # a named tensor beside them keeps its residual
    for _ in range(2):
        hvd.allreduce(torch.randn(2048), name="named", compression=compressor)
    return {"entries": entries, "anonymous": state.namer.anonymous,
            "exchanges": exchanges,
            "warnings": [str(w.message) for w in caught if "named tensors" in str(w.message)],
            "relative_error": float((reduced - truth).norm() / truth.norm()),
            "named_residuals": sorted(state.residuals), "named_steps": dict(state.steps)}


def main():
    hvd.init()
    report = {"gan": gan_report(), "unnamed": unnamed_report()}
    with open(os.path.join(OUT_DIR, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
