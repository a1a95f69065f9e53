"""Runs under `horovodrun -np 2` in a network namespace of its own (run_workers'
private_network), whose loopback interface then carries the workers' traffic and nothing else:
the bytes that cross it while the ranks allreduce a gradient STEPS times, uncompressed and with
TNQ 4-bit.

The count is taken in one run, between two barriers after a warm-up allreduce, so start-up,
the settings check and teardown are outside it (a difference of two runs, as
benchmarks/wire_bytes.py takes, moves with how long each run's start-up took). What is left
besides the payloads is Horovod's coordination, which grows with the time the steps take: the
gradient is large, so that it stays small against the payloads even on a slow machine.
Each rank writes OUT_DIR/rank<r>.json: the window's wire bytes (the same counter on every rank:
rank 0's reading is the one used) and the bytes this rank handed to Horovod in it.
"""

import json
import os
import sys

import horovod.torch as hvd
import torch

from benchmarks.wire_bytes import loopback_tx_bytes
from horovod_tnq.torch import TNQCompressor

OUT_DIR = sys.argv[1]
ELEMENTS = 1 << 21  # 8 MiB of float32 per rank and step
STEPS = 5


def window(name, compression):
    """Wire bytes of STEPS allreduces of one gradient."""
    gradient = torch.randn(ELEMENTS, generator=torch.Generator().manual_seed(hvd.rank()))
    hvd.allreduce(gradient, name=name, compression=compression)  # warm-up
    hvd.barrier()
    before = loopback_tx_bytes()
    for _ in range(STEPS):
        hvd.allreduce(gradient, name=name, compression=compression)
    hvd.barrier()  # every rank has received everything: the window's traffic is all counted
    return loopback_tx_bytes() - before


def main():
    hvd.init()
    report = {"none": {"wire_bytes": window("none", hvd.Compression.none),
                       "handed_to_horovod": STEPS * ELEMENTS * torch.float32.itemsize}}
    tnq = TNQCompressor(bits=4)
    wire = window("tnq", tnq)  # the counters count the warm-up's payload too: as large as each
    # step's (the same gradient, settings and size every time)
    report["tnq"] = {"wire_bytes": wire,
                     "handed_to_horovod":
                         tnq.metrics()["counters"]["payload_bytes"] * STEPS // (STEPS + 1)}
    with open(os.path.join(OUT_DIR, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
