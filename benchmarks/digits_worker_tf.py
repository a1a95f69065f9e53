"""The TensorFlow twin of digits_worker.py: the same MLP, data shards, batch size, optimizer and
warm-up and timed steps, trained with ``hvd.DistributedGradientTape`` inside a ``tf.function``
with the compressor of ``horovod_tnq.tensorflow.get_compressor``, and the same report line
(worker_common.py), so bandwidth.py runs either one for a spec (``framework=tf`` picks this one).

What a TF step cannot be split into: forward, backward, the collectives and the update all run
inside one graph call, so compute and communication wait are reported as None. Encode and decode
are the numpy core's time in the compressor's tf.numpy_function callbacks (worker_common.
CodecTimer), for TNQ schemes; Horovod's own none and fp16 run as graph ops, so None as well.

    horovodrun -np 2 -H localhost:2 --gloo python -m benchmarks.digits_worker_tf \
        --compressor tnq-rht:bits=4,framework=tf
"""

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

from benchmarks import worker_common as common
from examples.digits import load_shard
from horovod_tnq.tensorflow import TNQCompressor, get_compressor


def build_model(hidden, seed):
    """Weights and biases of Dense layers 64-hidden...-10, initialised like torch.nn.Linear:
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Plain variables rather than Keras layers: the graph is
    the matmuls and nothing else, whatever Keras version TF brings."""
    rng = np.random.default_rng(seed)
    sizes = [64, *hidden, 10]
    variables = []
    for fan_in, fan_out in zip(sizes, sizes[1:]):
        bound = 1.0 / np.sqrt(fan_in)
        for shape in ((fan_in, fan_out), (fan_out,)):
            variables.append(tf.Variable(rng.uniform(-bound, bound, shape).astype(np.float32)))
    return variables


def forward(variables, x):
    for i in range(0, len(variables), 2):
        x = x @ variables[i] + variables[i + 1]
        if i + 2 < len(variables):
            x = tf.nn.relu(x)
    return x


def cross_entropy(logits, labels):
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels,
                                                                         logits=logits))


def barrier(name):
    hvd.allreduce(tf.zeros(1), name=name, op=hvd.Sum)


def main():
    args = common.parse_args(__doc__.splitlines()[0])
    # before any op runs: TF sizes its thread pools once (PyTorch's worker sets one thread too)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    hvd.init()
    core = common.pin_to_one_core(hvd.rank()) if args.pin_core else None
    name, options = common.compressor_spec(args.compressor, "tf")
    if options.pop("fused", 0):
        raise ValueError("fused=1 is the PyTorch optimizer; the TF worker has no fused path")
    if args.replay_codec:
        common.replay_codec()
    compression = get_compressor(name, **options)
    codec = common.CodecTimer() if isinstance(compression, TNQCompressor) else None
    interface = common.default_interface(args)

    x_train, y_train, x_test, y_test = load_shard(hvd.rank(), hvd.size(), args.seed)
    x_test, y_test = tf.constant(x_test), tf.constant(y_test)
    variables = build_model([int(w) for w in args.hidden.split(",")], args.seed)
    hvd.broadcast_variables(variables, root_rank=0)
    optimizer = tf.keras.optimizers.SGD(args.lr, momentum=args.momentum)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = cross_entropy(forward(variables, x), y)
        tape = hvd.DistributedGradientTape(tape, compression=compression)
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    @tf.function
    def evaluate_graph():
        logits = forward(variables, x_test)
        accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, 1), y_test), tf.float32))
        return cross_entropy(logits, y_test), accuracy

    def evaluate():
        loss, accuracy = evaluate_graph()
        return float(loss), float(accuracy)

    rng = np.random.default_rng(args.seed + hvd.rank())

    def batches():
        while True:
            order = rng.permutation(len(x_train))
            for i in range(len(x_train) // args.batch_size):
                batch = order[i * args.batch_size:(i + 1) * args.batch_size]
                yield tf.constant(x_train[batch]), tf.constant(y_train[batch])

    run = common.timed_steps(args, lambda batch: float(step(*batch)), batches(), evaluate,
                             barrier, interface, profile=args.profile and hvd.rank() == 0,
                             on_window_start=codec.reset if codec else None)

    mine = common.rank_summary(args, run, {
        "compute_s": None, "comm_wait_s": None,
        "encode_s": codec.encode_s if codec else None,
        "decode_s": codec.decode_cpu_s if codec else None,
    }, core, compressor_bytes=None if codec is None else
        # what TNQ hands to Horovod for each tensor per step, known when the graph was traced
        # (metrics()' "planned_bytes"; the counters of graph runs: PyTorch only)
        args.steps * sum(compression.metrics()["planned_bytes"].values()))
    everyone = hvd.allgather_object(mine)
    if hvd.rank() == 0:
        common.print_report(args, run, everyone, sum(int(np.prod(v.shape)) for v in variables),
                            interface)


if __name__ == "__main__":
    main()
