"""Run by tests/unit/test_horovod_frames.py in a process of its own (one Horovod rank, with
HOROVOD_ELASTIC=1 so that stock Horovod's optimizers reduce at size 1): stock Horovod's
optimizers and tapes call compress(), and every TensorName compress_named() receives is
recorded, with whether it was read from Horovod's frames. Prints one JSON line.

    python horovod_frames_worker.py torch|tensorflow
"""

import json
import sys


def resolved(compressor):
    return {name: None if config is None else config.bits
            for name, config in compressor.settings.resolved().items()}


def run_torch():
    import horovod.torch as hvd
    import torch

    hvd.init()
    import horovod_tnq.torch as tnq
    from horovod_tnq.torch import TNQCompressor

    calls = record(TNQCompressor)
    result = {}
    overrides = {"fc.*": {"bits": 8}, "norm.*": None}
    for case, groups in (("stock", 0), ("grouped", 2), ("fused", None)):
        torch.manual_seed(0)
        model = torch.nn.Sequential()
        model.add_module("fc", torch.nn.Linear(8, 300))
        model.add_module("norm", torch.nn.LayerNorm(300))
        model.add_module("out", torch.nn.Linear(300, 40))
        compressor = TNQCompressor(bits=2, min_numel=0, overrides=overrides)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        if groups is None:
            optimizer = tnq.DistributedOptimizer(sgd, named_parameters=model.named_parameters(),
                                                 compression=compressor)
        else:
            optimizer = hvd.DistributedOptimizer(sgd, named_parameters=model.named_parameters(),
                                                 compression=compressor, num_groups=groups)
        model(torch.randn(3, 8)).pow(2).sum().backward()
        optimizer.step()
        result[case] = {"calls": list(calls), "resolved": resolved(compressor),
                        "parameters": sorted(name for name, _ in model.named_parameters())}
        calls.clear()
    compressor = TNQCompressor(bits=2, min_numel=0)
    hvd.allreduce(torch.ones(3000), name="plain", compression=compressor)
    hvd.grouped_allreduce([torch.ones(3000), torch.ones(2000)], name="group",
                          compression=compressor)
    hvd.allreduce(torch.ones(3000), compression=compressor)
    hvd.allreduce(torch.ones(3000), name="named", compression=compressor.named("named", "w"))
    result["allreduce"] = {"calls": list(calls)}
    return result


def run_tensorflow():
    import horovod.tensorflow as hvd
    import keras
    import numpy as np
    import tensorflow as tf

    hvd.init()
    from horovod_tnq.tensorflow import TNQCompressor, keras as tnq_keras

    calls = record(TNQCompressor, tf.autograph.experimental.do_not_convert)
    result = {}
    a = tf.Variable(np.ones(4096, np.float32), name="shared_a")
    b = tf.Variable(np.ones(4096, np.float32), name="shared_b")
    w = tf.Variable(np.ones((64, 64), np.float32), name="w")
    x = tf.constant(np.random.default_rng(0).normal(size=4096).astype(np.float32))
    for case, graph, groups in (("tape_graph", True, 0), ("tape_eager", False, 0),
                                ("tape_grouped", True, 2)):
        compressor = TNQCompressor(bits=2, min_numel=0, overrides={"shared_b": {"bits": 8},
                                                                   "shared_a": None})

        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum((a + b) * x) + tf.reduce_sum(w ** 2)
            tape = hvd.DistributedGradientTape(tape, compression=compressor,
                                               num_groups=groups)
            return tape.gradient(loss, [a, b, w])

        (tf.function(step) if graph else step)()
        result[case] = {"calls": list(calls), "resolved": resolved(compressor)}
        calls.clear()

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.LayerNormalization(name="norm"),
                              keras.layers.Dense(40, name="out")])
    model.build((None, 3))
    compressor = TNQCompressor(bits=2, min_numel=0, overrides={"*/norm/*": None})
    optimizer = tnq_keras.DistributedOptimizer(keras.optimizers.SGD(0.1),
                                               compression=compressor)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    model.fit(np.ones((8, 3), np.float32), np.zeros((8, 40), np.float32), epochs=1,
              batch_size=8, verbose=0)
    result["keras3"] = {"calls": list(calls), "resolved": resolved(compressor),
                        "variables": sorted(v.path for v in model.trainable_variables)}
    return result


def record(compressor_class, wrap=lambda function: function):
    """Patch ``compressor_class`` so that each compress_named() call is recorded: the names it
    got, and whether compress() read them from Horovod's frames (its caller is the adapter's
    compress(), not naming.NamedCompression's)."""
    calls = []
    original = compressor_class.__dict__["compress_named"]

    @wrap
    def compress_named(self, tensor, name):
        owner = getattr(name.collective, "owner", None)
        caller = sys._getframe(1)
        while caller.f_code.co_name != "compress":  # (TF: through do_not_convert's wrapper)
            caller = caller.f_back
        calls.append({"collective": None if name.collective is None else str(name.collective),
                      "has_owner": owner is not None and owner() is not None,
                      "parameter": name.parameter, "names": sorted(name.names),
                      "global_set": name.process_set is None or
                      getattr(name.process_set, "process_set_id", None) == 0,
                      "from_frames": caller.f_globals["__name__"] != "horovod_tnq.protocol.naming"})
        return original.function(self, tensor, name)

    compressor_class.compress_named = type(original)(compress_named)
    return calls


if __name__ == "__main__":
    run = {"torch": run_torch, "tensorflow": run_tensorflow}[sys.argv[1]]
    print(json.dumps(run()))
