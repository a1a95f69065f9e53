"""Runs under `horovodrun -np N`: per-tensor overrides and metrics with horovod.torch's stock
DistributedOptimizer and horovod_tnq's fused one.

Every rank computes its local gradients, allgathers them uncompressed for the true average, then
reduces them through each optimizer; writes OUT_DIR/rank<r>.json for
tests/horovodrun/test_overrides_metrics.py, and TensorBoard events under OUT_DIR/tb/rank<r>.
"""

import json
import os
import sys

import horovod.torch as hvd
import torch
from torch.utils.tensorboard import SummaryWriter

import horovod_tnq.torch as tnq
from horovod_tnq.torch import TNQCompressor, log_metrics

OUT_DIR = sys.argv[1]
OVERRIDES = {"embed.*": {"bits": 8}, "norm.*": None}


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(200, 64)
        self.norm = torch.nn.LayerNorm(64)
        self.fc = torch.nn.Linear(64, 512)

    def forward(self, tokens):
        return self.fc(self.norm(self.embed(tokens)))


def fresh_model():
    """The same model on every rank and in every phase (each optimizer hooks its own)."""
    torch.manual_seed(0)
    return Net()


def backward(model, rank):
    generator = torch.Generator().manual_seed(100 + rank)
    tokens = torch.randint(0, 200, (256,), generator=generator)
    target = torch.randn(256, 512, generator=generator)
    model.zero_grad()
    torch.nn.functional.mse_loss(model(tokens), target).backward()


def reduced_report(model, truth):
    """Per parameter: relative squared error of the reduced gradient, and whether it is exactly
    Horovod's uncompressed average."""
    report = {}
    for name, p in model.named_parameters():
        error = float((p.grad - truth[name]).double().pow(2).sum())
        report[name] = {"relative_error": error / float(truth[name].double().pow(2).sum()),
                        "squared_error": error,
                        "exact": bool(torch.allclose(p.grad, truth[name], rtol=1e-6,
                                                     atol=1e-9))}
    return report


def estimate_check(compressor, report, size):
    """Each tensor's error estimated by every rank, against its true error in the average:
    independent unbiased errors of N ranks add up, divided by N^2."""
    estimates = compressor.metrics()["tensors"]
    checks = {}
    for name, entry in report.items():
        record = estimates.get(name)
        if record is None or not record["squared_norm"]:
            continue
        gathered = hvd.allgather_object(record["squared_error"], name=f"estimate.{name}")
        checks[name] = {"estimated": sum(gathered) / size ** 2, "true": entry["squared_error"]}
    return checks


def main():
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    model = fresh_model()
    backward(model, rank)
    truth = {}
    for name, p in model.named_parameters():
        gathered = hvd.allgather(p.grad.unsqueeze(0).clone(), name=f"truth.{name}")
        truth[name] = gathered.mean(0)
    result = {"size": size}

    stock = TNQCompressor(bits=2, min_numel=0, overrides=OVERRIDES)
    model = fresh_model()
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0),
                                         named_parameters=model.named_parameters(),
                                         compression=stock)
    backward(model, rank)
    optimizer.synchronize()
    result["stock"] = reduced_report(model, truth)
    result["stock_metrics"] = stock.metrics()
    result["stock_estimates"] = estimate_check(stock, result["stock"], size)
    result["resolved"] = {name: None if config is None else config.bits
                          for name, config in stock.settings.resolved().items()}
    writer = SummaryWriter(os.path.join(OUT_DIR, "tb", f"rank{rank}"))
    log_metrics(writer, stock, step=1)
    writer.close()
    with optimizer.skip_synchronize():
        optimizer.step()

    fused_compressor = TNQCompressor(bits=2, min_numel=0, overrides=OVERRIDES)
    model = fresh_model()
    fused = tnq.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0),
                                     named_parameters=model.named_parameters(),
                                     compression=fused_compressor)
    backward(model, rank)
    fused.synchronize()
    result["fused"] = reduced_report(model, truth)
    result["fused_buckets"] = [[None if config is None else config.bits, len(bucket)]
                               for config, bucket in zip(fused._configs, fused._buckets)]
    result["fused_metrics"] = fused_compressor.metrics()
    with fused.skip_synchronize():
        fused.step()

    # ranks whose overrides differ: an error naming them on every rank, not a hang
    mismatched = TNQCompressor(bits=2, min_numel=0,
                               overrides={"embed.*": {"bits": 8 if rank == 0 else 6}})
    model = fresh_model()
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0),
                                         named_parameters=model.named_parameters(),
                                         compression=mismatched)
    backward(model, rank)
    try:
        optimizer.synchronize()
        result["mismatch"] = None
    except ValueError as error:
        result["mismatch"] = str(error)
    # ranks that name the parameters differently resolve other settings per bucket: an error
    # at the first step, not buckets whose collectives never pair
    model = fresh_model()
    named = model.named_parameters() if rank == 0 else None
    unnamed = tnq.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), named_parameters=named,
        compression=TNQCompressor(bits=2, min_numel=0, overrides={"*": None}))
    backward(model, rank)
    try:
        unnamed.synchronize()
        result["fused_mismatch"] = None
    except ValueError as error:
        result["fused_mismatch"] = str(error)
    hvd.allreduce(torch.zeros(1), name="done")  # no rank leaves while another still sends

    with open(os.path.join(OUT_DIR, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
