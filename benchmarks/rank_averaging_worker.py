"""Runs under `horovodrun -np N` for benchmarks/rank_averaging.py: the error of the averaged
gradient beside the error of one rank's own compression.

    rank_averaging_worker.py OUT_DIR [--schemes ...] [--bits ...] [--exchanges ...]
                             [--elements E] [--noise 0.1] [--seed 0]

Rank i's gradient is g_i = g + noise * n_i, with g and every n_i independent Student-t(3) draws
(so the ranks' gradients differ by about ``noise`` of their norm, as in data-parallel training).
Every rank draws all of them from the seed, so each knows the true mean exactly. For each
(scheme, bits, exchange) every rank calls the stock API once,

    hvd.allreduce(g_i, name=..., op=hvd.Average,
                  compression=TNQCompressor(scheme=..., bits=..., exchange=...))

and records the NMSE of the result against mean_i g_i, a digest of the result (the ranks must
agree), and the NMSE of its own compression of g_i alone: core.encode/core.decode with the key
and step the compressor gives this rank's whole tensor (in the allgather exchange that is exactly
the payload this rank sent). Writes OUT_DIR/rank<r>.json.
"""

import argparse
import hashlib
import json
import os

import horovod.torch as hvd
import numpy as np
import torch

from horovod_tnq import core
from horovod_tnq.torch import TNQCompressor


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--schemes", nargs="+", default=["tnq-rht", "tnq"])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--exchanges", nargs="+", default=["allgather", "reduce-scatter"])
    parser.add_argument("--elements", type=int, default=1 << 18)
    parser.add_argument("--noise", type=float, default=0.1,
                        help="g_i = g + noise * n_i (n_i distributed as g)")
    parser.add_argument("--seed", type=int, default=0, help="draws the gradients")
    parser.add_argument("--bucket-size", type=int, default=512)
    return parser.parse_args(argv)


def rank_gradients(size, elements, noise, seed):
    """[g_0, ..., g_{size-1}] as float32 torch tensors: g_i = g + noise * n_i."""
    g = np.random.default_rng([seed, 0]).standard_t(3, elements)
    return [torch.from_numpy((g + noise * np.random.default_rng([seed, 1 + i])
                              .standard_t(3, elements)).astype(np.float32))
            for i in range(size)]


def digest(tensor):
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def nmse(estimate, truth):
    return float(((estimate - truth) ** 2).sum() / (truth ** 2).sum())


def measure(inputs, truth, scheme, bits, exchange, bucket_size):
    rank = hvd.rank()
    name = f"rank_averaging.{scheme}.{bits}.{exchange}"
    compressor = TNQCompressor(scheme=scheme, bits=bits, exchange=exchange,
                               bucket_size=bucket_size)
    out = hvd.allreduce(inputs[rank], name=name, op=hvd.Average, compression=compressor)
    # this rank's own compression, as the compressor keys its whole tensor (first use: step 0)
    mine = inputs[rank].numpy()
    own = core.decode(core.encode(mine, scheme=scheme, bits=bits, bucket_size=bucket_size,
                                  key=core.stream_key(compressor.config.seed, rank, name),
                                  step=0))[0]
    counters = compressor.metrics()["counters"]
    used = [kind for kind in ("allgather", "reduce-scatter") if counters[kind]]
    return {"scheme": scheme, "bits": bits, "exchange": exchange, "ranks": hvd.size(),
            "exchange_used": used, "digest": digest(out),
            "nmse": nmse(out.double().numpy(), truth),
            "single_nmse": nmse(own, mine.astype(np.float64)),
            "payload_bytes": counters["payload_bytes"]}


def main():
    args = parse_args()
    hvd.init()
    inputs = rank_gradients(hvd.size(), args.elements, args.noise, args.seed)
    truth = np.mean([x.double().numpy() for x in inputs], axis=0)
    rows = [measure(inputs, truth, scheme, bits, exchange, args.bucket_size)
            for scheme in args.schemes for bits in args.bits for exchange in args.exchanges]
    report = {"rank": hvd.rank(), "size": hvd.size(), "elements": args.elements,
              "noise": args.noise, "rows": rows}
    with open(os.path.join(args.out_dir, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(report, f)
    hvd.shutdown()


if __name__ == "__main__":
    main()
