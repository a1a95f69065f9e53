"""Truncation and unbiased stochastic rounding onto a sorted level table."""

import numpy as np


def stochastic_round(values, table, noise):
    """Codes (uint8 indices into ``table``) for float32 ``values``.

    Values are first truncated to [table[0], table[-1]]; a value between adjacent levels
    lo <= v <= hi becomes hi with probability (v - lo) / (hi - lo), so the expected decoded value
    equals the truncated value. ``noise`` holds one uniform [0, 1) draw per value.
    """
    table = np.asarray(table, dtype=np.float32)
    v = np.clip(values, table[0], table[-1])
    cell = np.searchsorted(table, v, side="right") - 1
    np.clip(cell, 0, table.size - 2, out=cell)
    lo = table[cell]
    p = (v - lo) / (table[cell + 1] - lo)
    return (cell + (noise < p)).astype(np.uint8)


STATISTICS = ("mean_abs", "l2", "max_abs")

# Bucket sums are taken in LANES interleaved partial sums (lane j adds elements j, j + LANES, ...
# of the bucket in order), then lane 0 + lane 1 + ... in order. That is an order a vectorised
# kernel (native.c) can follow, so float64 sums, and float64 tensors' scales, agree to the bit.
LANES = 16


def bucket_statistic(flat, bucket_size, statistic="mean_abs"):
    """One scale per bucket of ``bucket_size`` consecutive elements (the last may be short),
    accumulated in float64:

    * "mean_abs": mean |x|, the maximum-likelihood Laplace scale (TNQ);
    * "l2": the bucket's Euclidean norm (QSGD, NUQSGD);
    * "max_abs": max |x| (QSGDinf, TernGrad, sign).
    """
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; known: {STATISTICS}")
    n = flat.size
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    buckets = -(-n // bucket_size)
    width = -(-bucket_size // LANES) * LANES
    magnitudes = np.zeros(buckets * bucket_size, dtype=np.float64)
    np.abs(flat, out=magnitudes[:n], casting="unsafe")
    rows = np.zeros((buckets, width), dtype=np.float64)
    rows[:, :bucket_size] = magnitudes.reshape(buckets, bucket_size)
    if statistic == "max_abs":
        return rows.max(axis=1)
    if statistic == "l2":
        rows *= rows
    total = lane_sums(rows)
    if statistic == "l2":
        return np.sqrt(total)
    counts = np.full(buckets, bucket_size, dtype=np.float64)
    counts[-1] = n - (buckets - 1) * bucket_size
    return total / counts


def lane_sums(rows):
    """The float64 sum of each row (rows: float64, length a multiple of LANES, zero-padded) in
    the lane order described above."""
    count, width = rows.shape
    # a reduction over a middle axis adds its slices one after another: the lane order
    lanes = rows.reshape(count, width // LANES, LANES).sum(axis=1)
    total = lanes[:, 0].copy()
    for lane in range(1, LANES):
        total += lanes[:, lane]
    return total


def per_element(per_bucket, bucket_size, n):
    """Each bucket's value repeated over its elements: ``n`` values, the last bucket short when
    n is not a multiple of bucket_size (np.repeat(per_bucket, bucket_size)[:n] without
    allocating the padding)."""
    counts = np.full(per_bucket.size, bucket_size, dtype=np.int64)
    if counts.size:
        counts[-1] = n - bucket_size * (counts.size - 1)
    return np.repeat(per_bucket, counts)


def bucket_min_max(flat, bucket_size):
    """(min, max) of each bucket, float64 (MaxMin's two parameters). The last bucket is padded
    with its own last element, so padding never widens its range."""
    n = flat.size
    if n == 0:
        return np.zeros(0), np.zeros(0)
    buckets = -(-n // bucket_size)
    padded = np.full(buckets * bucket_size, flat[-1], dtype=np.float64)
    padded[:n] = flat
    rows = padded.reshape(buckets, bucket_size)
    return rows.min(axis=1), rows.max(axis=1)


def mean_abs_per_bucket(flat, bucket_size):
    """The Laplace scale of each bucket: bucket_statistic(..., "mean_abs")."""
    return bucket_statistic(flat, bucket_size, "mean_abs")


# Multipliers of the closed-form scale tried by fit_scales: octaves first, then refinements
# by half, quarter and eighth octaves around each bucket's best so far.
FIT_OCTAVES = tuple(2.0 ** k for k in range(-1, 7))
FIT_REFINEMENTS = (2.0 ** 0.5, 2.0 ** 0.25, 2.0 ** 0.125)


def expected_error(rows, scales, table):
    """Exact E||Q(x) - x||^2 per bucket (rows: one bucket per row, float64) when bucket i is
    quantized with levels scales[i] * table: truncation bias plus stochastic-rounding variance
    (v - lo)(hi - v) of every element."""
    y = rows / np.where(scales > 0, scales, 1.0)[:, None]
    v = np.clip(y, table[0], table[-1])
    cell = np.clip(np.searchsorted(table, v, side="right") - 1, 0, table.size - 2)
    per_element = (y - v) ** 2 + (v - table[cell]) * (table[cell + 1] - v)
    return per_element.sum(axis=1) * scales ** 2


def fit_scales(flat, bucket_size, table, scales, octaves=True, extra=None):
    """Per-bucket scales that minimise the exact expected error on the bucket's own values.

    TNQ's closed form places alpha* and the levels for a Laplace bucket of scale gamma; heavier
    tails (Student-t, output layers) need a larger threshold. Keeping TNQ's level shape, search
    multipliers of gamma for the one whose truncation + rounding error (the quantity the paper
    minimises, E_TQ) is smallest on the observed data: the "fit to the observed tail" of shared
    notes ALGORITHMS.md. The decoder needs nothing new: the fitted scale is the scale it reads.
    With ``octaves=False`` only the refinements around ``scales`` are tried (a scale that is
    already close, as in tnq-opt's later rounds); ``extra`` (one per bucket) is tried before the
    refinements.
    """
    n = flat.size
    if n == 0:
        return scales
    table = np.asarray(table, dtype=np.float64)
    buckets = scales.size
    rows = np.zeros(buckets * bucket_size, dtype=np.float64)
    rows[:n] = flat
    rows = rows.reshape(buckets, bucket_size)
    # zero padding of the last bucket must not sway its choice: remove its error again
    padding = np.zeros(buckets)
    padding[-1] = buckets * bucket_size - n
    zero_error = float(expected_error(np.zeros((1, 1)), np.ones(1), table)[0])

    def error(candidate):
        return expected_error(rows, candidate, table) - padding * zero_error * candidate ** 2

    octave_multipliers = FIT_OCTAVES if octaves else (1.0,)
    best = scales * octave_multipliers[0]
    best_error = error(best)
    for candidate in [scales * m for m in octave_multipliers[1:]] + \
            ([] if extra is None else [extra]):
        candidate_error = error(candidate)
        better = candidate_error < best_error
        best = np.where(better, candidate, best)
        best_error = np.where(better, candidate_error, best_error)
    for step in FIT_REFINEMENTS:
        centre = best
        for candidate in (centre / step, centre * step):
            candidate_error = error(candidate)
            better = candidate_error < best_error
            best = np.where(better, candidate, best)
            best_error = np.where(better, candidate_error, best_error)
    return best
