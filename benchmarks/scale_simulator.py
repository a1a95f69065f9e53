"""N ranks in one process: the averaged gradient's error and the bytes each rank sends, for every
exchange, from 2 to 512 ranks, with the core's real payloads (no horovodrun).

    python -m benchmarks.scale_simulator [--ranks 2 3 4 8 16 64 512] [--bits 2 3 4]
                                         [--elements 1048576] [--noise 0.01] [--seed 0]

Every rank holds the same gradient g plus its own noise (g_i = g + noise * n_i; g and n_i
Student-t(3)), as in data-parallel training, and the job averages them (op=Average). Each
exchange runs as protocol/plan.py lays it out (plan(), chunk_bounds, second_bits), on payloads
encoded and decoded by horovod_tnq.core with each rank's own random stream:

* allgather: every rank decodes the sum of the N payloads of the whole tensor;
* reduce-scatter: each owner decodes and sums its chunk of every rank's payload, quantizes the
  sum again at plan.second_bits(...) bits ("same bits": at the first width, the exchange before
  second_bits), and every rank decodes the owners' payloads.

Reported per (bits, N): NMSE of the averaged result against the true average; "x N / single",
that NMSE times N over one rank's own NMSE (1.0: the ranks' errors average away like 1/N); and
bits sent per rank and gradient element (payload bytes * 8 / elements; Horovod's ring
allreduce of float32 sends 2 (N - 1) / N * 32). Payloads are counted as sent, not timed.
"""

import argparse

import numpy as np

from horovod_tnq import CompressorConfig, core
from horovod_tnq.protocol import chunk_bounds, second_round_config

SCHEME, BUCKET = "tnq-rht", 512


def gradients(ranks, elements, noise, seed):
    rng = np.random.default_rng(seed)
    shared = rng.standard_t(3, elements)
    return [(shared + noise * rng.standard_t(3, elements)).astype(np.float32)
            for _ in range(ranks)]


def _encode(values, config, rank, name):
    return core.encode(values, scheme=config.scheme, bits=config.bits,
                       bucket_size=config.bucket_size, key=core.stream_key(0, rank, name))


def _sum(payloads, numel, config, factor=1.0):
    expect = core.PayloadHeader.describe(config.scheme, config.bits, "float32", numel,
                                         config.bucket_size, (numel,))
    return core.decode_sum(np.concatenate(payloads), expect, factor, np.float64)[0]


def allgather(grads, config):
    """(the averaged result, bytes each rank sends)."""
    payloads = [_encode(g, config, rank, "t") for rank, g in enumerate(grads)]
    n = len(grads)
    return _sum(payloads, grads[0].size, config, 1.0 / n), (n - 1) * payloads[0].size


def reduce_scatter(grads, config, second):
    """(the averaged result, bytes each rank sends (the mean over ranks)), the owners' sums
    quantized with ``second`` (settings)."""
    n, numel = len(grads), grads[0].size
    bounds = chunk_bounds(numel, n, config.bucket_size)
    result, sent = np.empty(numel), 0
    for owner, (start, stop) in enumerate(bounds):
        chunks = [_encode(g[start:stop], config, rank, f"t#{owner}")
                  for rank, g in enumerate(grads)]
        sent += sum(c.size for rank, c in enumerate(chunks) if rank != owner)
        chunk_sum = _sum(chunks, stop - start, config).astype(np.float32)
        reduced = _encode(chunk_sum, second, owner, "t#reduced")
        sent += (n - 1) * reduced.size
        result[start:stop] = _sum([reduced], stop - start, second, 1.0 / n)
    return result, sent / n


def nmse(result, truth):
    return float(((result - truth) ** 2).sum() / (truth ** 2).sum())


def simulate(ranks, bits, elements=1 << 20, noise=0.01, seed=0):
    """Rows of (exchange, NMSE, NMSE x N / single, bits per element sent) at ``ranks``."""
    grads = gradients(ranks, elements, noise, seed)
    truth = np.mean([g.astype(np.float64) for g in grads], axis=0)
    config = CompressorConfig(scheme=SCHEME, bits=bits, bucket_size=BUCKET)
    single = np.mean([nmse(core.decode(_encode(g, config, rank, "t"))[0], g.astype(np.float64))
                      for rank, g in enumerate(grads[:4])])
    runs = {"allgather": lambda: allgather(grads, config)}
    if elements >= ranks * BUCKET:
        wide = second_round_config(config, ranks)
        runs[f"reduce-scatter, second round {wide.bits} bits"] = \
            lambda: reduce_scatter(grads, config, wide)
        if wide.bits != bits:
            runs[f"reduce-scatter, same bits ({bits})"] = \
                lambda: reduce_scatter(grads, config, config)
    rows = []
    for name, run in runs.items():
        result, sent = run()
        error = nmse(result, truth)
        rows.append((name, error, error * ranks / single, sent * 8 / elements))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 3, 4, 8, 16, 64, 512])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--elements", type=int, default=1 << 20)
    parser.add_argument("--noise", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{SCHEME}, bucket {BUCKET}, {args.elements} elements, g_i = g + {args.noise} n_i")
    print("| bits | N | exchange | NMSE of the average | x N / single | bits sent per rank "
          "and element | vs ring allreduce (fp32) |")
    print("|---|---|---|---|---|---|---|")
    for bits in args.bits:
        for ranks in args.ranks:
            ring = 2 * (ranks - 1) / ranks * 32
            for name, error, ratio, sent in simulate(ranks, bits, args.elements, args.noise,
                                                     args.seed):
                print(f"| {bits} | {ranks} | {name} | {error:.4g} | {ratio:.2f} | {sent:.2f} | "
                      f"{sent / ring:.3f} |", flush=True)


if __name__ == "__main__":
    main()
