"""Runs under `horovodrun -np 2` with Horovod's response cache on (its default): the last rank
joins after SHORT steps of hvd.allreduce(..., compression=TNQCompressor(...)); the other goes on
with the same named tensor, which Horovod then answers from its cache with the joined rank's
zeros instead of refusing it. Each rank writes OUT_DIR/rank<r>.json: what the active rank's
next compressed allreduce raised, and how each rank's join ended."""

import json
import os
import sys

import horovod.torch as hvd
import torch

from horovod_tnq.torch import TNQCompressor
from common import expect_error

OUT_DIR = sys.argv[1]
SHORT = 2


def main():
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    compressor = TNQCompressor(bits=4, exchange="allgather", min_numel=16)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(rank))
    for _ in range(SHORT):
        hvd.allreduce(x, name="grad", compression=compressor)
    report = {"rank": rank}
    if rank < size - 1:
        report["after_join"] = expect_error(
            lambda: hvd.allreduce(x, name="grad", compression=compressor))
    # Horovod's own, uncompressed alike: the joined rank's join can end with the cached
    # allgather's output ("a Tensor with ... elements cannot be converted to Scalar"), or its
    # background loop fail and the active rank's calls with it
    report["join"] = expect_error(hvd.join)
    with open(os.path.join(OUT_DIR, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
