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
    padded = np.zeros(buckets * bucket_size, dtype=flat.dtype)
    np.abs(flat, out=padded[:n])
    rows = padded.reshape(buckets, bucket_size)
    if statistic == "max_abs":
        return rows.max(axis=1).astype(np.float64)
    if statistic == "l2":
        rows = rows.astype(np.float64)
        return np.sqrt(np.einsum("ij,ij->i", rows, rows))
    counts = np.full(buckets, bucket_size, dtype=np.float64)
    counts[-1] = n - (buckets - 1) * bucket_size
    return rows.sum(axis=1, dtype=np.float64) / counts


def mean_abs_per_bucket(flat, bucket_size):
    """The Laplace scale of each bucket: bucket_statistic(..., "mean_abs")."""
    return bucket_statistic(flat, bucket_size, "mean_abs")
