"""The TensorFlow twin of train_digits.py: the same data, network and report line, trained with
hvd.DistributedGradientTape inside tf.function.

    horovodrun -np 2 -H localhost:2 --gloo python examples/train_digits_tf.py --compression tnq
"""

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf
from digits import LAYERS, load_shard, parse_args, report

from horovod_tnq.tensorflow import TNQCompressor


def init_layers(seed):
    """PyTorch's default Linear initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    rng = np.random.default_rng(seed)
    variables = []
    for fan_in, fan_out in zip(LAYERS, LAYERS[1:]):
        bound = 1.0 / np.sqrt(fan_in)
        for shape in ((fan_in, fan_out), (fan_out,)):
            variables.append(tf.Variable(rng.uniform(-bound, bound, shape), dtype=tf.float32))
    return variables


def forward(variables, x):
    for i in range(0, len(variables), 2):
        x = x @ variables[i] + variables[i + 1]
        if i + 2 < len(variables):
            x = tf.nn.relu(x)
    return x


def main():
    args = parse_args(__doc__.splitlines()[0])
    hvd.init()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    x_train, y_train, x_test, y_test = load_shard(hvd.rank(), hvd.size(), args.seed)
    variables = init_layers(args.seed)
    compression = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16,
                   "tnq": TNQCompressor(bits=args.bits, seed=args.seed)}[args.compression]
    optimizer = tf.keras.optimizers.SGD(args.lr, momentum=0.9)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=y, logits=forward(variables, x)))
        tape = hvd.DistributedGradientTape(tape, compression=compression)
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    rng = np.random.default_rng(args.seed + hvd.rank())
    steps_per_epoch = int(hvd.allreduce(tf.constant(len(x_train) // args.batch_size),
                                        op=hvd.Min, name="steps"))
    steps = 0
    for _ in range(args.epochs):
        order = rng.permutation(len(x_train))
        for i in range(steps_per_epoch):
            batch = order[i * args.batch_size:(i + 1) * args.batch_size]
            loss = train_step(tf.constant(x_train[batch]), tf.constant(y_train[batch]))
            steps += 1

    predictions = forward(variables, tf.constant(x_test)).numpy().argmax(1)
    accuracy = float((predictions == y_test).mean())
    elements = sum(int(np.prod(v.shape)) for v in variables)
    sent = sum(compression.metrics()["planned_bytes"].values()) \
        if hasattr(compression, "metrics") else 0  # (Horovod's own compressors: nothing)
    if hvd.rank() == 0:
        print(report("tensorflow", args.compression, args.bits, hvd.size(), steps, accuracy,
                     float(loss), sent, elements))


if __name__ == "__main__":
    main()
