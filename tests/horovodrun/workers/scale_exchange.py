"""Runs under `horovodrun -np N`: every exchange of TNQCompressor averaging gradients alike
across ranks, as benchmarks/scale_simulator.py lays them out, with PyTorch or TensorFlow.

    scale_exchange.py OUT_DIR torch|tensorflow

Every rank holds g + NOISE n_i (g shared, n_i its own; Student-t(3), the simulator's
gradients() with a seed per tensor and step, so every rank, and the test, can rebuild every
rank's input) and averages it with hvd.allreduce(op=Average) at BITS bits, one compressor per
exchange, the same tensors for STEPS steps (each step draws fresh rounding). Each rank writes
OUT_DIR/rank<r>.json: per exchange, the NMSE of each result against the true average, each
result's digest, every rank's digests (allgathered: each rank sees the others'), and the
compressor's counters (which exchange each tensor took); and where the rank ran (its local and
cross rank and size). tests/horovodrun/test_scale_exchanges.py compares the errors with the
simulator's.
"""

import hashlib
import json
import os
import sys
import traceback

import numpy as np

from benchmarks.scale_simulator import gradients

EXCHANGES = ("allgather", "reduce-scatter", "auto", "hierarchical")
SIZES = (65536, 10000, 4099, 1500)  # 1500: below one bucket per rank from 3 ranks on
STEPS = 3
BITS = 2
NOISE = 0.01


def seed_of(step, index):
    return 2300 + 100 * step + index


def digest(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def nmse(result, truth):
    return float(((result.astype(np.float64) - truth) ** 2).sum() / (truth ** 2).sum())


class Torch:
    def __init__(self):
        import horovod.torch as hvd
        import torch

        from horovod_tnq.torch import TNQCompressor

        self.hvd, self.torch, self.compressor = hvd, torch, TNQCompressor

    def average(self, values, name, compressor):
        out = self.hvd.allreduce(self.torch.from_numpy(values), name=name, op=self.hvd.Average,
                                 compression=compressor)
        return out.numpy()

    def allgather_object(self, obj):
        return self.hvd.allgather_object(obj)


class TensorFlow:
    def __init__(self):
        import horovod.tensorflow as hvd
        import tensorflow as tf

        from horovod_tnq.tensorflow import TNQCompressor

        self.hvd, self.tf, self.compressor = hvd, tf, TNQCompressor

    def average(self, values, name, compressor):
        out = self.hvd.allreduce(self.tf.constant(values), name=name, op=self.hvd.Average,
                                 compression=compressor)
        return out.numpy()

    def allgather_object(self, obj):
        return self.hvd.allgather_object(obj)


def run_exchange(framework, exchange, inputs, rank):
    """Every tensor for every step through one compressor with ``exchange``."""
    compressor = framework.compressor(bits=BITS, exchange=exchange, min_numel=1)
    rows = []
    for step in range(STEPS):
        for index, numel in enumerate(SIZES):
            grads, truth = inputs[step, index]
            out = framework.average(grads[rank], f"scale.{exchange}.{numel}", compressor)
            rows.append({"numel": numel, "step": step, "seed": seed_of(step, index),
                         "nmse": nmse(out, truth), "digest": digest(out),
                         "dtype": str(out.dtype), "shape": list(out.shape)})
    return {"rows": rows, "stats": compressor.metrics()["counters"]}


def main():
    out_dir, name = sys.argv[1], sys.argv[2]
    framework = {"torch": Torch, "tensorflow": TensorFlow}[name]()
    hvd = framework.hvd
    hvd.init(process_sets="dynamic")  # the hierarchical exchange registers its own sets
    rank, size = hvd.rank(), hvd.size()
    report = {"rank": rank, "size": size, "local_rank": hvd.local_rank(),
              "local_size": hvd.local_size(), "cross_rank": hvd.cross_rank(),
              "cross_size": hvd.cross_size(), "bits": BITS, "noise": NOISE, "steps": STEPS,
              "sizes": list(SIZES), "exchanges": {}}
    inputs = {}
    for step in range(STEPS):
        for index, numel in enumerate(SIZES):
            grads = gradients(size, numel, NOISE, seed_of(step, index))
            inputs[step, index] = grads, np.mean([g.astype(np.float64) for g in grads], axis=0)
    for exchange in EXCHANGES:
        try:
            entry = run_exchange(framework, exchange, inputs, rank)
        except Exception:  # the test reports it; the next exchange still runs
            entry = {"error": traceback.format_exc()}
        # every rank's digests, as every rank received them
        entry["digests_by_rank"] = framework.allgather_object(
            [row["digest"] for row in entry.get("rows", [])])
        report["exchanges"][exchange] = entry
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    hvd.shutdown()


if __name__ == "__main__":
    main()
