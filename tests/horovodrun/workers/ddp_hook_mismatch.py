"""Runs under `torchrun --nproc-per-node 2` (Gloo): ranks whose DDP hook states have different
settings must both raise a clear error at the first backward pass, not wait forever.

    ddp_hook_mismatch.py OUT_DIR

Two cases, each on a fresh model and hook state: ``bits`` differ (the payloads would not
decode), and ``min_numel`` differs so that one rank would allreduce the bucket uncompressed
while the other allgathers its payload size: collectives that do not pair. Each rank writes
OUT_DIR/rank<r>.json: per case, what backward() raised and after how many seconds.
"""

import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common import expect_error
from benchmarks.ddp import end_process
from ddp_hook_common import OneParameter, gradient, write_report
from horovod_tnq.torch.ddp import TNQHookState, tnq_hook

OUT_DIR = sys.argv[1]
CASES = {"bits": [dict(bits=4), dict(bits=3)],
         "min_numel": [dict(min_numel=1024), dict(min_numel=10**9)]}


def main():
    # a hang shows as Gloo's timeout in the report, well before the test's own
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    report = {"rank": rank}
    for case, settings in CASES.items():
        model = OneParameter(5000, torch.float32)
        ddp = DDP(model)
        ddp.register_comm_hook(TNQHookState(**settings[rank]), tnq_hook)
        started = time.perf_counter()
        report[case] = expect_error(lambda: ddp(gradient(rank, 0, 5000, "float32")).backward())
        report[case]["seconds"] = time.perf_counter() - started
    write_report(OUT_DIR, rank, report)


if __name__ == "__main__":
    main()
    # (not the interpreter's exit: after backward() raised inside DDP's hook, PyTorch's Gloo
    # aborted a rank at exit about one run in 6; benchmarks.ddp.end_process says why)
    end_process()
