"""Runs under `horovodrun -np N`: the GPU kernels' path of the PyTorch compressor (encode on the
tensor's device, payloads to Horovod, decode-and-sum on the device) against the host path.

Without a GPU the kernels run under Triton's interpreter on CPU tensors
(HOROVOD_TNQ_KERNELS_FOR_CPU_TENSORS=1); with one, on CUDA tensors. Every result must equal the
host path's bit for bit: the kernels make the core's bytes. Each rank writes OUT_DIR/rank<r>.json.
"""

import itertools
import json
import os
import sys
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import horovod.torch as hvd  # noqa: E402

from horovod_tnq.torch import DistributedOptimizer, TNQCompressor  # noqa: E402
from horovod_tnq.torch import optimizer as fused_module  # noqa: E402
from horovod_tnq.gpu import kernels  # noqa: E402
from horovod_tnq.torch import codecs  # noqa: E402
from common import FailingKernel  # noqa: E402

OUT_DIR = sys.argv[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# a tensor shorter than a bucket, one not a multiple of it, one sent as three parts
SIZES = {"short": 1500, "odd": 5000, "parts": 20000}
CASES = [("tnq-rht", 2, "allgather"), ("tnq-rht", 4, "allgather"), ("tnq", 3, "allgather"),
         ("tnq-rht", 3, "reduce-scatter"), ("tnq", 2, "reduce-scatter")]


def rank_input(name, dtype):
    generator = torch.Generator().manual_seed(100 * list(SIZES).index(name) + hvd.rank())
    return (torch.randn(SIZES[name], generator=generator) * 0.01).to(dtype).to(DEVICE)


def reduce_all(on_device, scheme, bits, exchange, dtype):
    """Each tensor allreduced (Average) by a fresh compressor: the same names and steps on
    both paths, so the same random streams."""
    os.environ[codecs.KERNELS_FOR_CPU_TENSORS] = "1" if on_device else "0"
    compressor = TNQCompressor(scheme=scheme, bits=bits, bucket_size=256, min_numel=1000,
                               part_elements=8192, exchange=exchange)
    results = {}
    for name in SIZES:
        results[name] = hvd.allreduce(rank_input(name, dtype), name=f"{scheme}.{bits}.{name}",
                                      compression=compressor)
    codec = type(compressor.codec_for(rank_input("short", dtype))).__name__
    return results, dict(compressor.metrics()["counters"], codec=codec)


def fused_step(on_device):
    """One step of the fused optimizer on a small model: its gradients after the step."""
    os.environ[codecs.KERNELS_FOR_CPU_TENSORS] = "1" if on_device else "0"
    # each fused optimizer of a process names its buckets apart ("fused", "fused1", ...), and
    # the names key the random streams: both paths must run as the process's first one
    fused_module._INSTANCES = itertools.count()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 10)).to(DEVICE)
    optimizer = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                     named_parameters=model.named_parameters(),
                                     compression=TNQCompressor(bits=3, min_numel=100))
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(hvd.rank())).to(DEVICE)
    model(x).square().mean().backward()
    optimizer.step()
    return [p.grad.cpu() for p in model.parameters()]


def fallback_case(broken_rank, broken, scheme, bits, exchange):
    """The kernels named ``broken`` fail on rank ``broken_rank`` only (the other rank keeps the
    kernels: the ranks exchange payloads made on different paths); the results against the
    host path's, and the horovod_tnq warnings each rank gave."""
    codecs.DeviceCodec.failure = None  # the kernels on again, as in a new process
    originals = {name: getattr(kernels, name) for name in broken}
    if hvd.rank() == broken_rank:
        for name, kernel in originals.items():
            setattr(kernels, name, FailingKernel(kernel))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            device, stats = reduce_all(True, scheme, bits, exchange, torch.float32)
    finally:
        for name, kernel in originals.items():
            setattr(kernels, name, kernel)
    host, _ = reduce_all(False, scheme, bits, exchange, torch.float32)
    return {"equal": all(torch.equal(device[n].cpu(), host[n].cpu()) for n in SIZES),
            "warnings": [str(w.message) for w in caught
                         if str(w.message).startswith("horovod_tnq:")],
            "codec_after": stats["codec"], "exchanges": stats[exchange]}


def main():
    hvd.init()
    report = {"device": DEVICE, "cases": {}}
    for scheme, bits, exchange in CASES:
        for dtype in (torch.float32, torch.float16, torch.float64):
            device, stats = reduce_all(True, scheme, bits, exchange, dtype)
            host, _ = reduce_all(False, scheme, bits, exchange, dtype)
            key = f"{scheme}-{bits}-{exchange}-{str(dtype).split('.')[1]}"
            report["cases"][key] = {
                "equal": all(torch.equal(device[n].cpu(), host[n].cpu()) for n in SIZES),
                "dtype_kept": all(device[n].dtype == dtype for n in SIZES),
                "device_kept": all(device[n].device.type == DEVICE for n in SIZES),
                "max_error": max(float((device[n].double().cpu() - host[n].double().cpu())
                                       .abs().max()) for n in SIZES),
                "payload_bytes": stats["payload_bytes"], "codec": stats["codec"],
                "exchanges": stats[exchange],
            }
    fused_device, fused_host = fused_step(True), fused_step(False)
    report["fused_equal"] = all(torch.equal(a, b) for a, b in zip(fused_device, fused_host))
    # a kernel failing on one rank, at its first encode (reduce-scatter: both rounds) or at its
    # first decode (allgather of parts: the same received bytes decoded on the host)
    report["fallback"] = {
        "encode": fallback_case(1, ["rht_encode_kernel"], "tnq-rht", 3, "reduce-scatter"),
        "decode": fallback_case(0, ["rht_decode_kernel"], "tnq-rht", 4, "allgather"),
    }
    with open(os.path.join(OUT_DIR, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
