"""Runs under `horovodrun -np N`: eager TensorFlow allreduces with a TNQCompressor while the last
rank has joined (hvd.join()), beside uncompressed ones; each rank writes OUT_DIR/rank<r>.json."""

import hashlib
import json
import os
import sys

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

from horovod_tnq.tensorflow import TNQCompressor

OUT_DIR = sys.argv[1]
STEPS, SHORT = 4, 2


def main():
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    compressors = {exchange: TNQCompressor(bits=8, exchange=exchange, min_numel=16)
                   for exchange in ("allgather", "reduce-scatter")}
    records = []
    for step in range(SHORT if rank == size - 1 else STEPS):
        x = tf.constant(np.random.default_rng([rank, step]).laplace(scale=0.01, size=4096),
                        tf.float32)
        plain = hvd.allreduce(x, name="plain", op=hvd.Average)
        record = {"step": step}
        for exchange, compressor in compressors.items():
            result = hvd.allreduce(x, name=f"tnq.{exchange}", op=hvd.Average,
                                   compression=compressor)
            record[exchange] = {
                "error": float(tf.norm(result - plain) / tf.norm(plain)),
                "digest": hashlib.sha256(result.numpy().tobytes()).hexdigest()}
        records.append(record)
    hvd.join()
    with open(os.path.join(OUT_DIR, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "direct": records}, f)


if __name__ == "__main__":
    main()
