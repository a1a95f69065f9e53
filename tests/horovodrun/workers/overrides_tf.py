"""Runs under `horovodrun -np N`: per-tensor overrides and metrics with horovod.tensorflow's
DistributedGradientTape inside tf.function (variables named as users name them).

Writes OUT_DIR/rank<r>.json for tests/horovodrun/test_overrides_metrics.py, and TensorBoard
events under OUT_DIR/tb/rank<r>.
"""

import json
import os
import sys

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

from horovod_tnq.tensorflow import TNQCompressor, keras as tnq_keras, log_metrics

OUT_DIR = sys.argv[1]


def main():
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    init = np.random.default_rng(0)
    variables = [tf.Variable(init.normal(size=(200, 64)).astype(np.float32), name="embed"),
                 tf.Variable(np.ones(64, np.float32), name="norm_scale"),
                 tf.Variable(init.normal(size=(64, 512)).astype(np.float32) * 0.1,
                             name="fc_kernel")]
    data = np.random.default_rng(100 + rank)
    tokens = tf.constant(data.integers(0, 200, 256))
    target = tf.constant(data.normal(size=(256, 512)).astype(np.float32))
    compressor = TNQCompressor(bits=2, min_numel=0,
                               overrides={"embed": {"bits": 8}, "norm_*": None})

    def loss():
        embed, scale, kernel = variables
        hidden = tf.gather(embed, tokens) * scale
        return tf.reduce_mean((tf.matmul(hidden, kernel) - target) ** 2)

    @tf.function
    def local_gradients():
        with tf.GradientTape() as tape:
            value = loss()
        return [tf.convert_to_tensor(g) for g in tape.gradient(value, variables)]

    @tf.function
    def reduced_gradients():
        with tf.GradientTape() as tape:
            value = loss()
        tape = hvd.DistributedGradientTape(tape, compression=compressor, sparse_as_dense=True)
        return tape.gradient(value, variables)

    truth = [tf.reduce_mean(hvd.allgather(g[None], name=f"truth.{i}"), 0)
             for i, g in enumerate(local_gradients())]
    result = {"size": size, "tape": {}}
    for _ in range(2):  # the graph runs twice: metrics are those of the last step
        reduced = reduced_gradients()
    for variable, got, want in zip(variables, reduced, truth):
        error = float(tf.reduce_sum(tf.cast(got - want, tf.float64) ** 2))
        result["tape"][variable.name.split(":")[0]] = {
            "relative_error": error / float(tf.reduce_sum(tf.cast(want, tf.float64) ** 2)),
            "exact": bool(np.allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-9))}
    result["metrics"] = compressor.metrics()
    result["resolved"] = {name: None if config is None else config.bits
                          for name, config in compressor.settings.resolved().items()}
    result["keras3"] = keras3_resolved()
    result["shared_gradient"] = shared_gradient_resolved()
    result["mismatch"] = {setting: mismatched_graph(setting, rank)
                          for setting in ("exchange", "part_elements")}
    writer = tf.summary.create_file_writer(os.path.join(OUT_DIR, "tb", f"rank{rank}"))
    log_metrics(writer, compressor, 2)
    writer.flush()
    result["stale_graph"] = stale_graph_error(reduced_gradients, compressor)
    with open(os.path.join(OUT_DIR, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def shared_gradient_resolved():
    """TF hands a and b of (a + b) * x one gradient tensor: each still gets its own settings."""
    a = tf.Variable(np.ones(4096, np.float32), name="shared_a")
    b = tf.Variable(np.ones(4096, np.float32), name="shared_b")
    x = tf.constant(np.random.default_rng(0).normal(size=4096).astype(np.float32))
    compressor = TNQCompressor(bits=2, min_numel=0, overrides={"shared_b": {"bits": 8},
                                                               "shared_a": None})

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum((a + b) * x)
        tape = hvd.DistributedGradientTape(tape, compression=compressor)
        return tape.gradient(loss, [a, b])

    step()
    return {name: None if config is None else config.bits
            for name, config in compressor.settings.resolved().items()}


def stale_graph_error(traced, compressor):
    """A graph traced before compressor.reset() (an elastic reset) refuses to run, before its
    collectives, instead of waiting for ranks that traced anew."""
    compressor.reset()
    try:
        traced()
    except Exception as error:  # the message is what the test checks
        return str(error)[:2000]
    return None


def mismatched_graph(setting, rank):
    """Ranks that would build different collectives in a graph (another exchange, other parts):
    the error at tracing, on every rank, instead of a graph that waits forever."""
    value = {"exchange": ["allgather", "reduce-scatter"],
             "part_elements": [0, 8192]}[setting][rank % 2]
    compressor = TNQCompressor(bits=4, **{setting: value})
    weights = tf.Variable(np.ones((128, 256), np.float32), name=f"mismatch_{setting}")

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(weights ** 2)
        tape = hvd.DistributedGradientTape(tape, compression=compressor)
        return tape.gradient(loss, [weights])

    try:
        step()
    except Exception as error:  # the message is what the test checks
        return str(error)[:2000]
    return None


def keras3_resolved():
    """Overrides in horovod_tnq's Keras 3 optimizer match the variables' paths."""
    import keras

    model = keras.Sequential([keras.layers.Embedding(50, 8, name="embed"),
                              keras.layers.LayerNormalization(name="norm"),
                              keras.layers.Dense(4, name="out")])
    model.build((None, 3))
    compressor = TNQCompressor(bits=2, min_numel=0, overrides={"*/embed/*": {"bits": 8},
                                                               "*/norm/*": None})
    optimizer = tnq_keras.DistributedOptimizer(keras.optimizers.SGD(0.1),
                                               compression=compressor)
    tokens = tf.constant([[1, 2, 3]])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(tokens))
    gradients = tape.gradient(loss, model.trainable_variables)
    optimizer.apply([tf.convert_to_tensor(g) for g in gradients], model.trainable_variables)
    return {name: None if config is None else config.bits
            for name, config in compressor.settings.resolved().items()}


if __name__ == "__main__":
    main()
