"""Runs under `horovodrun -np 2`: eager `hvd.allreduce(t, compression=c)` without a name in
horovod.tensorflow, many times, with error feedback; what the compressor holds afterwards.
Writes OUT_DIR/rank<r>.json for tests/horovodrun/test_shared_state.py."""

import json
import os
import sys
import warnings

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

from horovod_tnq.tensorflow import TNQCompressor

OUT_DIR = sys.argv[1]
CALLS = int(sys.argv[2]) if len(sys.argv) > 2 else 300


def main():
    hvd.init()
    compressor = TNQCompressor(error_feedback=1.0)
    rng = np.random.default_rng(7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(CALLS):
            tensor = tf.constant(rng.standard_normal(2048).astype(np.float32) * (hvd.rank() + 1))
            reduced = hvd.allreduce(tensor, compression=compressor)
    truth = tf.reduce_mean(hvd.allgather(tensor[None]), 0)
    state = compressor.state
    report = {
        "entries": {"steps": len(state.steps), "residuals": len(state.residuals),
                    "metrics": sorted(compressor.metrics()["tensors"]),
                    "planned_bytes": sorted(compressor.metrics()["planned_bytes"]),
                    "plans_checked": len(compressor._plans_checked),
                    "in_flight": len(state.namer._in_flight)},
        "anonymous": state.namer.anonymous,
        "warnings": [str(w.message) for w in caught if "named tensors" in str(w.message)],
        "relative_error": float(tf.norm(reduced - truth) / tf.norm(truth))}
    with open(os.path.join(OUT_DIR, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
