"""Levels and bucket parameters fitted to each tensor's own values: MaxMin, BinGrad, ORQ, tnq-opt.

Every scheme decodes bucket i as ``offset[i] + scale[i] * table[code]``. The fixed-table schemes
(schemes.SCHEMES) take the scale from a bucket statistic; the schemes here compute their parameters
from the data, and those that fit a level table send it in the payload. Each fit returns a
BucketFit. Both framework adapters call these same functions, so both send the same bytes.

Optimal levels for a given set of values (re-derived here; Xu, Huo, Huang, "Optimal Gradient
Quantization Condition for Communication-Efficient Distributed Training", arXiv 2002.11082, state
them for a gradient density p; the sums below are the same conditions on the observed values,
each value y weighted by w = scale^2 of its bucket, since its error counts scale^2 times):

* Unbiased stochastic rounding between levels a < b < c costs (y - a)(b - y) for a < y < b and
  (y - b)(c - y) for b < y < c. As a function of b each term is a V of two lines, so the cost is
  convex in b, with slope  sum_{a<y<b} w (y - a) - sum_{b<y<c} w (c - y).  It crosses zero where
  the weight of the values below b equals  D = sum_{a<y<c} w (c - y) / (c - a),  the weight that
  would round down to a if b were not there (the paper's multi-level condition
  int_a^b (y - a) p = int_b^c (c - y) p). The best b given its neighbours is therefore the value
  at which the cumulative weight from a reaches D: an order statistic, found with one
  searchsorted on prefix sums.
* With truncation (TNQ's E_TQ: clipping bias plus rounding variance), the top level b above its
  neighbour a also pays sum_{y>b} w (y - b)^2; the slope becomes
  sum_{a<y<b} w (y - a) - 2 sum_{y>b} w (y - b), increasing in b, zero at
  b = (2 sum_{y>b} w y - sum_{a<y<b} w (y - a)) / (2 sum_{y>b} w) inside the right gap between
  sorted values. The bottom level mirrors it.
* Binary (BinGrad, biased, deterministic): two levels b1 < b2 with the split at their midpoint
  minimise the squared error only if b1 and b2 are the means of the values below and above the
  midpoint (the paper's binary condition), so the split is a cut of the sorted values; the best
  cut is found by trying them all (bingrad_fit).

fit_level_table applies the conditions level by level (odd levels, then even ones, so each
half-sweep is an exact minimisation over independent levels) for a fixed number of sweeps: the
error never increases, and the number of steps, hence the result, is the same in every framework.
Such a descent moves information by one level per sweep, so grow_level_table fits coarse tables
first and interpolates each to twice the levels before fitting again (ORQ at 8 bits on
Student-t(3): NMSE 0.00014 grown from 2 levels, 0.0005 after 512 sweeps from uniform levels).
"""

from typing import NamedTuple, Optional

import numpy as np

from .levels import maxmin_levels, tnq_levels
from .quantize import bucket_min_max, bucket_statistic, expected_error, fit_scales, per_element

# A level table is fitted on at most this many values (every k-th element of a larger tensor):
# a table has at most 2**bits levels, and 64k values place 16 of them as well as millions do.
FIT_SAMPLE = 1 << 16
TABLE_SWEEPS = 32  # per fit_level_table call, i.e. per level count while growing
TNQ_OPT_ROUNDS = 2


class BucketFit(NamedTuple):
    table: np.ndarray               # float32 levels for unit scale, strictly ascending
    scales: np.ndarray              # float64, one per bucket (negative: the bucket is mirrored)
    offsets: Optional[np.ndarray]   # float64, one per bucket, or None (offset 0)


def maxmin_fit(flat, bucket_size, bits):
    """Bucketed MaxMin: 2**bits uniform levels from the bucket's min to its max, as CGX
    (IST-DASLab's Horovod fork) and Bagua's ByteGrad send them: two floats per bucket."""
    low, high = bucket_min_max(flat, bucket_size)
    return BucketFit(maxmin_levels(bits), (high - low) / 2.0, (high + low) / 2.0)


def bingrad_fit(flat, bucket_size, bits):
    """BinGrad (Xu et al., arXiv 2002.11082): per bucket the two levels b1 < b2 that minimise the
    squared error of deterministic 1-bit quantization. The optimal condition (each level the mean
    of the values nearer to it) makes the split a cut of the sorted bucket, so every cut is tried:
    with prefix sums S_k of the k smallest values out of m, the error is
    sum x^2 - S_k^2 / k - (S_m - S_k)^2 / (m - k), lowest at the best cut, and b1 = S_k / k,
    b2 = (S_m - S_k) / (m - k). (Lloyd's alternation from the mean also ends at a pair meeting the
    condition, not always the best one, and slowly on heavy tails: Student-t(2) NMSE 0.42 after
    8 steps, 0.34 at its fixed point, 0.31 at the best cut.) Sent as offset (b1 + b2) / 2 and
    scale (b2 - b1) / 2 with the table {-1, 1}; nearest rounding.

    Per bucket rather than per tensor: two floats per 512 values (0.125 bits per element) buy far
    more than they cost at 1 bit (quality benchmark, Student-t(2): NMSE 0.31 against 0.74 with
    one pair of levels for the whole tensor; the CNN's first dense layer 0.18 against 0.57).
    """
    n = flat.size
    table = np.array([-1.0, 1.0], dtype=np.float32)
    if bucket_size == 1:  # one value per bucket: its own offset
        return BucketFit(table, np.zeros(n), flat.astype(np.float64))
    buckets = -(-n // bucket_size)
    rows = np.full(buckets * bucket_size, np.inf)  # padding sorts last and is never counted
    rows[:n] = flat
    rows = np.sort(rows.reshape(buckets, bucket_size), axis=1)
    counts = np.full(buckets, bucket_size)
    counts[-1:] = n - (buckets - 1) * bucket_size
    sums = np.cumsum(np.where(np.isfinite(rows), rows, 0.0), axis=1)
    total = sums[:, -1]
    cut = np.arange(1, bucket_size)  # the k smallest values below the cut
    below, above = sums[:, :-1], total[:, None] - sums[:, :-1]
    allowed = cut[None, :] < counts[:, None]
    left, right = cut[None, :], np.maximum(counts[:, None] - cut[None, :], 1)
    score = np.where(allowed, below ** 2 / left + above ** 2 / right, -np.inf)
    best = first_index(allowed & (score == score.max(axis=1)[:, None]), bucket_size - 1)
    k = np.minimum(best, bucket_size - 2)
    one_level = best == bucket_size - 1  # fewer than two values: nothing to cut
    mean = total / np.maximum(counts, 1)
    low = np.where(one_level, mean, below[np.arange(buckets), k] / (k + 1))
    high = np.where(one_level, mean, above[np.arange(buckets), k] /
                    np.maximum(counts - k - 1, 1))
    return BucketFit(table, (high - low) / 2.0, (high + low) / 2.0)


def first_index(condition, default):
    """Per row, the first column where ``condition`` holds, or ``default`` (an argmax whose
    tie-breaking every framework agrees on)."""
    columns = np.arange(condition.shape[-1])
    return np.where(condition, columns, default).min(axis=-1, initial=default)


def normalised_sample(flat, bucket_size, scales):
    """(values / their bucket's scale as float32, weight scale^2) on a strided sample of at most
    FIT_SAMPLE elements, leaving out buckets whose scale is 0 (they decode to 0 anyway)."""
    n = flat.size
    stride = max(1, -(-n // FIT_SAMPLE))
    element_scales = per_element(scales, bucket_size, n)[::stride]
    keep = element_scales != 0
    sample = flat[::stride].astype(np.float64)[keep]
    element_scales = element_scales[keep]
    return (sample / element_scales).astype(np.float32), element_scales ** 2


def fit_level_table(values, weights, table, truncate):
    """The level table minimising sum(weight * error) over ``values`` (see the module docstring),
    starting from ``table``. Without ``truncate`` the end levels stay where they are (ORQ: every
    value lies between them, so rounding is unbiased); with it they move too (TNQ's truncation
    threshold). Returns float32 levels, each one a value or (ends) a float32 between values, so
    the table is exactly what the payload carries and strictly ascending."""
    order = np.argsort(values, kind="stable")
    ys = values[order].astype(np.float64)
    ws = weights[order].astype(np.float64)
    n = ys.size
    levels = np.asarray(table, dtype=np.float64).copy()
    if n == 0:
        return strictly_ascending(levels.astype(np.float32))
    cum_w = np.concatenate([[0.0], np.cumsum(ws)])
    cum_wy = np.concatenate([[0.0], np.cumsum(ws * ys)])
    # the same sums for the mirrored values -y (in ascending order), for the bottom level
    mirrored = (-ys[::-1], cum_w[-1] - cum_w[::-1], -(cum_wy[-1] - cum_wy[::-1]))
    last = levels.size - 1
    for _ in range(TABLE_SWEEPS):
        if truncate:
            levels[last] = _end_level(ys, cum_w, cum_wy, levels[last - 1], levels[last])
            levels[0] = -_end_level(*mirrored, -levels[1], -levels[0])
        for first in (1, 2):
            inner = np.arange(first, last, 2)
            if inner.size:
                levels[inner] = _inner_levels(ys, cum_w, cum_wy, levels[inner - 1],
                                              levels[inner + 1], levels[inner])
    return strictly_ascending(levels.astype(np.float32))


def grow_level_table(values, weights, table, bits, truncate):
    """fit_level_table on ``table``, then on tables interpolated to twice as many levels, up to
    2**bits."""
    table = fit_level_table(values, weights, table, truncate)
    while table.size < 1 << bits:
        table = fit_level_table(values, weights, refine_table(table, min(2 * table.size,
                                                                         1 << bits)), truncate)
    return table


def refine_table(table, size):
    """``size`` levels spread over ``table`` by linear interpolation between its levels."""
    positions = np.arange(size) * ((table.size - 1) / (size - 1))
    left = np.minimum(positions.astype(np.int64), table.size - 2)
    low, high = table[left].astype(np.float64), table[left + 1].astype(np.float64)
    return low + (positions - left) * (high - low)


def strictly_ascending(table):
    """``table`` (float32) with each level raised, where needed, to just above the one before:
    a guard against levels that interpolation or float32 rounding made equal."""
    table = table.copy()
    for i in range(1, table.size):
        table[i] = max(table[i], np.nextafter(table[i - 1], np.float32(np.inf)))
    return table


def _inner_levels(ys, cum_w, cum_wy, below, above, current):
    """Best levels strictly between their neighbours ``below`` and ``above`` (arrays)."""
    lo = np.searchsorted(ys, below, side="right")
    hi = np.searchsorted(ys, above, side="left")
    inside_w = cum_w[hi] - cum_w[lo]
    inside_wy = cum_wy[hi] - cum_wy[lo]
    rounds_down = (above * inside_w - inside_wy) / (above - below)
    at = np.searchsorted(cum_w, cum_w[lo] + rounds_down, side="left") - 1
    at = np.clip(at, lo, np.maximum(hi - 1, lo))
    return np.where(hi > lo, ys[np.minimum(at, ys.size - 1)], current)


def _end_level(ys, cum_w, cum_wy, below, current):
    """Best top level above its neighbour ``below``: clipping bias beyond it plus rounding
    variance in the top cell, as a float32 strictly above ``below``."""
    n = ys.size
    lo = int(np.searchsorted(ys, below, side="right"))
    if lo == n:
        return current  # nothing above the neighbour: the level is never used
    k = np.arange(lo, n)
    # slope of the error just above ys[k]: ys[lo..k] in the top cell, the rest clipped
    cell = (cum_wy[k + 1] - cum_wy[lo]) - below * (cum_w[k + 1] - cum_w[lo])
    clipped = (cum_wy[n] - cum_wy[k + 1]) - ys[k] * (cum_w[n] - cum_w[k + 1])
    j = lo + int(first_index(cell - 2.0 * clipped >= 0, n - 1 - lo))  # the last slope is >= 0
    # the zero lies in (ys[j-1], ys[j]]: there ys[lo..j-1] are in the cell, ys[j..] clipped
    cell = (cum_wy[j] - cum_wy[lo]) - below * (cum_w[j] - cum_w[lo])
    clipped_mass = cum_w[n] - cum_w[j]
    # Weights spanning many orders of magnitude (buckets of 1e-9 beside buckets of 1) can leave
    # no mass above ys[j] in float64 (0 / 0); the top value itself is then the level.
    level = (2.0 * (cum_wy[n] - cum_wy[j]) - cell) / (2.0 * clipped_mass) \
        if clipped_mass > 0 else ys[j]
    if not np.isfinite(level):
        level = ys[j]
    gap_start = ys[j - 1] if j > lo else below
    level = np.float32(min(max(level, gap_start), ys[j]))
    return max(level, np.nextafter(np.float32(below), np.float32(np.inf)))


def orq_fit(flat, bucket_size, bits):
    """ORQ (Xu et al., arXiv 2002.11082): unbiased multi-level quantization with levels that meet
    the optimal condition for this gradient, recomputed at every step.

    Granularity: one table of 2**bits levels per tensor on values scaled by their bucket's
    max |x| (so every value lies in [-1, 1] and rounding stays unbiased), fitted with each value
    weighted by its bucket's scale^2. A table per bucket would cost 2**bits floats per 512 values
    (1 bit per element at 4 bits) and loses at equal bits: on Student-t(3) data, 4 bits with a
    table per bucket reach NMSE 0.030 sending 5.07 bits per element; 5 bits with one table per
    tensor send the same 5.07 and reach 0.0096.
    """
    scales = bucket_statistic(flat, bucket_size, "max_abs")
    values, weights = normalised_sample(flat, bucket_size, scales)
    table = grow_level_table(values, weights, maxmin_levels(1), bits, truncate=False)
    return BucketFit(table, scales, None)


def _bucket_rows(flat, bucket_size):
    n = flat.size
    buckets = -(-n // bucket_size)
    rows = np.zeros(buckets * bucket_size)
    rows[:n] = flat
    return rows.reshape(buckets, bucket_size)


def largest_side(flat, bucket_size):
    """+1 per bucket whose largest magnitude is a positive value, -1 where it is negative."""
    rows = _bucket_rows(flat, bucket_size)
    return np.where(rows.max(axis=1) >= -rows.min(axis=1), 1.0, -1.0)


def untruncated_scales(rows, table, scales):
    """Per bucket (rows, oriented) the smallest scale that puts its extremes within the table's
    end levels (on an end level that has the sign of the extreme): no truncation, the far end of
    tnq-opt's threshold search. ``scales`` where no scale does that (a zero bucket)."""
    table = np.asarray(table, dtype=np.float64)
    top = np.where(table[-1] > 0, rows.max(axis=1) / np.where(table[-1] > 0, table[-1], 1.0), 0.0)
    bottom = np.where(table[0] < 0, rows.min(axis=1) / np.where(table[0] < 0, table[0], -1.0),
                      0.0)
    untruncated = np.maximum(top, bottom)
    return np.where(untruncated > 0, untruncated, scales)


def bucket_orientation(flat, bucket_size, scales, table):
    """+1 or -1 per bucket: whether the bucket or its mirror image has the lower expected error on
    ``table``. The sign travels in the scale's sign bit, so it costs nothing to send."""
    rows = _bucket_rows(flat, bucket_size)
    table = np.asarray(table, dtype=np.float64)
    keep = expected_error(rows, scales, table) <= expected_error(-rows, scales, table)
    return np.where(keep, 1.0, -1.0)


def tnq_opt_fit(flat, bucket_size, bits):
    """tnq-opt: TNQ's objective, truncation bias plus rounding variance (E_TQ), minimised on the
    observed gradient over the level table itself instead of under a Laplace model.

    Starting from TNQ's closed form (scales fitted to levels.tnq_levels as in tnq-fit) with every
    bucket turned so that its largest magnitude is positive, alternate TNQ_OPT_ROUNDS times: fit
    one level table for the tensor (with truncation, on the values divided by their bucket's
    signed scale, weighted by scale^2), turn each bucket to the orientation its values fit best,
    and refine each bucket's scale (around the last one, and trying the scale that truncates
    nothing). The orientation (the scale's sign) lets the table be asymmetric where the data
    are: a longer positive side for the one extreme value of a heavy-tailed bucket, most levels
    on the heavy side of a skewed bucket (rows of a dense layer whose output unit saw gradients
    of one sign). The table travels in the payload (2**bits floats per tensor); one float per
    bucket, as for tnq. Up to 4 bits and FIT_SAMPLE elements every step lowers the expected error
    from tnq-fit's (the table fit on float32 values, to rounding), so tnq-opt ends at or below
    tnq-fit (tests/test_core_schemes.py checks it).
    """
    n = flat.size
    table = tnq_levels(bits)
    scales = bucket_statistic(flat, bucket_size, "mean_abs")
    if n == 0:
        return BucketFit(table, scales, None)
    scales = fit_scales(flat, bucket_size, table, scales)
    signs = largest_side(flat, bucket_size)
    for round_ in range(TNQ_OPT_ROUNDS):
        values, weights = normalised_sample(flat, bucket_size, scales * signs)
        if round_ == 0:  # TNQ's table is a good start up to 4 bits; beyond, grow from it
            table = grow_level_table(values, weights, tnq_levels(min(bits, 4)), bits,
                                     truncate=True)
        else:
            table = fit_level_table(values, weights, table, truncate=True)
        signs = bucket_orientation(flat, bucket_size, scales, table)
        oriented = flat * per_element(signs, bucket_size, n)
        scales = fit_scales(oriented, bucket_size, table, scales, octaves=False,
                            extra=untruncated_scales(_bucket_rows(oriented, bucket_size), table,
                                                     scales))
    return BucketFit(table, scales * signs, None)
