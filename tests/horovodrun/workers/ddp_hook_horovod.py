"""Runs under `horovodrun -np 2 --gloo`, with torch.distributed (Gloo) started beside Horovod
(MASTER_ADDR / MASTER_PORT from the test): the DDP hook and the Horovod adapter average the
same gradient bytes, and must give the same bits.

    ddp_hook_horovod.py OUT_DIR

Per setting, a TNQCompressor and a TNQHookState of the same settings; for STEPS steps each rank
averages its gradient (ddp_hook_common.gradient: payloads of other sizes on each rank) with
``hvd.allreduce(g, name="ddp.bucket0", op=hvd.Average, compression=...)`` and as the gradient of
a one-parameter DDP model (one bucket, ``ddp.bucket0``) with the hook. Each rank writes
OUT_DIR/rank<r>.json: per setting and step, whether the two results hold the same bits, and at
the end whether their error-feedback residuals do.
"""

import sys
import traceback
from datetime import timedelta

import horovod.torch as hvd
import numpy as np
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks.ddp import end_process
from ddp_hook_common import DTYPES, OneParameter, gradient, same_bits, write_report
from horovod_tnq.torch import TNQCompressor
from horovod_tnq.torch.ddp import BUCKET_NAME, TNQHookState, tnq_hook

OUT_DIR = sys.argv[1]
NUMEL, STEPS = 30011, 3
CASES = {
    "bits3": dict(bits=3),
    "parts": dict(bits=2, part_elements=8192, bucket_size=256),
    "reduce-scatter": dict(bits=4, exchange="reduce-scatter"),
    "error-feedback": dict(bits=2, error_feedback=0.5),
    "reduce-scatter-error-feedback": dict(bits=3, exchange="reduce-scatter",
                                          error_feedback=1.0),
    "bfloat16": dict(bits=3, dtype="bfloat16"),
    "topk": dict(bits=2, scheme="topk"),
}


def compare(settings, rank):
    settings = dict(settings)
    dtype = settings.pop("dtype", "float32")
    compressor = TNQCompressor(**settings)
    state = TNQHookState(**settings)
    model = OneParameter(NUMEL, DTYPES[dtype])
    ddp = DDP(model)
    ddp.register_comm_hook(state, tnq_hook)
    same = []
    for step in range(STEPS):
        g = gradient(rank, step, NUMEL, dtype)
        horovod = hvd.allreduce(g.clone(), name=BUCKET_NAME.format(0), op=hvd.Average,
                                compression=compressor)
        model.zero_grad()
        ddp(g).backward()
        same.append(same_bits(model.weight.grad, horovod))
    theirs, ours = compressor.state.residuals, state.state.residuals
    return {"same": same, "residual_slots": sorted(ours),
            "same_residuals": sorted(theirs) == sorted(ours) and
            all(np.array_equal(theirs[slot], ours[slot]) for slot in ours),
            "stats": {kind: state.metrics()["counters"][kind]
                      for kind in ("allgather", "reduce-scatter")},
            "horovod_stats": {kind: compressor.metrics()["counters"][kind]
                              for kind in ("allgather", "reduce-scatter")}}


def main():
    hvd.init()
    dist.init_process_group("gloo", rank=hvd.rank(), world_size=hvd.size(),
                            timeout=timedelta(seconds=120))
    report = {"rank": hvd.rank()}
    for case, settings in CASES.items():
        try:
            report[case] = compare(settings, hvd.rank())
        except Exception:
            report[case] = {"error": traceback.format_exc()}
    write_report(OUT_DIR, hvd.rank(), report)


if __name__ == "__main__":
    main()
    hvd.shutdown()
    end_process()  # (not destroy_process_group(): PyTorch's Gloo can abort at exit)
