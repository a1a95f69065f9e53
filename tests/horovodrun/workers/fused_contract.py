"""Runs under `horovodrun -np N` (N = 2 or 3): horovod_tnq's fused DistributedOptimizer in the
situations where Horovod's contract is easy to break, each run beside uncompressed
hvd.DistributedOptimizer on the same models and data:

- two_optimizers: two fused optimizers with a compressor each whose buckets are in flight
  together (a GAN's generator and discriminator, and SparseAdam with sparse_as_dense beside
  Adam), which must not collide on collective names;
- no_gradient: parameters frozen after the optimizer was built, or unused by every rank, or by
  one rank only; the first two must move exactly as uncompressed Horovod moves them;
- sparse: sparse embedding gradients, with and without sparse_as_dense;
- join: uneven data (the last rank stops early and calls hvd.join());
- process_set: an optimizer over a process set that leaves a rank out;
- mismatched_count: ranks that made different numbers of fused optimizers (last: it leaves
  collectives that never pair up in flight).

Usage: fused_contract.py OUT_DIR CASE[,CASE...]; each rank writes OUT_DIR/rank<r>.json.
hvd.join() needs HOROVOD_CACHE_CAPACITY=0 (docs/limits.md).
"""

import copy
import hashlib
import json
import os
import sys

import horovod.torch as hvd
import torch

import horovod_tnq.torch as tnq
from common import expect_error, relative_error

OUT_DIR, CASES = sys.argv[1], sys.argv[2].split(",")
os.environ["HOROVOD_DYNAMIC_PROCESS_SETS"] = "1"  # (process_set adds one after hvd.init())


def digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def named(model, prefix):
    # Horovod names each gradient's allreduce after its parameter: two models stepping
    # together need names of their own
    return [(f"{prefix}{name}", p) for name, p in model.named_parameters()]


def fused(optimizer, model, prefix="", **options):
    return tnq.DistributedOptimizer(optimizer, named_parameters=named(model, prefix),
                                    compression=tnq.TNQCompressor(bits=8), **options)


def uncompressed(optimizer, model, prefix="", **options):
    return hvd.DistributedOptimizer(optimizer, named_parameters=named(model, prefix), **options)


def batch(rank, step, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1000 * rank + step))


def two_optimizers(rank):
    """A GAN step: one backward reaches both models, so both optimizers' buckets are in flight
    together; then SparseAdam (sparse_as_dense) and Adam, each fused."""
    report = {}
    for wrap in (uncompressed, fused):
        torch.manual_seed(0)
        generator = torch.nn.Sequential(torch.nn.Linear(16, 128), torch.nn.Tanh(),
                                        torch.nn.Linear(128, 32))
        discriminator = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Tanh(),
                                            torch.nn.Linear(128, 1))
        g_opt = wrap(torch.optim.Adam(generator.parameters(), lr=1e-3), generator, "g.")
        d_opt = wrap(torch.optim.Adam(discriminator.parameters(), lr=1e-3), discriminator, "d.")
        for step in range(4):
            g_opt.zero_grad()
            d_opt.zero_grad()
            discriminator(generator(batch(rank, step, 8, 16))).mean().backward()
            g_opt.step()
            d_opt.step()
        report[wrap.__name__ + ".gan"] = torch.cat([flat(generator), flat(discriminator)])

        torch.manual_seed(1)
        embedding = torch.nn.Embedding(512, 16, sparse=True)
        head = torch.nn.Linear(16, 128)
        e_opt = wrap(torch.optim.SparseAdam(list(embedding.parameters()), lr=1e-2), embedding,
                     "e.", sparse_as_dense=True)
        h_opt = wrap(torch.optim.Adam(head.parameters(), lr=1e-2), head, "h.")
        for step in range(3):
            e_opt.zero_grad()
            h_opt.zero_grad()
            ids = torch.randint(0, 512, (32,), generator=torch.Generator().manual_seed(rank))
            head(embedding(ids)).pow(2).mean().backward()
            e_opt.step()
            h_opt.step()
        report[wrap.__name__ + ".sparse_adam"] = torch.cat([flat(embedding), flat(head)])
    start = {}
    for name in ("gan", "sparse_adam"):
        start[name] = {"error": relative_error(report["fused." + name],
                                               report["uncompressed." + name]),
                       "digest": digest([report["fused." + name]])}
    return start


class Gain(torch.nn.Module):
    def __init__(self, size):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(size))


class Layers(torch.nn.Module):
    """Layers with and without gradients. Their registration order is the fused bucket's
    layout, reversed: ``gate`` and ``unused_gain`` are small (exact zeros in runs of fewer
    than 32 are encoded like other values, docs/design.md) and sit between layers with
    gradients, where only the optimizer can tell that no rank had a gradient for them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.first = torch.nn.Linear(32, 64)
        self.gate = Gain(16)  # frozen after the optimizer is built
        self.last = torch.nn.Linear(64, 8)
        self.unused_gain = Gain(16)  # in no rank's forward
        self.rank0_skips = torch.nn.Linear(64, 64)  # not in rank 0's forward
        self.frozen = torch.nn.Linear(64, 64)  # frozen after the optimizer is built
        self.unused = torch.nn.Linear(64, 64)  # in no rank's forward

    def forward(self, x, rank):
        x = torch.tanh(self.first(x)) * self.gate.weight.repeat(4)
        x = torch.tanh(self.frozen(x))
        if rank != 0:
            x = x + torch.tanh(self.rank0_skips(x))
        return self.last(x)

    def freeze(self):
        self.frozen.requires_grad_(False)
        self.gate.requires_grad_(False)

    def layer(self, name):
        return flat(getattr(self, name))


def no_gradient(rank):
    """Adam (which turns any nonzero gradient into a full step) over parameters that get no
    gradient: frozen after the optimizer was built (from the first step, and after two steps,
    when Adam's momentum still moves them), or in no rank's forward; one layer is skipped by
    rank 0 only. Every parameter goes into one fused bucket with the others. Recorded: whether
    each layer's reduced gradient was exactly zero at every step from the freeze on, whether it
    moved, and its update's error against uncompressed Horovod's."""
    names = ("first", "gate", "last", "unused_gain", "rank0_skips", "frozen", "unused")
    report = {}
    for freeze_after in (0, 2):
        models, zero = {}, {}
        for wrap in (uncompressed, fused):
            model = Layers()
            optimizer = wrap(torch.optim.Adam(model.parameters(), lr=0.01), model)
            zero[wrap.__name__] = {name: True for name in names}
            for step in range(4):
                if step == freeze_after:
                    model.freeze()
                optimizer.zero_grad()
                out = model(batch(rank, step, 16, 32), rank)
                out.pow(2).mean().backward()
                optimizer.step()
                if step >= freeze_after:
                    for name in names:
                        zero[wrap.__name__][name] &= all(
                            p.grad is not None and not p.grad.any()
                            for p in getattr(model, name).parameters())
            models[wrap.__name__] = model
        plain, compressed, start = models["uncompressed"], models["fused"], Layers()
        report[f"freeze_after_{freeze_after}"] = {
            name: {"zero_gradient": zero["fused"][name],
                   "zero_gradient_uncompressed": zero["uncompressed"][name],
                   "moved": not torch.equal(compressed.layer(name), start.layer(name)),
                   "moved_uncompressed": not torch.equal(plain.layer(name), start.layer(name)),
                   "error": relative_error(compressed.layer(name) - start.layer(name),
                                           plain.layer(name) - start.layer(name)),
                   "digest": digest([compressed.layer(name)])}
            for name in names}
    return report


def sparse(rank):
    """An embedding with sparse gradients beside a dense layer: without sparse_as_dense the
    embedding's gradients go by Horovod's sparse allreduce, uncompressed, as in Horovod (so the
    embedding ends bit-identical to uncompressed Horovod's); with it they are compressed and
    handed back sparse, which SparseAdam requires."""
    report = {}
    for sparse_as_dense in (False, True):
        models = {}
        for wrap in (uncompressed, fused):
            torch.manual_seed(3)
            model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(300, 8, sparse=True),
                                         "dense": torch.nn.Linear(8, 256)})
            e_opt = wrap(torch.optim.SparseAdam(list(model["embed"].parameters()), lr=0.05),
                         model["embed"], "e.", sparse_as_dense=sparse_as_dense)
            d_opt = wrap(torch.optim.SGD(model["dense"].parameters(), lr=0.05), model["dense"],
                         "d.", sparse_as_dense=sparse_as_dense)
            for step in range(3):
                e_opt.zero_grad()
                d_opt.zero_grad()
                ids = torch.randint(0, 300, (20,),
                                    generator=torch.Generator().manual_seed(10 * rank + step))
                model["dense"](model["embed"](ids)).pow(2).mean().backward()
                e_opt.step()
                d_opt.step()
            models[wrap.__name__] = model
        plain, compressed = models["uncompressed"], models["fused"]
        report[f"sparse_as_dense_{sparse_as_dense}"] = {
            name: {"bit_identical": torch.equal(flat(compressed[name]), flat(plain[name])),
                   "error": relative_error(flat(compressed[name]) - flat(_start(name)),
                                           flat(plain[name]) - flat(_start(name))),
                   "digest": digest([flat(compressed[name])])}
            for name in ("embed", "dense")}
    return report


def _start(name):
    torch.manual_seed(3)
    start = {"embed": torch.nn.Embedding(300, 8, sparse=True), "dense": torch.nn.Linear(8, 256)}
    return start[name]


def join(rank, size):
    """Uneven data: the last rank takes 2 steps and joins, the others 5; uncompressed and fused
    from the same start. Horovod averages the active ranks' gradients with the joined ranks'
    zeros (it divides by the full size)."""
    steps = 2 if rank == size - 1 else 5
    models = {}
    torch.manual_seed(4)
    start = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    for wrap in (uncompressed, fused):
        model = copy.deepcopy(start)
        optimizer = wrap(torch.optim.SGD(model.parameters(), lr=0.5), model)
        for step in range(steps):
            optimizer.zero_grad()
            model(batch(rank, step, 16, 64)).pow(2).mean().backward()
            optimizer.step()
        last_joined = hvd.join()
        models[wrap.__name__] = model
    moved = {name: flat(model) - flat(start) for name, model in models.items()}
    return {"steps": steps, "last_joined": last_joined,
            "error": relative_error(moved["fused"], moved["uncompressed"]),
            "digest": digest([flat(models["fused"])])}


def process_set(rank, size):
    """An optimizer reducing over the even ranks only; the odd ones are outside its set (they
    build it too, as in Horovod's test, and step on their own gradients)."""
    evens = hvd.add_process_set([r for r in range(size) if r % 2 == 0])
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    optimizer = fused(torch.optim.SGD(model.parameters(), lr=0.5), model, process_set=evens)
    for step in range(3):
        optimizer.zero_grad()
        model(batch(rank, step, 16, 64)).pow(2).mean().backward()
        optimizer.step()
    report = {"digest": digest([flat(model)]), "in_set": rank % 2 == 0}
    hvd.remove_process_set(evens)
    report["removed"] = True
    return report


def mismatched_count(rank):
    """Rank 0 makes one fused optimizer more than the others before the one they step with:
    their buckets' collectives are named apart and never pair up, and the first step's check
    must raise on every rank instead of waiting on them."""
    model = torch.nn.Linear(64, 64)
    if rank == 0:
        fused(torch.optim.SGD(model.parameters(), lr=0.1), model)
    optimizer = fused(torch.optim.SGD(model.parameters(), lr=0.1), model)
    model(batch(rank, 0, 4, 64)).sum().backward()
    return expect_error(optimizer.step)


def main():
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    report = {"rank": rank, "size": size}
    cases = {"two_optimizers": lambda: two_optimizers(rank),
             "no_gradient": lambda: no_gradient(rank), "sparse": lambda: sparse(rank),
             "join": lambda: join(rank, size), "process_set": lambda: process_set(rank, size),
             "mismatched_count": lambda: mismatched_count(rank)}
    for case in sorted(CASES, key=lambda case: case == "mismatched_count"):  # (it goes last)
        report[case] = cases[case]()
    with open(os.path.join(OUT_DIR, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    # (mismatched_count left collectives in flight that no rank will pair: leave without
    # waiting for Horovod's shutdown)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
