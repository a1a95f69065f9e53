"""Runs under elastic `horovodrun --min-np ... --host-discovery-script ...`: TensorFlow training
with TNQ through a membership change, as elastic_train.py does for PyTorch.

A Keras 2 model (tf_keras: Horovod's TensorFlowKerasState calls optimizer.variables(), which
Keras 3 has as a list) trained in a tf.function by
hvd.DistributedGradientTape(tape, compression=TNQCompressor(bits=4)) inside hvd.elastic.run,
with hvd.elastic.TensorFlowKerasState(model, optimizer, batch=0) and two reset callbacks:
compressor.reset and a new tf.function for the step. The new tf.function is needed: the
compressor reads the world (size, rank, each tensor's exchange) when the graph is traced, and
runs its settings check then, eagerly; a survivor running its old graph next to a newcomer
tracing its first waits forever (the newcomer's check has no partner), and one running it in
a world of another size fails (Horovod's alltoall refuses the old plan's splits). RETRACE=0 or
RESET=0 in the environment leaves out one callback, to show what happens then.

argv: OUT_DIR, HOSTS_FILE (what the discovery script prints), STEPS, EVENT, WORKERS (default
2). EVENT "resize": rank 0 takes a slot away at step SHRINK_AT and gives it back once the job
runs on WORKERS - 1, so the job shrinks from WORKERS workers by one and grows back (a new
process, with fresh state); "kill": rank 1 dies (exit 1) once at step SHRINK_AT; Horovod drops
its host for a while and starts a replacement there afterwards.
Each step prints a JSON line (rank, size, step, ratio, traces). Every rank that finishes writes
OUT_DIR/rank<r>.json: the world size at the end, its weights' digest, the reduced gradient
divided by this rank's own (the projection ratio) on the last step and on every step run in the
shrunk world (steps where every rank has the same data, so 1 where Average divides by the
current world size, 2/3 or 1/2 with the old one), the compressor's steps per tensor, the step
from which this process last ran train() afresh (its start or its last reset), how often the
step was traced and how often train() was entered.
"""

import hashlib
import json
import os
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import horovod.tensorflow as hvd  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from horovod_tnq.tensorflow import TNQCompressor  # noqa: E402
from elastic_hosts import set_hosts, wait_for_size  # noqa: E402

OUT_DIR, HOSTS_FILE, STEPS, EVENT = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
WORKERS = int(sys.argv[5]) if len(sys.argv) > 5 else 2
RETRACE, RESET = os.environ.get("RETRACE", "1") == "1", os.environ.get("RESET", "1") == "1"
KILLED = os.path.join(OUT_DIR, "killed")
SHRINK_AT = 3


def digest(model):
    return hashlib.sha256(b"".join(w.tobytes() for w in model.get_weights())).hexdigest()


def main():
    hvd.init()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Dense(64, activation="relu", input_shape=(32,)),
                              keras.layers.Dense(4)])
    optimizer = keras.optimizers.SGD(0.05)
    optimizer.build(model.trainable_variables)  # its variables exist before the state saves
    compressor = TNQCompressor(bits=4, min_numel=100)
    run = {"traces": 0, "entries": 0}

    def train_step(x):
        run["traces"] += 1  # Python runs only while tracing
        with tf.GradientTape(persistent=True) as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True)))
        local = tape.gradient(loss, model.trainable_variables)
        reduced = hvd.DistributedGradientTape(tape, compression=compressor).gradient(
            loss, model.trainable_variables)
        optimizer.apply_gradients(zip(reduced, model.trainable_variables))
        return local, reduced

    def retrace():
        run["step"] = tf.function(train_step)

    retrace()
    state = hvd.elastic.TensorFlowKerasState(model, optimizer, batch=0)
    state.register_reset_callbacks([compressor.reset] * RESET + [retrace] * RETRACE)

    @hvd.elastic.run
    def train(state):
        # entered at the start and after every reset, once the state is synced
        run["entries"] += 1
        run["fresh_since"] = state.batch
        while state.batch < STEPS:
            # each change of the world happens at a known step, however slowly Horovod acts
            if EVENT == "resize" and state.batch == SHRINK_AT + 1:
                wait_for_size(state, hvd.size(), WORKERS - 1)  # the slot taken away at SHRINK_AT
            if state.batch == STEPS - 1:
                wait_for_size(state, hvd.size(), WORKERS)  # the worker back for the last step
            shrunk, last = hvd.size() < WORKERS, state.batch == STEPS - 1
            # the last step and those in the shrunk world: the same data on every rank, so the
            # average is each rank's own
            seed = 10_000 + state.batch if last or shrunk else 100 * state.batch + hvd.rank()
            x = np.random.default_rng(seed).normal(size=(16, 32)).astype(np.float32)
            local, reduced = run["step"](tf.constant(x))
            sizes.append(hvd.size())
            ratio = (sum(float(tf.reduce_sum(r * g)) for r, g in zip(reduced, local)) /
                     sum(float(tf.reduce_sum(g * g)) for g in local))
            if shrunk:
                shrunk_ratios.append(ratio)
            print(json.dumps({"rank": hvd.rank(), "size": hvd.size(), "step": state.batch,
                              "ratio": round(ratio, 6), "traces": run["traces"]}), flush=True)
            if EVENT == "kill":
                if hvd.rank() == 1 and state.batch == SHRINK_AT and not os.path.exists(KILLED):
                    open(KILLED, "w").close()
                    os._exit(1)
            elif hvd.rank() == 0 and state.batch == SHRINK_AT and hvd.size() == WORKERS:
                set_hosts(HOSTS_FILE, f"localhost:{WORKERS - 1}")
            elif hvd.rank() == 0 and shrunk and state.batch > SHRINK_AT:
                set_hosts(HOSTS_FILE, f"localhost:{WORKERS}")
            time.sleep(0.3)  # Horovod's discovery looks every second: let it see the change
            state.batch += 1
            state.commit()
        return ratio

    sizes, shrunk_ratios = [], []
    ratio = train(state)
    report = {"size": hvd.size(), "digest": digest(model), "last_ratio": ratio,
              "steps": state.batch, "sizes_seen": sorted(set(sizes)),
              "shrunk_ratios": shrunk_ratios, "compressor_steps": dict(compressor.state.steps),
              "fresh_since": run["fresh_since"], "traces": run["traces"],
              "entries": run["entries"]}
    with open(os.path.join(OUT_DIR, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
