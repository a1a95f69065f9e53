"""What the DDP hook's workers share (imported as a sibling module): a model whose gradient is
a chosen tensor, each rank's test gradients, the core's own average of them (what the Horovod
adapter computes from the same bytes), and writing a rank's report."""

import hashlib
import json
import os

import numpy as np
import torch

from horovod_tnq import core
from horovod_tnq.protocol import plan

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


class OneParameter(torch.nn.Module):
    """One flat parameter; ``model(g).backward()`` makes its gradient exactly ``g``: DDP then
    hands the hook one bucket holding ``g``."""

    def __init__(self, numel, dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(numel, dtype=dtype))

    def forward(self, gradient):
        return (self.weight * gradient).sum()


def gradient(rank, step, numel, dtype):
    """Rank ``rank``'s gradient at ``step``: Gaussian, with a run of exact zeros on rank 1 and
    an infinity on rank 0 at step 2, so that ranks' payloads differ in size (zero runs and
    non-finite exceptions are carried apart)."""
    rng = np.random.default_rng(1000 * rank + step)
    values = rng.standard_normal(numel)
    if rank == 1:
        values[numel // 10:numel // 4] = 0.0
    if rank == 0 and step == 2:
        values[7] = np.inf
    return torch.from_numpy(values).to(DTYPES[dtype])


def core_average(gradients, config, name, step, dtype):
    """The average of every rank's gradient (``gradients``, in rank order) as the Horovod
    adapter computes it from the same bytes, with the core alone: each rank's payloads (seed,
    rank, payload name and step key their streams), every part's payloads decoded and summed
    times 1 / N, rounded once to the result's dtype. The allgather exchange only."""
    size, numel = len(gradients), gradients[0].numel()
    kind, bounds, parts = plan(config, numel, size)
    assert kind == "allgather", kind
    work = torch.float64 if dtype == "float64" else torch.float32
    out = np.empty(numel, np.float32 if dtype == "float32" else np.float64)
    for (start, stop), part in zip(bounds, parts):
        payloads = [core.encode(g.to(work).numpy()[start:stop], scheme=config.scheme,
                                bits=config.bits, bucket_size=config.bucket_size,
                                key=core.stream_key(config.seed, rank, name + part), step=step,
                                dtype_name=dtype, shape=(numel,),
                                options=config.scheme_options())
                    for rank, g in enumerate(gradients)]
        expect = core.PayloadHeader.describe(config.scheme, config.bits, dtype, stop - start,
                                             config.bucket_size, (numel,))
        core.decode_sum(np.concatenate(payloads), expect, 1.0 / size, out.dtype,
                        out=out[start:stop])
    return torch.from_numpy(out).to(DTYPES[dtype])


def same_bits(a, b):
    """Whether two tensors hold the same bits (NaN and infinities included)."""
    return a.dtype == b.dtype and a.shape == b.shape and \
        a.contiguous().view(torch.uint8).equal(b.contiguous().view(torch.uint8))


def digest(tensors):
    """sha256 of the tensors' bytes, in order."""
    h = hashlib.sha256()
    for tensor in tensors:
        h.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_report(out_dir, rank, report):
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f, indent=1)
