"""Exact zeros (core.codec zero runs): bytes, error and Adam's update on embedding gradients,
and what the scan costs on dense ones.

    python -m benchmarks.zero_runs [--vocab 20000] [--dim 128] [--tokens 2048] [--bits 2 4]

An embedding's gradient is zero on every row whose token is not in the batch. Before version 4
of the payload those zeros were rotated into their bucket like any value, so each untouched row
came back as quantization noise, and Adam (which divides by the root of its second moment)
turned that noise into steps of about the learning rate on rows no rank touched. The gradient
here is that of a real batch: word tokens of the Python standard library's own source, ids in
order of frequency (a Zipf-like law, as in text), through nn.Embedding and a sum loss with
random weights. "without runs" is the same codec with the scan turned off, in the same process.
"""

import argparse
import collections
import pathlib
import re
import time

import numpy as np

from horovod_tnq import core
from horovod_tnq.core import codec, encoder, native


def token_batch(vocab, tokens, seed):
    """``tokens`` word ids of stdlib source text, ids by frequency rank (rarer than ``vocab``:
    the last id), from a random place in the text."""
    text = " ".join(p.read_text(errors="ignore")
                    for p in sorted(pathlib.Path(collections.__file__).parent.glob("*.py"))[:40])
    words = re.findall(r"[A-Za-z_]+", text)
    rank = {w: i for i, (w, _) in enumerate(collections.Counter(words).most_common())}
    start = np.random.default_rng(seed).integers(0, len(words) - tokens)
    return np.array([min(rank[w], vocab - 1) for w in words[start: start + tokens]])


def embedding_gradient(vocab, dim, tokens, seed):
    ids = token_batch(vocab, tokens, seed)
    upstream = np.random.default_rng(seed + 1).standard_normal((tokens, dim)).astype(np.float32)
    grad = np.zeros((vocab, dim), dtype=np.float32)
    np.add.at(grad, ids, upstream)  # what nn.Embedding's backward computes
    return grad


def adam_first_step(grad, lr=1e-3, eps=1e-8):
    """Adam's first update for gradient ``grad`` (bias-corrected): lr * g / (|g| + eps)."""
    return lr * grad / (np.abs(grad) + eps)


def measure(grad, bits, runs):
    original = encoder.MIN_ZERO_RUN  # (read by encoder.scan)
    if not runs:
        encoder.MIN_ZERO_RUN = grad.size + 1  # no run is that long
    try:
        payload = core.encode(grad, scheme="tnq-rht", bits=bits, bucket_size=512,
                              key=core.stream_key(0, 0, "embed"))
    finally:
        encoder.MIN_ZERO_RUN = original
    decoded = core.decode(payload)[0].reshape(grad.shape)
    untouched = ~grad.any(axis=1)
    error = decoded - grad
    nmse = float((error.astype(np.float64) ** 2).sum() / (grad.astype(np.float64) ** 2).sum())
    # rows no rank touched that Adam's first step moves (each by about lr: g / |g| for noise)
    steps = np.abs(adam_first_step(decoded)[untouched])
    moved = float((steps.max(axis=1) > 0).mean()) if untouched.any() else 0.0
    return payload.size, nmse, moved, float(steps.max(initial=0.0))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=20000)
    parser.add_argument("--dim", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    print("embedding gradients: vocab", args.vocab, "tokens", args.tokens, "(stdlib text)")
    print(f"{'dim':>5} {'bits':>4} {'rows hit':>8} {'bytes':>10} {'bytes ratio':>11} "
          f"{'NMSE':>8} {'NMSE ratio':>10}  untouched rows that Adam's first step moves")
    for dim in args.dim:
        grad = embedding_gradient(args.vocab, dim, args.tokens, seed=0)
        hit = grad.any(axis=1).mean()
        for bits in args.bits:
            with_runs, without = measure(grad, bits, True), measure(grad, bits, False)
            print(f"{dim:>5} {bits:>4} {hit:>8.1%} {with_runs[0]:>10} "
                  f"{with_runs[0] / without[0]:>11.3f} {with_runs[1]:>8.4f} "
                  f"{with_runs[1] / without[1]:>10.3f}  {with_runs[2]:.1%} (without runs: "
                  f"{without[2]:.1%}, by up to {without[3]:.1e} at lr=1e-3)")
    print("\ncost of the scan, and 2-bit tnq-rht encode and decode of 2 ranks' payloads, best "
          "of 7, one core:")
    rng = np.random.default_rng(0)
    for name, n in (("dense", 1 << 20), ("dense", 1 << 24), ("relu", 1 << 20),
                    ("relu", 1 << 24)):
        ranks = [relu_gradient(n, seed) if name == "relu" else
                 rng.standard_normal(n).astype(np.float32) for seed in (1, 2)]
        x = ranks[0]
        scan = _best(lambda: codec.scan(x, use_native=native.LIBRARY is not None))
        encode = _best(lambda: core.encode(x, scheme="tnq-rht", bits=2, bucket_size=512, key=1))
        both = np.concatenate([core.encode(g, scheme="tnq-rht", bits=2, bucket_size=512,
                                           key=rank + 1) for rank, g in enumerate(ranks)])
        expect = core.PayloadHeader.describe("tnq-rht", 2, "float32", n, 512, (n,))
        out = np.empty(n, np.float32)
        decode = _best(lambda: core.decode_sum(both, expect, 0.5, np.float32, out=out))
        print(f"  {name:>5} {n:>9} elements ({np.mean(x == 0):.0%} zeros): scan "
              f"{scan * 1e3:.2f} ms, encode {encode * 1e3:.1f} ms (scan {scan / encode:.1%} of "
              f"it), decode_sum of 2 {decode * 1e3:.1f} ms")


def relu_gradient(n, seed, width=4096):
    """A weight gradient of a ReLU MLP's shape: rows of units dead for the whole batch (about
    a fifth) and scattered zero columns (a tenth), as the benchmark MLP's (benchmarks/bandwidth)."""
    rng = np.random.default_rng(seed)
    grad = rng.standard_normal((n // width, width)).astype(np.float32)
    grad[rng.random(n // width) < 0.2] = 0
    grad[:, rng.random(width) < 0.1] = 0
    return grad.reshape(-1)


def _best(function, repeats=7):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


if __name__ == "__main__":
    main()
