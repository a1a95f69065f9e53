"""Bias of each scheme: does the error of the mean of many compressions of one gradient vanish?

    python -m benchmarks.bias [--draws 64] [--elements 65536] [--bits 2 3 4 8]

For an unbiased scheme, the mean of K independent compressions (different seeds) of the same
gradient g has error NMSE(mean) ~ NMSE(one draw) / K, so K * NMSE(mean) / NMSE(one) ~ 1. A
biased scheme keeps an error floor: K * NMSE(mean) grows with K (the ratio is large). With N
data-parallel workers whose gradients are alike, that floor is what the averaged gradient keeps
however large N grows. Gradients: Student-t(3) (heavy tails) and Gaussian, float32.
"""

import argparse

import numpy as np

from horovod_tnq import core


def nmse(decoded, x):
    x = x.astype(np.float64)
    return float(((decoded - x) ** 2).sum() / (x ** 2).sum())


def measure(x, scheme, bits, draws):
    decoded = [core.decode(core.encode(x, scheme=scheme, bits=bits, bucket_size=512,
                                       key=core.stream_key(draw, 0, "bias")))[0]
               for draw in range(draws)]
    one = float(np.mean([nmse(d, x) for d in decoded]))
    mean = nmse(np.mean(decoded, axis=0), x)
    return one, mean


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=64)
    parser.add_argument("--elements", type=int, default=1 << 16)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    parser.add_argument("--schemes", nargs="+", default=["tnq-rht", "tnq", "qsgdinf", "maxmin"])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    sources = {"student_t3": rng.standard_t(3, args.elements).astype(np.float32),
               "gaussian": rng.normal(size=args.elements).astype(np.float32)}
    print(f"K = {args.draws} draws; ratio = K * NMSE(mean of draws) / NMSE(one draw): about 1 "
          "for an unbiased scheme, large for a biased one")
    print("| source | scheme | bits | NMSE one draw | NMSE mean of draws | ratio |")
    print("|---|---|---|---|---|---|")
    for source, x in sources.items():
        for scheme in args.schemes:
            for bits in args.bits:
                if not core.supports(scheme, bits):
                    continue
                one, mean = measure(x, scheme, bits, args.draws)
                print(f"| {source} | {scheme} | {bits} | {one:.4g} | {mean:.4g} | "
                      f"{args.draws * mean / one:.2f} |")


if __name__ == "__main__":
    main()
