"""Runs under `horovodrun -np N`: TNQCompressor for horovod.tensorflow, eager and tf.function.

Writes OUT_DIR/rank<r>.json for tests/test_tensorflow_horovodrun.py.
"""

import hashlib
import json
import os
import sys

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

from bounds import error_report
from horovod_tnq import core
from horovod_tnq.tensorflow import TNQCompressor, get_compressor

OUT_DIR = sys.argv[1]
N = 60_000


def digest(tensor):
    return hashlib.sha256(np.ascontiguousarray(tensor.numpy()).tobytes()).hexdigest()


def rank_input(rank):
    return np.random.default_rng(1000 + rank).laplace(scale=0.01, size=N).astype(np.float32)


def expect_error(function):
    try:
        function()
    except Exception as exc:
        return {"raised": type(exc).__name__, "message": str(exc)[:2000]}
    return {"raised": None}


def main():
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    inputs = [rank_input(r) for r in range(size)]
    mine = tf.constant(inputs[rank])
    report = {"size": size, "rank": rank}

    for op_name, op in (("average", hvd.Average), ("sum", hvd.Sum)):
        out = hvd.allreduce(mine, name=f"eager.{op_name}", op=op,
                            compression=TNQCompressor(bits=3))
        report[op_name] = dict(error_report(out.numpy(), inputs, op_name == "sum", 3),
                               digest=digest(out))

    out = hvd.allreduce(mine, name="eager.scaled", prescale_factor=0.5, postscale_factor=3.0,
                        compression=TNQCompressor)
    report["scaled"] = error_report(out.numpy() / 1.5, inputs, False, 4)

    compressor = TNQCompressor(bits=3)

    @tf.function
    def reduce_in_graph(x):
        return hvd.allreduce(x, name="graph.average", compression=compressor)

    first, second = reduce_in_graph(mine), reduce_in_graph(mine)
    report["graph"] = dict(error_report(first.numpy(), inputs, False, 3), digest=digest(first),
                           second_digest=digest(second),
                           second_error=error_report(second.numpy(), inputs, False, 3)["error"])

    for kind, options in (("allgather", {}), ("reduce-scatter", {}),
                          ("parts", dict(part_elements=8000))):
        forced = TNQCompressor(bits=3, exchange=kind.replace("parts", "allgather"), **options)
        eager = hvd.allreduce(mine, name=f"exchange.{kind}", compression=forced)
        graph = tf.function(lambda x: hvd.allreduce(x, name=f"exchange.graph.{kind}",
                                                    compression=forced))(mine)
        exchange = kind.replace("parts", "allgather")
        report[kind] = {mode: dict(error_report(out.numpy(), inputs, False, 3, exchange=exchange),
                                   digest=digest(out))
                        for mode, out in (("eager", eager), ("graph", graph))}

    typed = {}
    for dtype in (tf.float16, tf.bfloat16, tf.float64):
        out = hvd.allreduce(tf.reshape(tf.cast(mine, dtype), [200, 300]),
                            name=f"eager.{dtype.name}", compression=TNQCompressor(bits=4))
        typed[dtype.name] = dict(
            error_report(tf.cast(out, tf.float64).numpy(), inputs, False, 4),
            dtype=out.dtype.name, shape=out.shape.as_list(), digest=digest(out))
    report["dtypes"] = typed

    small = tf.range(10, dtype=tf.float32) * (rank + 1)
    report["passthrough_equal"] = bool(tf.reduce_all(
        hvd.allreduce(small, name="small", compression=TNQCompressor()) ==
        hvd.allreduce(small, name="small.ref")))

    poisoned = inputs[rank].copy()
    if rank == size - 1:
        poisoned[[5, 7]] = [np.nan, np.inf]
    out = hvd.allreduce(tf.constant(poisoned), name="poisoned", compression=TNQCompressor(3))
    report["nonfinite"] = {"nan_at_5": bool(np.isnan(out[5])), "inf_at_7": float(out[7]),
                           "finite_elsewhere": bool(np.isfinite(out[8:]).all())}

    mismatched = TNQCompressor(bits=3 + rank % 2)
    report["mismatched_bits_eager"] = expect_error(
        lambda: hvd.allreduce(mine, name="mismatch.eager", compression=mismatched))
    report["mismatched_bits_graph"] = expect_error(tf.function(
        lambda: hvd.allreduce(mine, name="mismatch.graph", compression=mismatched)))
    # eager collectives block: without the first-use settings check, this would wait forever
    report["mixed_exchanges_eager"] = expect_error(lambda: hvd.allreduce(
        mine, name="mixed.exchange", compression=TNQCompressor(
            bits=3, exchange="allgather" if rank == 0 else "reduce-scatter")))
    # equal settings, a tensor of another size on each rank: cut into other parts, caught by
    # the first-use plan check before the exchange
    report["mixed_parts_eager"] = expect_error(lambda: hvd.allreduce(
        mine[:len(mine) - 10_000 * rank], name="mixed.parts", compression=TNQCompressor(
            bits=3, exchange="allgather", part_elements=8192)))
    def differentiate_through():
        x = tf.Variable(inputs[rank])
        with tf.GradientTape() as tape:
            y = tf.reduce_sum(hvd.allreduce(x * 2.0, name="through", compression=compressor))
        return tape.gradient(y, x)

    report["gradient_through"] = expect_error(differentiate_through)

    # subnormal gradients: TF's executor threads flush them to zero, uncompressed TF keeps them
    tiny = np.full(N, 1e-40, np.float32)
    tiny_graph = tf.function(lambda t: hvd.allreduce(t, name="tiny", compression=compressor))
    report["subnormals"] = {
        "graph_nonzero": int(np.count_nonzero(tiny_graph(tf.constant(tiny)).numpy())),
        "uncompressed_nonzero": int(np.count_nonzero(
            hvd.allreduce(tf.constant(tiny), name="tiny.ref").numpy()))}
    report["op_max_graph"] = expect_error(tf.function(
        lambda: hvd.allreduce(mine, name="max.graph", op=hvd.Max, compression=compressor)))

    report["schemes"] = {}
    for scheme in core.SCHEMES:
        bits = next(b for b in (4, 2, 1) if core.supports(scheme, b))
        compressor = get_compressor(scheme, bits=bits, **SCHEME_OPTIONS.get(scheme, {}))
        out = hvd.allreduce(mine, name=f"scheme.{scheme}", compression=compressor)
        truth = np.mean([x.astype(np.float64) for x in inputs], axis=0)
        report["schemes"][scheme] = {
            "digest": digest(out), "bits": bits,
            # the compressor hands Horovod the core's payload of this rank's input
            "payload_bytes": int(core.encode(
                inputs[rank], scheme=scheme, bits=bits, bucket_size=512, key=1, step=0,
                options=SCHEME_OPTIONS.get(scheme)).size),
            "nmse": float(((out.numpy() - truth) ** 2).sum() / (truth ** 2).sum())}
    tape = train_with_tape()
    report["tape"] = {"losses": tape["losses"], "digests": tape["digests"]}
    report["adaptive"] = adaptive_checks(rank, size)
    for scheme in ("topk", "tnq-sparse"):  # error feedback on by default
        run = train_with_tape(compressor=TNQCompressor(scheme=scheme, bits=1))
        report[f"tape_{scheme}"] = {"losses": run["losses"], "digests": run["digests"]}
    report["error_feedback"] = error_feedback_checks()
    report["error_feedback_reduce_scatter"] = error_feedback_checks(exchange="reduce-scatter")
    with open(os.path.join(OUT_DIR, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


SCHEME_OPTIONS = {"dp-binomial": dict(dp_clip=0.1, dp_epsilon=4.0, dp_sensitivity=1e-4)}
ADAPTIVE = (("topk", 2, {}), ("tnq-sparse", 2, {}), ("dqsgd", 8, {"nmse_target": 0.05}),
            ("dp-binomial", 4, SCHEME_OPTIONS["dp-binomial"]))


def adaptive_input(rank):
    rng = np.random.default_rng(2000 + rank)
    x = rng.standard_t(1.5 + rank, N) if rank % 2 else rng.normal(size=N)
    return (0.01 * x).astype(np.float32)


def reconstruct(inputs, scheme, bits, name, step, options):
    """hvd.allreduce(op=Average) rebuilt with the numpy core from every rank's input."""
    total = None
    for rank, x in enumerate(inputs):
        payload = core.encode(x, scheme=scheme, bits=bits, bucket_size=512,
                              key=core.stream_key(0, rank, name), step=step, options=options)
        values = core.decode(payload)[0]
        total = values if total is None else total + values
    return (total * (1.0 / len(inputs))).astype(np.float32)


def adaptive_checks(rank, size):
    """topk, tnq-sparse, dqsgd and dp-binomial eagerly and in tf.function (payload sizes that
    change from step to step): the reduced tensor equals the core's reconstruction exactly."""
    inputs = [adaptive_input(r) for r in range(size)]
    mine = tf.constant(inputs[rank])
    report = {}
    for scheme, bits, options in ADAPTIVE:
        eager = get_compressor(scheme, bits=bits, error_feedback=0.0, **options)
        graph_compressor = get_compressor(scheme, bits=bits, error_feedback=0.0, **options)
        name = f"graph.{scheme}"

        @tf.function
        def in_graph(x):
            return hvd.allreduce(x, name=name, compression=graph_compressor)

        exact = []
        for step in range(2):
            out = hvd.allreduce(mine, name=f"eager.{scheme}", compression=eager)
            exact.append(bool(np.array_equal(out.numpy(), reconstruct(
                inputs, scheme, bits, f"eager.{scheme}", step, options))))
            out = in_graph(mine)
            exact.append(bool(np.array_equal(out.numpy(), reconstruct(
                inputs, scheme, bits, name, step, options))))
        report[scheme] = {"exact": exact, "traces": in_graph.experimental_get_tracing_count()}
        if scheme == "dp-binomial":
            report[scheme]["privacy"] = [eager.privacy_spent(), graph_compressor.privacy_spent(),
                                         core.privacy.account([N], 2, bits, **options)]
    return report


def train_with_tape(steps=30, compressor=None, state=None, start=0):
    """A two-layer network trained with hvd.DistributedGradientTape inside tf.function; with
    ``state`` (weights, compressor state) it resumes from a checkpoint taken at step ``start``."""
    init = np.random.default_rng(0)
    w1 = tf.Variable(init.normal(0, 0.2, (32, 128)).astype(np.float32))
    w2 = tf.Variable(init.normal(0, 0.2, (128, 4)).astype(np.float32))
    teacher = np.random.default_rng(1).normal(size=(32, 4)).astype(np.float32)
    compressor = compressor or TNQCompressor(bits=3)
    if state is not None:
        w1.assign(state[0])
        w2.assign(state[1])
        compressor.load_state_dict(state[2])

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            logits = tf.nn.relu(x @ w1) @ w2
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
        tape = hvd.DistributedGradientTape(tape, compression=compressor)
        for var, grad in zip((w1, w2), tape.gradient(loss, [w1, w2])):
            var.assign_sub(0.5 * grad)
        return loss

    losses, digests, checkpoints = [], [], {}
    for index in range(start, start + steps):
        data = np.random.default_rng(100000 * hvd.rank() + index)
        x = data.normal(size=(64, 32)).astype(np.float32)
        losses.append(float(step(tf.constant(x), tf.constant((x @ teacher).argmax(1)))))
        digests.append(hashlib.sha256(w1.numpy().tobytes() + w2.numpy().tobytes()).hexdigest())
        checkpoints[index + 1] = (w1.numpy(), w2.numpy(), compressor.state_dict())
    return {"losses": losses, "digests": digests, "checkpoints": checkpoints}


def error_feedback_checks(steps=20, resume_at=12, exchange="auto"):
    with_feedback = train_with_tape(steps, TNQCompressor(bits=2, error_feedback=1.0,
                                                         exchange=exchange))
    without = train_with_tape(steps, TNQCompressor(bits=2, exchange=exchange))
    resumed = train_with_tape(steps - resume_at, TNQCompressor(bits=2, error_feedback=1.0,
                                                               exchange=exchange),
                              state=with_feedback["checkpoints"][resume_at], start=resume_at)
    return {"losses": with_feedback["losses"], "losses_without": without["losses"],
            "continued": with_feedback["digests"][-1], "resumed": resumed["digests"][-1],
            "residuals": sorted(with_feedback["checkpoints"][resume_at][2]["residuals"])}


if __name__ == "__main__":
    main()
