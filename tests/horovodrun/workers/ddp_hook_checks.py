"""Runs under `torchrun --nproc-per-node 2` (Gloo): the DDP hook (horovod_tnq.torch.ddp) on real
DistributedDataParallel models.

    ddp_hook_checks.py OUT_DIR

Each rank writes OUT_DIR/rank<r>.json with one entry per check (or its traceback):

* collectives: _DistCollectives' allgather of payloads of other sizes on each rank, its
  alltoall with uneven splits, allreduce_sum and reducescatter_sum (Horovod's split);
* matches_core: a one-parameter model, so that DDP's bucket is a chosen gradient: the hook's
  averaged gradient against the core's average of every rank's payloads (what the Horovod
  adapter computes from the same bytes), bit for bit, with overlap on and off;
* device_codec: the GPU codec's path (Triton's interpreter on CPU tensors without a GPU) gives
  the host codec's bits;
* training: a two-layer MLP in several DDP buckets, a few SGD steps (one with gradient
  accumulation under no_sync()) per setting: the parameters' digest on each rank;
* resume: error feedback across a checkpoint: the digest of the parameters after six steps
  uninterrupted, resumed from state_dict() after three, from a pickled state, and from a fresh
  hook state (which must differ).
"""

import io
import os
import pickle
import sys
import traceback
import warnings
from datetime import timedelta

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (device_codec)

import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from benchmarks.ddp import end_process  # noqa: E402
from ddp_hook_common import (DTYPES, OneParameter, core_average, digest, gradient,  # noqa: E402
                             same_bits, write_report)
from horovod_tnq.protocol import CompressorConfig  # noqa: E402
from horovod_tnq.torch import codecs  # noqa: E402
from horovod_tnq.torch.codecs import HostCodec  # noqa: E402
from horovod_tnq.torch.ddp import (BUCKET_NAME, TNQHookState, _DistCollectives,  # noqa: E402
                                   tnq_hook)

OUT_DIR = sys.argv[1]
CHECKS = {}


def check(function):
    CHECKS[function.__name__] = function
    return function


@check
def collectives(rank, size):
    group = dist.group.WORLD
    ops = _DistCollectives(HostCodec(TNQHookState(), torch.float32), group)
    mine = np.arange(3 + 2 * rank, dtype=np.uint8) + 10 * rank
    got = ops.wait(ops.allgather(mine, "x", group))
    want = np.concatenate([np.arange(3 + 2 * r, dtype=np.uint8) + 10 * r for r in range(size)])
    # rank r sends j + 1 + r elements of 10 r + j to rank j
    sent = np.concatenate([np.full(j + 1 + rank, 10 * rank + j, np.uint8) for j in range(size)])
    splits = np.array([j + 1 + rank for j in range(size)], np.int32)
    received = ops.wait(ops.alltoall(sent, splits, "y", group))
    expected = np.concatenate([np.full(rank + 1 + j, 10 * j + rank, np.uint8)
                               for j in range(size)])
    values = np.arange(7, dtype=np.float32) * (rank + 1)
    total = np.arange(7, dtype=np.float32) * sum(r + 1 for r in range(size))
    summed = ops.wait(ops.allreduce_sum(values, "z", group))
    scattered = ops.wait(ops.reducescatter_sum(values, "w", group))
    start = [0, 4][rank] if size == 2 else None  # Horovod's split of 7: 4 and 3
    return {"allgather": np.array_equal(got, want),
            "alltoall": np.array_equal(received, expected),
            "allreduce_sum": np.array_equal(summed, total),
            "reducescatter_sum": np.array_equal(scattered, total[start:start + 4 - rank]),
            "input_kept": np.array_equal(values, np.arange(7, dtype=np.float32) * (rank + 1))}


MATCH_CASES = {
    "bits3": dict(bits=3),
    "parts": dict(bits=2, part_elements=4096, bucket_size=256),
    "bfloat16": dict(bits=4, dtype="bfloat16"),
    "float64": dict(bits=3, dtype="float64"),
    "tnq": dict(bits=4, scheme="tnq"),
    "qsgd": dict(bits=4, scheme="qsgd"),
}
MATCH_NUMEL, MATCH_STEPS = 20011, 3


@check
def matches_core(rank, size):
    results = {}
    for case, settings in MATCH_CASES.items():
        settings = dict(settings)
        dtype = settings.pop("dtype", "float32")
        for overlap in (True, False):
            model = OneParameter(MATCH_NUMEL, DTYPES[dtype])
            ddp = DDP(model)
            state = TNQHookState(overlap=overlap, **settings)
            ddp.register_comm_hook(state, tnq_hook)
            config = CompressorConfig(**settings)
            same = []
            for step in range(MATCH_STEPS):
                model.zero_grad()
                ddp(gradient(rank, step, MATCH_NUMEL, dtype)).backward()
                reference = core_average(
                    [gradient(r, step, MATCH_NUMEL, dtype) for r in range(size)], config,
                    BUCKET_NAME.format(0), step, dtype)
                same.append(same_bits(model.weight.grad, reference))
            results[f"{case}/overlap={overlap}"] = {
                "same": same, "payload_bytes": state.metrics()["counters"]["payload_bytes"],
                "allgather": state.metrics()["counters"]["allgather"]}
    return results


DEVICE_CASES = {
    "allgather": dict(bits=3, bucket_size=256, part_elements=1280),
    "reduce-scatter": dict(bits=2, bucket_size=256, exchange="reduce-scatter"),
}
DEVICE_NUMEL, DEVICE_STEPS = 2500, 1


@check
def device_codec(rank, size):
    """The GPU codec's path (DeviceCodec) through the hook, under Triton's interpreter on CPU
    tensors where there is no GPU (KERNELS_FOR_CPU_TENSORS, as tests/horovodrun/
    test_device_path.py runs the Horovod adapter's): the same bits as the host codec's."""
    results = {}
    for case, settings in DEVICE_CASES.items():
        grads = {}
        modes = ((False, True), (True, True)) + (((True, False),) if case == "allgather" else ())
        for on_device, overlap in modes:
            os.environ[codecs.KERNELS_FOR_CPU_TENSORS] = "1" if on_device else "0"
            try:
                model = OneParameter(DEVICE_NUMEL, torch.float32)
                ddp = DDP(model)
                state = TNQHookState(overlap=overlap, **settings)
                ddp.register_comm_hook(state, tnq_hook)
                codec = type(state.codec_for(model.weight)).__name__
                steps = []
                for step in range(DEVICE_STEPS):
                    model.zero_grad()
                    ddp(gradient(rank, step, DEVICE_NUMEL, "float32")).backward()
                    steps.append(model.weight.grad.clone())
            finally:
                os.environ[codecs.KERNELS_FOR_CPU_TENSORS] = "1" if False else "0"
            grads[(on_device, overlap)] = (codec, steps)
        host_codec, host = grads.pop((False, True))
        results[case] = {"host_codec": host_codec,
                         **{f"device/overlap={overlap}": {
                             "codec": codec,
                             "same": [same_bits(a, b) for a, b in zip(steps, host)]}
                            for (_, overlap), (codec, steps) in grads.items()}}
    return results


class MLP(torch.nn.Module):
    def __init__(self, inputs=256, hidden=1024, outputs=64):
        super().__init__()
        self.first = torch.nn.Linear(inputs, hidden)
        self.second = torch.nn.Linear(hidden, outputs)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def batch(rank, step, inputs=256, outputs=64, rows=16):
    generator = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(rows, inputs, generator=generator)
    return x, torch.randn(rows, outputs, generator=generator)


def train(ddp, optimizer, rank, steps, accumulate_at=None):
    losses = []
    for step in steps:
        optimizer.zero_grad()
        if step == accumulate_at:  # two micro-batches, the first without communication
            x, y = batch(rank, step)
            with ddp.no_sync():
                torch.nn.functional.mse_loss(ddp(x[:8]), y[:8]).backward()
            loss = torch.nn.functional.mse_loss(ddp(x[8:]), y[8:])
        else:
            x, y = batch(rank, step)
            loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


TRAIN_CASES = {
    "none": None,
    "overlap": dict(bits=3),
    "blocking": dict(bits=3, overlap=False),
    "reduce-scatter": dict(bits=4, exchange="reduce-scatter"),
    # its second round issued at the next bucket's hook (overlap), or inside its own hook
    "reduce-scatter-blocking": dict(bits=4, exchange="reduce-scatter", overlap=False),
    "error-feedback": dict(bits=2, error_feedback=1.0),
}
TRAIN_STEPS = 4


@check
def training(rank, size):
    results = {}
    for case, settings in TRAIN_CASES.items():
        torch.manual_seed(0)
        model = MLP()
        ddp = DDP(model, bucket_cap_mb=0.25)  # (DDP's first bucket holds up to 1 MiB)
        state = None
        if settings is not None:
            state = TNQHookState(**settings)
            ddp.register_comm_hook(state, tnq_hook)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        losses = train(ddp, optimizer, rank, range(TRAIN_STEPS), accumulate_at=2)
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        results[case] = {"digest": digest([flat]), "losses": losses,
                         "flat": flat.tolist()[::97],  # a sample, to compare with "none"
                         "stats": None if state is None else state.metrics()["counters"],
                         "steps": None if state is None else dict(state.state.steps)}
    return results


OVERRIDES = {"first.*": {"bits": 8}, "second.bias": None}  # the rest at the state's 2 bits


@check
def overrides(rank, size):
    """Per-parameter settings in one DDP bucket: each parameter's averaged gradient against
    DDP's own (uncompressed) average of the same batch, over two steps (DDP rebuilds its
    buckets after the first)."""
    results = []
    models = []
    for settings in (None, dict(bits=2, overrides=OVERRIDES)):
        torch.manual_seed(0)
        model = MLP()
        ddp = DDP(model, bucket_cap_mb=64)
        if settings is not None:
            state = TNQHookState(named_parameters=model.named_parameters(), **settings)
            ddp.register_comm_hook(state, tnq_hook)
        models.append((model, ddp))
    for step in range(2):
        grads = []
        for model, ddp in models:
            model.zero_grad()
            x, y = batch(rank, step)
            torch.nn.functional.mse_loss(ddp(x), y).backward()
            grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        plain, hooked = grads
        results.append({name: {"nmse": float(((hooked[name] - plain[name]) ** 2).sum() /
                                             (plain[name] ** 2).sum()),
                               "equal": bool(torch.equal(hooked[name], plain[name]))}
                        for name in plain})
    metrics = state.metrics()["tensors"]
    return {"steps": results, "segments": sorted(metrics),
            "bits": {name: entry.get("bits_per_element") for name, entry in metrics.items()},
            "stats": state.metrics()["counters"]}


JOIN_CASES = {"none": None, "allgather": dict(bits=4, exchange="allgather"),
              "reduce-scatter": dict(bits=4, exchange="reduce-scatter"),
    # its second round issued at the next bucket's hook (overlap), or inside its own hook
    "reduce-scatter-blocking": dict(bits=4, exchange="reduce-scatter", overlap=False),
              "overrides": dict(bits=4, overrides={"second.*": {"bits": 8}, "first.bias": None})}


@check
def join(rank, size):
    """Uneven inputs under DDP's join(): rank 0 trains 5 steps, the others 3; DDP runs the
    hook on zero buckets for the ranks that ran out (its own average over the world size)."""
    results = {}
    for case, settings in JOIN_CASES.items():
        torch.manual_seed(0)
        model = MLP(64, 128, 8)
        ddp = DDP(model, bucket_cap_mb=0.02)  # several buckets after the rebuild
        if settings is not None:
            ddp.register_comm_hook(TNQHookState(**settings, named_parameters=(
                model.named_parameters() if "overrides" in settings else None)), tnq_hook)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        with ddp.join():
            for step in range(5 if rank == 0 else 3):
                optimizer.zero_grad()
                x, y = batch(rank, step, inputs=64, outputs=8)
                torch.nn.functional.mse_loss(ddp(x), y).backward()
                optimizer.step()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        results[case] = {"digest": digest([flat]), "flat": flat.tolist()[::7]}
    return results


@check
def static_graph(rank, size):
    """DDP(static_graph=True) with the hook (error feedback on), against the same without it."""
    results = {}
    for case, settings in (("none", None), ("hook", dict(bits=4, error_feedback=1.0))):
        torch.manual_seed(0)
        model = MLP(64, 128, 8)
        ddp = DDP(model, bucket_cap_mb=0.02, static_graph=True)
        state = None
        if settings is not None:
            state = TNQHookState(**settings)
            ddp.register_comm_hook(state, tnq_hook)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(4):
            optimizer.zero_grad()
            x, y = batch(rank, step, inputs=64, outputs=8)
            torch.nn.functional.mse_loss(ddp(x), y).backward()
            optimizer.step()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        results[case] = {"digest": digest([flat]), "flat": flat.tolist()[::7],
                         "steps": None if state is None else dict(state.state.steps)}
    return results


RESUME_SETTINGS = dict(bits=2, error_feedback=0.5)
RESUME_STEPS, RESUME_AT = 6, 3


def resumable(find_unused_parameters=True, state=None):
    torch.manual_seed(0)
    model = MLP(64, 128, 10)
    # find_unused_parameters: DDP keeps its first bucket layout (it rebuilds it otherwise)
    ddp = DDP(model, find_unused_parameters=find_unused_parameters)
    state = state or TNQHookState(**RESUME_SETTINGS)
    ddp.register_comm_hook(state, tnq_hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, ddp, state, optimizer


def small_batch(rank, step):
    x, y = batch(rank, step, 64, 10, 8)
    return x, y


def run_resume(rank, how, find_unused_parameters=True):
    """Parameters' digest after RESUME_STEPS steps, resumed at RESUME_AT as ``how`` says."""
    model, ddp, state, optimizer = resumable(find_unused_parameters)

    def steps(ddp, optimizer, which):
        for step in which:
            optimizer.zero_grad()
            x, y = small_batch(rank, step)
            torch.nn.functional.mse_loss(ddp(x), y).backward()
            optimizer.step()

    if how == "uninterrupted":
        steps(ddp, optimizer, range(RESUME_STEPS))
        return digest(list(model.parameters())), state
    steps(ddp, optimizer, range(RESUME_AT))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "hook": state.state_dict()}, buffer)
    pickled = pickle.dumps(state)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    state = TNQHookState(**RESUME_SETTINGS)
    if how == "state_dict":
        state.load_state_dict(saved["hook"])
    elif how == "pickle":
        state = pickle.loads(pickled)
    # else "fresh": the hook's state is not restored
    model, ddp, state, optimizer = resumable(find_unused_parameters, state)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    steps(ddp, optimizer, range(RESUME_AT, RESUME_STEPS))
    return digest(list(model.parameters())), state


@check
def resume(rank, size):
    results = {}
    for how in ("uninterrupted", "state_dict", "pickle", "fresh"):
        result, state = run_resume(rank, how)
        results[how] = {"digest": result, "steps": dict(state.state.steps),
                        "residuals": sorted(state.state.residuals)}
    with warnings.catch_warnings(record=True) as caught:  # DDP rebuilds its buckets
        warnings.simplefilter("always")
        result, state = run_resume(rank, "state_dict", find_unused_parameters=False)
    results["rebuilt_buckets"] = {
        "digest": result, "residuals": sorted(state.state.residuals),
        "warnings": [str(w.message) for w in caught if "horovod_tnq" in str(w.message)]}
    return results


def main():
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, size = dist.get_rank(), dist.get_world_size()
    names = sys.argv[2:] or list(CHECKS)
    report = {"rank": rank, "size": size}
    for name in names:
        try:
            report[name] = CHECKS[name](rank, size)
        except Exception:
            report[name] = {"error": traceback.format_exc()}
    write_report(OUT_DIR, rank, report)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    end_process()  # (not destroy_process_group(): PyTorch's Gloo can abort at exit)
