"""Runs under `horovodrun -np N`: uneven data across ranks with hvd.join(), compressed and not.

The last rank stops after SHORT steps and joins; the others run STEPS steps, then join. Each
step every rank reduces the same inputs three ways: uncompressed, by hvd.allreduce with a
TNQCompressor (both exchanges, Average and Sum, with and without error feedback), and by
hvd.DistributedOptimizer with and without one. Each rank writes OUT_DIR/rank<r>.json; the test
compares the compressed results with uncompressed Horovod's, and across the ranks still active.
It also records what uncompressed Horovod does under join (how Average divides, whether
allgather and alltoall run).
"""

import hashlib
import json
import os
import sys

import horovod.torch as hvd
import numpy as np
import torch

from horovod_tnq.torch import TNQCompressor
from common import expect_error, relative_error

OUT_DIR = sys.argv[1]
STEPS, SHORT = 4, 2
NUMEL = 4096
EXCHANGES = ("allgather", "reduce-scatter")


def digest(tensor):
    return hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()


def rank_input(rank, step, salt=0):
    x = np.random.default_rng([salt, rank, step]).laplace(scale=0.01, size=NUMEL)
    return torch.from_numpy(x.astype(np.float32))


def direct_steps(rank, size, steps):
    """hvd.allreduce with and without compression, each exchange and op."""
    records = []
    compressors = {(exchange, feedback): TNQCompressor(bits=8, exchange=exchange,
                                                       error_feedback=feedback, min_numel=16)
                   for exchange in EXCHANGES for feedback in (0.0, 1.0)}
    for step in range(steps):
        x = rank_input(rank, step)
        active = range(size) if step < SHORT else range(size - 1)
        active_sum = sum(rank_input(r, step).double() for r in active)
        for op_name, op in (("average", hvd.Average), ("sum", hvd.Sum)):
            plain = hvd.allreduce(x, name=f"plain.{op_name}", op=op)
            # what Horovod divides by under join: the full size, or the ranks still active
            record = {"step": step, "op": op_name, "joined": step >= SHORT,
                      "plain_over_active_sum": float(plain.double().norm() /
                                                     active_sum.norm())}
            for (exchange, feedback), compressor in compressors.items():
                key = f"{exchange}.ef{feedback:g}"
                result = hvd.allreduce(x, name=f"tnq.{key}.{op_name}", op=op,
                                       compression=compressor)
                record[key] = {"error": relative_error(result, plain), "digest": digest(result)}
            records.append(record)
    return records


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))


def optimizer_steps(rank, steps):
    """The stock hvd.DistributedOptimizer, uncompressed and with a TNQCompressor per exchange:
    the parameters after ``steps`` steps."""
    compressions = {"plain": None, **{exchange: TNQCompressor(bits=8, exchange=exchange,
                                                              min_numel=16)
                                      for exchange in EXCHANGES}}
    parameters = {}
    for key, compression in compressions.items():
        net = model()
        options = {} if compression is None else {"compression": compression}
        optimizer = hvd.DistributedOptimizer(
            torch.optim.SGD(net.parameters(), lr=0.5),
            named_parameters=[(f"{key}.{n}", p) for n, p in net.named_parameters()], **options)
        for step in range(steps):
            generator = torch.Generator().manual_seed(100 * rank + step)
            inputs = torch.randn(16, 64, generator=generator)
            targets = torch.randn(16, 8, generator=generator)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(net(inputs), targets).backward()
            optimizer.step()
        hvd.join()
        parameters[key] = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        start = torch.cat([p.detach().reshape(-1) for p in model().parameters()])
        parameters[key + ".moved"] = parameters[key] - start
    return {
        exchange: {"error": relative_error(parameters[exchange + ".moved"],
                                           parameters["plain.moved"]),
                   "digest": digest(parameters[exchange])}
        for exchange in EXCHANGES}


def uncompressed_collectives_under_join(rank, size):
    """What Horovod itself does with an allgather and an alltoall while the last rank has
    joined."""
    if rank == size - 1:
        hvd.join()
        return {}
    x = torch.ones(size)  # an alltoall without splits needs a multiple of the size
    report = {"allgather": expect_error(lambda: hvd.allgather(x, name="plain.allgather")),
              "alltoall": expect_error(lambda: hvd.alltoall(x, name="plain.alltoall"))}
    hvd.join()
    return report


def main():
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    steps = SHORT if rank == size - 1 else STEPS
    report = {"rank": rank, "size": size, "steps": steps}
    report["direct"] = direct_steps(rank, size, steps)
    hvd.join()
    report["optimizer"] = optimizer_steps(rank, steps)
    report["uncompressed"] = uncompressed_collectives_under_join(rank, size)
    with open(os.path.join(OUT_DIR, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
