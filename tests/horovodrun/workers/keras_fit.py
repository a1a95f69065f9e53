"""Runs under `horovodrun -np N`: model.fit with TNQ-compressed gradients.

argv: OUT_DIR, then "keras2" (tf-keras with horovod.tensorflow.keras; launched with
TF_USE_LEGACY_KERAS=1) or "keras3" (Keras 3 with horovod_tnq.tensorflow.keras).
"""

import hashlib
import json
import os
import sys

import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits

from horovod_tnq.tensorflow import TNQCompressor

OUT_DIR, FLAVOUR = sys.argv[1], sys.argv[2]


def data(rank, size):
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    return x[:1400][rank::size], y[:1400][rank::size], x[1400:], y[1400:]


def build(keras):
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, activation="relu"),
                             keras.layers.Dense(10)])


def main():
    if FLAVOUR == "keras2":
        import horovod.tensorflow.keras as hvd
        keras = tf.keras
        assert keras.__name__.startswith("tf_keras"), keras.__name__  # Keras 2
        hvd.init()
        model = build(keras)
        optimizer = hvd.DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9),
                                             compression=TNQCompressor(bits=3))
        model.compile(optimizer=optimizer, metrics=["accuracy"],
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        callbacks = [hvd.callbacks.BroadcastGlobalVariablesCallback(0)]
    else:
        import horovod.tensorflow as hvd
        import keras

        from horovod_tnq.tensorflow import keras as tnq_keras
        assert keras.__version__.startswith("3"), keras.__version__
        hvd.init()
        model = build(keras)
        optimizer = tnq_keras.DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9),
                                                   compression=TNQCompressor(bits=3))
        model.compile(optimizer=optimizer, metrics=["accuracy"], jit_compile=False,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        tnq_keras.broadcast_variables(model, root_rank=0)
        callbacks = []
    x, y, x_test, y_test = data(hvd.rank(), hvd.size())
    model.fit(x, y, batch_size=32, epochs=20, verbose=0, shuffle=False, callbacks=callbacks)
    weights = hashlib.sha256(b"".join(w.tobytes() for w in model.get_weights())).hexdigest()
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    with open(os.path.join(OUT_DIR, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump({"weights": weights, "accuracy": float(accuracy)}, f)


if __name__ == "__main__":
    main()
