"""CPU cost of the codec: encode and decode time against a numpy copy of the same input,
measured in the same process (best of several runs, one thread), for the compiled kernel
(native.c) and the numpy reference.

    OMP_NUM_THREADS=1 python -m benchmarks.cpu_speed [--elements 1048576 16777216]

"decode" is decode_sum of one rank's payload into a float32 gradient, "decode 8" of eight
ranks' payloads (what each rank does in an 8-worker allgather exchange).

A second table (skip it with --no-frameworks) times the same codec calls through each
framework adapter, on the same tensor: PyTorch (torch/codecs.py's encode_tensor, and
the core's decode_sum, its numpy result wrapped by torch.from_numpy; the torch adapter itself
decodes into a torch.empty, whose memory PyTorch takes in 4 KB pages unless
THP_MEM_ALLOC_ENABLE=1: on 16M elements that took 1.9x the CPU time, 16385 page faults against
numpy's 544) and TensorFlow, eagerly and inside tf.function (the TF
compressor's host_values and numpy_call: the core called on the tensor's buffer when eager,
through tf.numpy_function in graphs), with TF's time as a ratio of PyTorch's: medians of
interleaved rounds, by wall clock and by the process's CPU clock. Calling a tf.function has a
cost of its own whatever it computes (0.25 to 0.3 ms on a 2-core VM, and the op runs on TF's
executor thread), which a training step pays once for all its tensors; so "per tensor" is
what one more encode (decode) adds to a tf.function call, against what one more adds to
PyTorch calls whose results are held alike (a step holds every decoded gradient): fresh
outputs may cost page faults, as many in either framework when the allocator returned the
previous ones to the system, which a lone call that reuses one warm buffer never pays.
"""

import argparse
import gc
import os
import statistics
import time

import numpy as np

from horovod_tnq import core
from horovod_tnq.core import native

# settings for schemes that need some (dp-binomial: epsilon 1 per release, so its cost, about
# trials / 32 generator words per element, is that of a realistic target)
OPTIONS = {"dp-binomial": dict(dp_clip=1.0, dp_epsilon=1.0, dp_sensitivity=1e-3)}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def best_time(function, repeats, clock=time.perf_counter):
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        function()
        best = min(best, clock() - start)
    return best


def measure(x, scheme, bits, reference, repeats, clock=time.perf_counter):
    """(encode s, decode s, decode-of-8 s) for one configuration."""
    def encode(key=1):
        return core.encode(x, scheme=scheme, bits=bits, bucket_size=512, key=key,
                           options=OPTIONS.get(scheme), reference=reference)
    payload = encode()
    header = core.read_header(payload)
    eight = np.concatenate([payload] + [encode(key) for key in range(2, 9)])
    return (best_time(encode, repeats, clock),
            best_time(lambda: core.decode_sum(payload, header, 1.0, np.float32,
                                              reference=reference), repeats, clock),
            best_time(lambda: core.decode_sum(eight, header, 1 / 8, np.float32,
                                              reference=reference), repeats, clock))


GRAPH_OPS = 5  # tensors per graph, and PyTorch calls whose results are held together


def sample(paths, rounds):
    """{name: [(wall s, CPU s) of each round]} of the calls in ``paths`` ({name: function}): one
    call of each per round, in turn, so that load that comes and goes weighs on all of them
    alike; Python's garbage collector off, as in timeit. The results are dropped inside the
    timed span (freeing them is part of the cost)."""
    samples = {name: [] for name in paths}
    collecting = gc.isenabled()
    gc.disable()
    try:
        for function in paths.values():
            function()  # warm-up: traces the tf.functions, faults in the first buffers
        for _ in range(rounds):
            for name, function in paths.items():
                wall, cpu = time.perf_counter(), time.process_time()
                function()
                samples[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    finally:
        if collecting:
            gc.enable()
    return samples


def framework_times(x, scheme, bits, rounds):
    """{(op, clock): [PyTorch, TF eager, TF tf.function, PyTorch per tensor, TF per tensor]}
    median seconds of encoding ``x`` into one payload (op "encode") and decoding it ("decode"),
    by wall and by CPU clock. "per tensor": what one more tensor adds, measured alike in both
    frameworks: GRAPH_OPS calls whose results are all alive at the end against one, in PyTorch,
    and a tf.function of GRAPH_OPS such ops against one of one op, taken round by round."""
    import tensorflow as tf
    import torch

    from horovod_tnq import CompressorConfig
    from horovod_tnq.tensorflow import compressor as tf_adapter
    from horovod_tnq.torch import codecs as torch_adapter

    config = CompressorConfig(bits=bits, scheme=scheme, bucket_size=512,
                              **OPTIONS.get(scheme, {}))
    key, step = 1, 0
    host = torch.from_numpy(x)
    payload = torch_adapter.encode_tensor(host, config, key, step)
    header = core.read_header(payload)

    def torch_encode():
        return torch.from_numpy(torch_adapter.encode_tensor(host, config, key, step))

    def torch_decode():
        total, _ = core.decode_sum(payload, header, 1.0, np.float32)
        return torch.from_numpy(total).reshape(host.shape)

    def encode(values, step):  # as TNQCompressor.compress() calls the core for one payload
        return core.encode(values.reshape(-1), scheme=scheme, bits=bits, bucket_size=512,
                           key=key, step=int(step), dtype_name="float32", shape=values.shape,
                           options=config.scheme_options())

    def decode(scale, gathered):  # as TNQCompressor.decompress() does for one payload
        total = tf_adapter.aligned_empty(x.size, np.float32)
        core.decode_sum(gathered, header, float(scale), np.float32, out=total)
        return total.reshape(x.shape)

    def tf_encode(tensor, step, ops=1):
        return [tf_adapter.numpy_call(encode, [tf_adapter.host_values(tensor), step], tf.uint8)
                for _ in range(ops)]

    def tf_decode(gathered, scale, ops=1):
        return [tf_adapter.numpy_call(decode, [scale, gathered], tf.float32)
                for _ in range(ops)]

    tensor, gathered = tf.constant(x), tf.constant(payload)
    scale, graph_step = tf.constant(1.0, tf.float64), tf.constant(step, tf.int64)
    paths = {}
    for op, torch_path, tf_path, inputs, eager_inputs, expected in (
            ("encode", torch_encode, tf_encode, (tensor, graph_step), (tensor, step), payload),
            ("decode", torch_decode, tf_decode, (gathered, scale), (gathered, scale),
             torch_decode())):
        graph = tf.function(tf_path)
        several = tf.function(lambda *args, tf_path=tf_path: tf_path(*args, ops=GRAPH_OPS))
        for out in (tf_path(*eager_inputs), graph(*inputs), several(*inputs)):
            assert all(np.array_equal(o.numpy(), np.asarray(expected)) for o in out)
        paths.update({
            (op, "PyTorch"): torch_path,
            (op, "PyTorch several"): lambda f=torch_path: [f() for _ in range(GRAPH_OPS)],
            (op, "TF eager"): lambda f=tf_path, a=eager_inputs: f(*a),
            (op, "TF tf.function"): lambda f=graph, a=inputs: f(*a),
            (op, "TF several"): lambda f=several, a=inputs: f(*a)})
    samples = sample(paths, rounds)
    times = {}
    for op in ("encode", "decode"):
        for index, clock in enumerate(("wall", "cpu")):
            def column(name):
                return [s[index] for s in samples[op, name]]

            def per_tensor(framework, one):
                return [(many - single) / (GRAPH_OPS - 1)
                        for many, single in zip(column(framework + " several"), column(one))]

            times[op, clock] = [statistics.median(values) for values in (
                column("PyTorch"), column("TF eager"), column("TF tf.function"),
                per_tensor("PyTorch", "PyTorch"), per_tensor("TF", "TF tf.function"))]
    return times


def configurations(args):
    """(elements, float32 Laplace input, scheme, bits) for every combination asked for that
    the scheme supports; the same input for every scheme at a size."""
    for n in args.elements:
        x = np.random.default_rng(0).laplace(size=n).astype(np.float32)
        for scheme in args.schemes:
            for bits in args.bits:
                if core.supports(scheme, bits):
                    yield n, x, scheme, bits


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, nargs="+", default=[1 << 20, 1 << 24])
    parser.add_argument("--schemes", nargs="+",
                        default=["tnq", "tnq-fit", "tnq-opt", "qsgdinf", "maxmin", "orq"])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each call in the codec's table (the best counts)")
    parser.add_argument("--rounds", type=int, default=15,
                        help="rounds of the frameworks' table (medians count)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the (slow) numpy reference")
    parser.add_argument("--no-frameworks", action="store_true",
                        help="skip the table of the PyTorch and TensorFlow adapters")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="the codec's table: cpu: this process's CPU time, steadier than "
                             "wall time on a machine other jobs share (the frameworks' table "
                             "gives both)")
    args = parser.parse_args()
    clock = CLOCKS[args.clock]
    if native.LIBRARY is None:
        raise SystemExit("the compiled kernel is not built (make install builds it)")
    kernels = [("native", False)] + ([] if args.no_reference else [("numpy", True)])
    print("Times in ms; ratios are against `x.copy()` of the same float32 input.\n")
    print("| elements | scheme | bits | kernel | copy | encode | encode / copy | decode | "
          "decode / copy | decode 8 | decode 8 / copy |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, x, scheme, bits in configurations(args):
        for kernel, reference in kernels:
            copy = best_time(x.copy, args.repeats, clock)
            enc, dec, dec8 = measure(x, scheme, bits, reference, args.repeats, clock)
            print(f"| {n} | {scheme} | {bits} | {kernel} | {1e3 * copy:.1f} | "
                  f"{1e3 * enc:.1f} | {enc / copy:.2f} | {1e3 * dec:.1f} | "
                  f"{dec / copy:.2f} | {1e3 * dec8:.1f} | {dec8 / copy:.2f} |", flush=True)
    if args.no_frameworks:
        return
    import tensorflow as tf
    import torch
    torch.set_num_threads(1)  # one thread, as the core's kernel; TF runs one op at a time
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    print("\nThe same calls through each framework adapter (one payload of float32): medians of "
          f"{args.rounds} interleaved rounds in ms, by wall clock and by this process's CPU "
          "clock (all its threads), TF as a ratio of PyTorch. \"per tensor\": what one more "
          f"tensor adds, {GRAPH_OPS} against 1 in both (PyTorch: calls whose results are all "
          "held; TF: ops in one tf.function). Load average at the start: "
          f"{os.getloadavg()[0]:.2f}.\n")
    print("| elements | scheme | bits | op | clock | PyTorch | TF eager | TF tf.function | "
          "PyTorch per tensor | TF per tensor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, x, scheme, bits in configurations(args):
        times = framework_times(x, scheme, bits, args.rounds)
        for (op, clock), (torch_call, eager, graph, torch_tensor, tf_tensor) in times.items():
            cells = [f"{1e3 * torch_call:.2f}"] + [
                f"{1e3 * t:.2f} ({t / torch_call:.2f}x)" for t in (eager, graph)] + [
                f"{1e3 * torch_tensor:.2f}",
                f"{1e3 * tf_tensor:.2f} ({tf_tensor / torch_tensor:.2f}x)"]
            print(f"| {n} | {scheme} | {bits} | {op} | {clock} | {' | '.join(cells)} |",
                  flush=True)

if __name__ == "__main__":
    main()
