"""The core's element-wise pipeline in TensorFlow ops, so graphs never round-trip through numpy.

Thresholds, level tables, keys and the byte layout come from horovod_tnq.core (numpy, evaluated
once at trace time into constants); this module only re-expresses the per-element steps. For the
same input, key and step it produces the same payload bytes as core.encode, which the tests check
byte for byte.
"""

import functools

import numpy as np
import tensorflow as tf

from .. import core

_U32 = tf.uint32


def _u32(value):
    return tf.constant(value, dtype=_U32)


def _lowbias32(x):
    # the same mixer as core.rng._lowbias32
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u32(16)))
    x = x * _u32(0x7FEB352D)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u32(15)))
    x = x * _u32(0x846CA68B)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u32(16)))


def random_words(n, key_lo, key_hi, step):
    """core.rng.random_words in TF ops, for the key's two uint32 words (Python ints or uint32
    tensors); ``step`` may be a tensor (an int64 counter)."""
    step_word = _lowbias32(tf.bitwise.bitwise_xor(tf.cast(step, _U32), tf.cast(key_hi, _U32)))
    x = tf.cast(tf.range(n, dtype=tf.int64), _U32) * _u32(0x9E3779B9)
    x = _lowbias32(tf.bitwise.bitwise_xor(x, tf.cast(key_lo, _U32)))
    return _lowbias32(tf.bitwise.bitwise_xor(x, step_word))


def uniform_noise(n, key, step):
    """core.rng.uniform_noise in TF ops; ``step`` may be a tensor (an int64 counter)."""
    lo, hi = core.key_words(key)
    x = random_words(n, _u32(lo), _u32(hi), step)
    return tf.cast(tf.bitwise.right_shift(x, _u32(8)), tf.float32) * (2.0 ** -24)


def bucket_statistic(flat, bucket_size, statistic):
    """core.quantize.bucket_statistic in TF ops (float64)."""
    n = tf.size(flat)
    buckets = (n + bucket_size - 1) // bucket_size
    padded = tf.pad(tf.abs(tf.cast(flat, tf.float64)), [[0, buckets * bucket_size - n]])
    rows = tf.reshape(padded, [buckets, bucket_size])
    if statistic == "max_abs":
        return tf.reduce_max(rows, axis=1)
    if statistic == "l2":
        return tf.sqrt(tf.reduce_sum(rows * rows, axis=1))
    counts = tf.fill([buckets], tf.constant(bucket_size, tf.float64))
    counts = tf.tensor_scatter_nd_update(
        counts, [[buckets - 1]], [tf.cast(n - (buckets - 1) * bucket_size, tf.float64)])
    return tf.reduce_sum(rows, axis=1) / counts


def expected_error(rows, scales, table):
    """core.quantize.expected_error in TF ops (float64)."""
    y = rows / tf.where(scales > 0, scales, tf.ones_like(scales))[:, None]
    v = tf.clip_by_value(y, table[0], table[-1])
    cell = tf.reshape(tf.searchsorted(table, tf.reshape(v, [-1]), side="right"), tf.shape(v))
    cell = tf.clip_by_value(cell - 1, 0, int(table.shape[0]) - 2)
    per_element = (y - v) ** 2 + (v - tf.gather(table, cell)) * (tf.gather(table, cell + 1) - v)
    return tf.reduce_sum(per_element, axis=1) * scales ** 2


def fit_scales(flat, bucket_size, table, scales, octaves=True, extra=None):
    """core.quantize.fit_scales in TF ops: the same candidates, in the same order."""
    n = int(flat.shape[0])
    buckets = -(-n // bucket_size)
    table = tf.cast(tf.convert_to_tensor(table), tf.float64)  # a constant, or fitted (tnq-opt)
    rows = tf.reshape(tf.pad(tf.cast(flat, tf.float64), [[0, buckets * bucket_size - n]]),
                      [buckets, bucket_size])
    padding = np.zeros(buckets)
    padding[-1] = buckets * bucket_size - n
    zero_error = expected_error(tf.zeros([1, 1], tf.float64), tf.ones([1], tf.float64), table)[0]

    def error(candidate):
        return expected_error(rows, candidate, table) - padding * zero_error * candidate ** 2

    octave_multipliers = core.quantize.FIT_OCTAVES if octaves else (1.0,)
    best = scales * octave_multipliers[0]
    best_error = error(best)

    def keep_better(candidate, best, best_error):
        candidate_error = error(candidate)
        better = candidate_error < best_error
        return tf.where(better, candidate, best), tf.where(better, candidate_error, best_error)

    for candidate in [scales * m for m in octave_multipliers[1:]] + \
            ([] if extra is None else [extra]):
        best, best_error = keep_better(candidate, best, best_error)
    for step in core.quantize.FIT_REFINEMENTS:
        centre = best
        for candidate in (centre / step, centre * step):
            best, best_error = keep_better(candidate, best, best_error)
    return best


def _bucket_rows(flat, bucket_size, fill=0.0):
    """flat (float64) as [buckets, bucket_size], the last bucket padded with ``fill``."""
    n = int(flat.shape[0])
    buckets = -(-n // bucket_size)
    flat = tf.cast(flat, tf.float64)
    return tf.reshape(tf.pad(flat, [[0, buckets * bucket_size - n]], constant_values=fill),
                      [buckets, bucket_size])


def _per_element(per_bucket, bucket_size, n):
    return tf.repeat(per_bucket, bucket_size)[:n]


def maxmin_fit(flat, bucket_size, bits):
    """core.fitting.maxmin_fit in TF ops."""
    rows = _bucket_rows(flat, bucket_size, fill=tf.cast(flat[-1], tf.float64))
    low, high = tf.reduce_min(rows, axis=1), tf.reduce_max(rows, axis=1)
    return core.levels.maxmin_levels(bits), (high - low) / 2.0, (high + low) / 2.0


def bingrad_fit(flat, bucket_size, bits):
    """core.fitting.bingrad_fit in TF ops: the same cuts and sums."""
    n = int(flat.shape[0])
    table = np.array([-1.0, 1.0], dtype=np.float32)
    flat = tf.cast(flat, tf.float64)
    if bucket_size == 1:
        return table, tf.zeros([n], tf.float64), flat
    buckets = -(-n // bucket_size)
    rows = tf.sort(_bucket_rows(flat, bucket_size, fill=np.inf), axis=1)
    counts = np.full(buckets, bucket_size)
    counts[-1:] = n - (buckets - 1) * bucket_size
    sums = tf.cumsum(tf.where(tf.math.is_finite(rows), rows, tf.zeros_like(rows)), axis=1)
    total = sums[:, -1]
    cut = np.arange(1, bucket_size)
    below, above = sums[:, :-1], total[:, None] - sums[:, :-1]
    allowed = cut[None, :] < counts[:, None]
    left = cut[None, :].astype(np.float64)
    right = np.maximum(counts[:, None] - cut[None, :], 1).astype(np.float64)
    score = tf.where(allowed, below ** 2 / left + above ** 2 / right,
                     tf.constant(-np.inf, tf.float64))
    best = first_index(tf.logical_and(
        allowed, score == tf.reduce_max(score, axis=1)[:, None]), bucket_size - 1)
    k = tf.minimum(best, bucket_size - 2)
    one_level = best == bucket_size - 1
    mean = total / np.maximum(counts, 1).astype(np.float64)
    at = tf.stack([tf.range(buckets, dtype=k.dtype), k], axis=1)
    kf = tf.cast(k, tf.float64)
    low = tf.where(one_level, mean, tf.gather_nd(below, at) / (kf + 1))
    high = tf.where(one_level, mean, tf.gather_nd(above, at) /
                    tf.maximum(counts.astype(np.float64) - kf - 1, 1.0))
    return table, (high - low) / 2.0, (high + low) / 2.0


def first_index(condition, default):
    """core.fitting.first_index in TF ops (last axis)."""
    columns = tf.range(tf.shape(condition, out_type=tf.int64)[-1], dtype=tf.int64)
    return tf.reduce_min(tf.where(condition, columns, tf.cast(default, tf.int64)), axis=-1)


def normalised_sample(flat, bucket_size, scales):
    """core.fitting.normalised_sample in TF ops."""
    n = int(flat.shape[0])
    stride = max(1, -(-n // core.fitting.FIT_SAMPLE))
    element_scales = _per_element(scales, bucket_size, n)[::stride]
    keep = element_scales != 0
    sample = tf.boolean_mask(tf.cast(flat[::stride], tf.float64), keep)
    element_scales = tf.boolean_mask(element_scales, keep)
    values = tf.cast(sample / element_scales, tf.float32)
    tiny = np.finfo(np.float32).tiny
    values = tf.where(tf.abs(values) < tiny, tf.zeros_like(values), values)
    return values, element_scales ** 2


def _inner_levels(ys, cum_w, cum_wy, below, above, current):
    """core.fitting._inner_levels in TF ops."""
    lo = tf.searchsorted(ys, below, side="right")
    hi = tf.searchsorted(ys, above, side="left")
    inside_w = tf.gather(cum_w, hi) - tf.gather(cum_w, lo)
    inside_wy = tf.gather(cum_wy, hi) - tf.gather(cum_wy, lo)
    rounds_down = (above * inside_w - inside_wy) / (above - below)
    at = tf.searchsorted(cum_w, tf.gather(cum_w, lo) + rounds_down, side="left") - 1
    at = tf.clip_by_value(at, lo, tf.maximum(hi - 1, lo))
    size = tf.shape(ys, out_type=at.dtype)[0]
    return tf.where(hi > lo, tf.gather(ys, tf.minimum(at, size - 1)), current)


def _end_level(ys, cum_w, cum_wy, below, current):
    """core.fitting._end_level in TF ops (the slope at every value, masked below ``lo``)."""
    n = tf.shape(ys, out_type=tf.int64)[0]
    lo = tf.searchsorted(ys, tf.reshape(below, [1]), side="right", out_type=tf.int64)[0]
    k = tf.range(n, dtype=tf.int64)
    cell = (cum_wy[1:] - tf.gather(cum_wy, lo)) - below * (cum_w[1:] - tf.gather(cum_w, lo))
    clipped = (cum_wy[-1] - cum_wy[1:]) - ys * (cum_w[-1] - cum_w[1:])
    j = first_index(tf.logical_and(k >= lo, cell - 2.0 * clipped >= 0), n - 1)
    cell = (tf.gather(cum_wy, j) - tf.gather(cum_wy, lo)) - \
        below * (tf.gather(cum_w, j) - tf.gather(cum_w, lo))
    level = (2.0 * (cum_wy[-1] - tf.gather(cum_wy, j)) - cell) / \
        (2.0 * (cum_w[-1] - tf.gather(cum_w, j)))
    gap_start = tf.where(j > lo, tf.gather(ys, tf.maximum(j - 1, 0)), below)
    level = tf.cast(tf.minimum(tf.maximum(level, gap_start), tf.gather(ys, j)), tf.float32)
    floor = tf.math.nextafter(tf.cast(below, tf.float32), tf.constant(np.inf, tf.float32))
    level = tf.cast(tf.maximum(level, floor), tf.float64)
    return tf.where(lo < n, level, current)


def fit_level_table(values, weights, table, truncate):
    """core.fitting.fit_level_table in TF ops: the same sweeps, in one compiled function per
    table size (eager callers would otherwise pay Python overhead for every op of every sweep)."""
    table = tf.cast(tf.convert_to_tensor(table), tf.float64)
    fit = _table_fitter(int(table.shape[0]), bool(truncate))
    return fit(tf.cast(values, tf.float32), tf.cast(weights, tf.float64), table)


@functools.lru_cache(maxsize=None)
def _table_fitter(num_levels, truncate):
    last = num_levels - 1
    halves = [np.arange(first, last, 2) for first in (1, 2)]

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None], tf.float32), tf.TensorSpec([None], tf.float64),
        tf.TensorSpec([num_levels], tf.float64)])
    def fit(values, weights, levels):
        order = tf.argsort(values, stable=True)
        ys = tf.cast(tf.gather(values, order), tf.float64)
        ws = tf.gather(weights, order)
        zero = tf.zeros([1], tf.float64)
        cum_w = tf.concat([zero, tf.cumsum(ws)], axis=0)
        cum_wy = tf.concat([zero, tf.cumsum(ws * ys)], axis=0)
        mirrored = (-tf.reverse(ys, [0]), cum_w[-1] - tf.reverse(cum_w, [0]),
                    -(cum_wy[-1] - tf.reverse(cum_wy, [0])))

        def sweep(step, levels):
            if truncate:
                top = _end_level(ys, cum_w, cum_wy, levels[last - 1], levels[last])
                levels = tf.tensor_scatter_nd_update(levels, [[last]], tf.reshape(top, [1]))
                bottom = -_end_level(*mirrored, -levels[1], -levels[0])
                levels = tf.tensor_scatter_nd_update(levels, [[0]], tf.reshape(bottom, [1]))
            for inner in halves:
                if inner.size:
                    new = _inner_levels(ys, cum_w, cum_wy, tf.gather(levels, inner - 1),
                                        tf.gather(levels, inner + 1), tf.gather(levels, inner))
                    levels = tf.tensor_scatter_nd_update(levels, inner[:, None], new)
            return step + 1, levels

        def sweeps():
            return tf.while_loop(lambda step, _: step < core.fitting.TABLE_SWEEPS, sweep,
                                 (tf.constant(0), levels))[1]

        # no value to fit (every bucket zero): the starting table, as in the core
        levels = tf.cond(tf.size(values) > 0, sweeps, lambda: levels)
        return strictly_ascending(tf.cast(levels, tf.float32))

    return fit


def strictly_ascending(table):
    """core.fitting.strictly_ascending in TF ops."""
    raised = tf.scan(lambda before, level: tf.maximum(
        level, tf.math.nextafter(before, tf.constant(np.inf, tf.float32))), table[1:],
        initializer=table[0])
    return tf.concat([table[:1], raised], axis=0)


def refine_table(table, size):
    """core.fitting.refine_table in TF ops."""
    count = int(table.shape[0])
    positions = np.arange(size) * ((count - 1) / (size - 1))
    left = np.minimum(positions.astype(np.int64), count - 2)
    low = tf.cast(tf.gather(table, left), tf.float64)
    high = tf.cast(tf.gather(table, left + 1), tf.float64)
    return low + (positions - left) * (high - low)


def grow_level_table(values, weights, table, bits, truncate):
    """core.fitting.grow_level_table in TF ops."""
    table = fit_level_table(values, weights, table, truncate)
    while int(table.shape[0]) < 1 << bits:
        size = min(2 * int(table.shape[0]), 1 << bits)
        table = fit_level_table(values, weights, refine_table(table, size), truncate)
    return table


def orq_fit(flat, bucket_size, bits):
    """core.fitting.orq_fit in TF ops."""
    scales = bucket_statistic(flat, bucket_size, "max_abs")
    values, weights = normalised_sample(flat, bucket_size, scales)
    table = grow_level_table(values, weights, core.levels.maxmin_levels(1), bits,
                             truncate=False)
    return table, scales, None


def largest_side(flat, bucket_size):
    """core.fitting.largest_side in TF ops."""
    rows = _bucket_rows(flat, bucket_size)
    positive = tf.reduce_max(rows, axis=1) >= -tf.reduce_min(rows, axis=1)
    return tf.where(positive, tf.ones(tf.shape(positive), tf.float64),
                    -tf.ones(tf.shape(positive), tf.float64))


def untruncated_scales(rows, table, scales):
    """core.fitting.untruncated_scales in TF ops."""
    table = tf.cast(table, tf.float64)
    top, bottom = table[-1], table[0]
    top_scale = tf.where(top > 0, tf.reduce_max(rows, axis=1) /
                         tf.where(top > 0, top, tf.constant(1.0, tf.float64)),
                         tf.zeros_like(scales))
    bottom_scale = tf.where(bottom < 0, tf.reduce_min(rows, axis=1) /
                            tf.where(bottom < 0, bottom, tf.constant(-1.0, tf.float64)),
                            tf.zeros_like(scales))
    untruncated = tf.maximum(top_scale, bottom_scale)
    return tf.where(untruncated > 0, untruncated, scales)


def bucket_orientation(flat, bucket_size, scales, table):
    """core.fitting.bucket_orientation in TF ops."""
    rows = _bucket_rows(flat, bucket_size)
    table = tf.cast(table, tf.float64)
    keep = expected_error(rows, scales, table) <= expected_error(-rows, scales, table)
    return tf.where(keep, tf.ones_like(scales), -tf.ones_like(scales))


def tnq_opt_fit(flat, bucket_size, bits):
    """core.fitting.tnq_opt_fit in TF ops."""
    n = int(flat.shape[0])
    table = core.levels.tnq_levels(bits)
    scales = bucket_statistic(flat, bucket_size, "mean_abs")
    scales = fit_scales(flat, bucket_size, table, scales)
    signs = largest_side(flat, bucket_size)
    for round_ in range(core.fitting.TNQ_OPT_ROUNDS):
        values, weights = normalised_sample(flat, bucket_size, scales * signs)
        if round_ == 0:
            table = grow_level_table(values, weights, core.levels.tnq_levels(min(bits, 4)), bits,
                                     truncate=True)
        else:
            table = fit_level_table(values, weights, table, truncate=True)
        signs = bucket_orientation(flat, bucket_size, scales, table)
        oriented = tf.cast(flat, tf.float64) * _per_element(signs, bucket_size, n)
        scales = fit_scales(oriented, bucket_size, table, scales, octaves=False,
                            extra=untruncated_scales(_bucket_rows(oriented, bucket_size), table,
                                                     scales))
    return table, scales * signs, None


_FITS = {"maxmin": maxmin_fit, "bingrad": bingrad_fit, "orq": orq_fit, "tnq-opt": tnq_opt_fit}


def fit_buckets(scheme, flat, bucket_size, bits):
    """core.codec.fit_buckets in TF ops: (table, scales, offsets or None)."""
    if scheme.fit is not None:
        return _FITS[scheme.name](flat, bucket_size, bits)
    table = core.codec.level_table(scheme.scheme_id, bits)
    scales = bucket_statistic(flat, bucket_size, scheme.statistic)
    if scheme.fit_scale:
        scales = fit_scales(flat, bucket_size, table, scales)
    return table, scales, None


def stochastic_round(values, table, noise):
    table = tf.cast(tf.convert_to_tensor(table), tf.float32)
    v = tf.clip_by_value(values, table[0], table[-1])
    cell = tf.searchsorted(table, v, side="right") - 1
    cell = tf.clip_by_value(cell, 0, int(table.shape[0]) - 2)
    lo = tf.gather(table, cell)
    p = (v - lo) / (tf.gather(table, cell + 1) - lo)
    return tf.cast(cell + tf.cast(noise < p, cell.dtype), tf.uint8)


def _shifts(bits):
    return tf.constant(np.arange(8, dtype=np.uint64) * bits, tf.uint64)


def pack_bits(codes, bits, n):
    """core.packing.pack_bits for n codes: eight codes of b bits fill exactly b bytes of one
    64-bit word."""
    if bits == 8:
        return codes
    groups = -(-n // 8)
    words = tf.reshape(tf.cast(tf.pad(codes, [[0, groups * 8 - n]]), tf.uint64), [groups, 8])
    word = tf.reduce_sum(tf.bitwise.left_shift(words, _shifts(bits)), axis=1)  # disjoint: = OR
    raw = tf.bitcast(word, tf.uint8)[:, :bits]
    return tf.reshape(raw, [-1])[: core.packed_size(n, bits)]


def unpack_bits(data, bits, n):
    if bits == 8:
        return data[:n]
    groups = -(-n // 8)
    padded = tf.pad(data, [[0, groups * bits - core.packed_size(n, bits)]])
    raw = tf.pad(tf.reshape(padded, [groups, bits]), [[0, 0], [0, 8 - bits]])
    word = tf.reshape(tf.bitcast(raw, tf.uint64), [groups, 1])
    codes = tf.bitwise.bitwise_and(tf.bitwise.right_shift(word, _shifts(bits)),
                                   tf.constant((1 << bits) - 1, tf.uint64))
    return tf.cast(tf.reshape(codes, [-1])[:n], tf.uint8)


def _as_bytes(tensor):
    return tf.reshape(tf.bitcast(tensor, tf.uint8), [-1])


def encode(tensor, *, scheme, bits, bucket_size, key, step, dtype_name=None, shape=None,
           options=None, fixed_bits=False):
    """core.codec.encode for a TF tensor of static size; returns the payload (uint8).
    ``dtype_name`` overrides the dtype recorded in the header (error feedback encodes a float32
    copy of a float16 or bfloat16 gradient), ``shape`` the shape (a chunk of a tensor carries
    the whole tensor's); ``options`` holds the scheme's settings (core Scheme.options);
    ``fixed_bits`` encodes a dynamic-width scheme at exactly ``bits``."""
    scheme = core.get_scheme(scheme)
    if scheme.body is not None or (scheme.choose_bits is not None and not fixed_bits):
        from . import scheme_ops  # schemes with their own body or width (imports this module)
        return scheme_ops.encode(tensor, scheme=scheme, bits=bits, bucket_size=bucket_size,
                                 key=key, step=step, dtype_name=dtype_name, shape=shape,
                                 options=options)
    dtype_name = dtype_name or tensor.dtype.name
    if dtype_name not in core.DTYPE_CODES:
        raise TypeError(f"unsupported dtype {dtype_name}; supported: {sorted(core.DTYPE_CODES)}")
    n = tensor.shape.num_elements()
    work = tf.float64 if dtype_name == "float64" else tf.float32
    flat = tf.cast(tf.reshape(tensor, [-1]), work)

    bad = tf.logical_not(tf.math.is_finite(flat))
    exc_idx = tf.cast(tf.where(bad)[:, 0], tf.uint64)
    exc_val = tf.cast(tf.boolean_mask(flat, bad), tf.float32)
    exc_val = tf.where(tf.math.is_nan(exc_val), tf.constant(np.nan, tf.float32), exc_val)
    flat = tf.where(bad, tf.zeros_like(flat), flat)

    header = core.PayloadHeader.describe(scheme, bits, dtype_name, n, bucket_size,
                                         tensor.shape.as_list() if shape is None else shape)
    scale_dtype = tf.float64 if header.scale_dtype.itemsize == 8 else tf.float32
    fixed = np.frombuffer(header.pack(), dtype=np.uint8)
    if n == 0:
        return tf.constant(fixed)
    table, scales, offsets = fit_buckets(scheme, flat, bucket_size, bits)
    table = tf.cast(tf.convert_to_tensor(table), tf.float32)
    params = tf.cast(tf.stack([scales] + ([offsets] if header.bucket_params == 2 else [])),
                     scale_dtype)
    divisor = tf.cast(tf.where(params[0] != 0, params[0], tf.ones_like(params[0])), work)
    if header.bucket_params == 2:
        flat = flat - tf.repeat(tf.cast(params[1], work), bucket_size)[:n]
    normalised = tf.cast(flat / tf.repeat(divisor, bucket_size)[:n], tf.float32)
    if scheme.rounding == "nearest":
        noise = tf.fill([n], tf.constant(0.5, tf.float32))
    else:
        noise = uniform_noise(n, key, step)
    codes = stochastic_round(normalised, table, noise)
    levels = [_as_bytes(table)] if scheme.sends_levels else []
    num_exceptions = tf.cast(tf.size(exc_idx), tf.uint32)
    return tf.concat([fixed[:20], _as_bytes(tf.reshape(num_exceptions, [1])), fixed[24:]] +
                     levels + [_as_bytes(params), _as_bytes(exc_idx), _as_bytes(exc_val),
                               pack_bits(codes, bits, n)], axis=0)


def _field(buf, offset, size, dtype):
    return tf.bitcast(tf.reshape(buf[offset: offset + size], [size]), dtype)


def put_exceptions(values, exc_idx, exc_val, n, position, checks):
    """``values`` (float64, n elements) of payload ``position`` with its non-finite exceptions
    written at their indices, once a check (appended to ``checks``) has found every index in
    range: a corrupted index must fail the step, not land elsewhere."""
    exc_idx = tf.cast(tf.reshape(exc_idx, [-1, 1]), tf.int64)
    checks.append(tf.debugging.assert_less(
        exc_idx, tf.constant(max(n, 1), tf.int64),
        message=f"payload {position}: exception index out of range for {n} elements"))
    with tf.control_dependencies(checks[-1:]):
        return tf.tensor_scatter_nd_update(values, exc_idx,
                                           tf.cast(tf.reshape(exc_val, [-1]), tf.float64))


def decode_sum(gathered, expect, count):
    """Sum (float64, flat) of ``count`` concatenated payloads, each checked against ``expect``.

    Mirrors core.codec.decode_sum; a mismatch fails the step with an InvalidArgumentError whose
    message names the field.
    """
    scheme = core.codec.SCHEMES_BY_ID[expect.scheme_id]
    if scheme.body is not None or scheme.choose_bits is not None:
        from . import scheme_ops
        return scheme_ops.decode_sum(gathered, expect, count)
    total = tf.zeros([expect.numel], tf.float64)
    for values in decode_each(gathered, [expect] * count):
        total += values
    return total


def decode_each(gathered, expects):
    """The values (float64, flat) of each payload in ``gathered``, the i-th checked against
    ``expects[i]``; ``gathered`` must hold exactly these payloads (of level-table schemes of
    fixed width)."""
    checks = []
    offset = tf.constant(0, tf.int64)
    size = tf.cast(tf.size(gathered), tf.int64)
    decoded = []
    for position, expect in enumerate(expects):
        n = expect.numel
        scale_dtype = tf.float64 if expect.scale_dtype.itemsize == 8 else tf.float32
        levels_size, params_size, _, _, codes_size = expect.section_sizes()
        if not expect.num_levels:
            table = tf.constant(core.codec.level_table(expect.scheme_id, expect.bits),
                                tf.float64)
        checks.append(tf.debugging.assert_less_equal(
            offset + core.HEADER.size, size,
            message=f"truncated payload: payload {position} has no complete header"))
        with tf.control_dependencies(checks[-1:]):
            head = tf.reshape(gathered[offset: offset + core.HEADER.size], [core.HEADER.size])
        expected_head = np.frombuffer(expect.pack(), dtype=np.uint8)
        for field, start, stop in (("magic", 0, 4), ("scheme_id", 4, 5), ("bits", 5, 6),
                                   ("dtype_code", 6, 7), ("bucket_params", 7, 8),
                                   ("numel", 8, 16), ("bucket_size", 16, 20),
                                   ("shape_tag", 24, 28), ("num_levels", 28, 30),
                                   ("reserved", 30, 32)):
            checks.append(tf.debugging.assert_equal(
                head[start:stop], tf.constant(expected_head[start:stop]),
                message=f"payload {position} differs from this rank's in {field}: all ranks must "
                        "use the same compressor settings for the same tensor"))
        num_exceptions = tf.cast(_field(head, 20, 4, tf.uint32), tf.int64)
        at = offset + core.HEADER.size
        end = at + levels_size + params_size + 12 * num_exceptions + codes_size
        checks.append(tf.debugging.assert_less_equal(
            end, size, message=f"truncated payload: payload {position} is cut short"))
        with tf.control_dependencies(checks):
            if expect.num_levels:
                levels = tf.bitcast(tf.reshape(gathered[at: at + levels_size], [-1, 4]),
                                    tf.float32)
                checks.append(tf.debugging.Assert(tf.reduce_all(tf.logical_and(
                    tf.math.is_finite(levels), tf.concat([[True], levels[1:] > levels[:-1]], 0))),
                    [f"invalid level table in payload {position}: levels must be finite and "
                     "strictly ascending"]))
                table = tf.cast(levels, tf.float64)
            at += levels_size
            params = tf.cast(tf.bitcast(tf.reshape(gathered[at: at + params_size],
                                                   [-1, scale_dtype.size]), scale_dtype),
                             tf.float64)
            params = tf.reshape(params, [expect.bucket_params, expect.num_buckets])
            at += params_size
            exc_idx = tf.bitcast(tf.reshape(gathered[at: at + 8 * num_exceptions], [-1, 8]),
                                 tf.uint64)
            at += 8 * num_exceptions
            exc_val = tf.bitcast(tf.reshape(gathered[at: at + 4 * num_exceptions], [-1, 4]),
                                 tf.float32)
            at += 4 * num_exceptions
            codes = unpack_bits(tf.reshape(gathered[at: at + codes_size], [codes_size]),
                                expect.bits, n)
        codes = tf.cast(codes, tf.int32)
        checks.append(tf.debugging.assert_less(
            codes, tf.shape(table)[0], message=f"payload {position}: code out of range"))
        with tf.control_dependencies(checks[-2:]):
            values = tf.gather(table, codes)
        values *= tf.repeat(params[0], expect.bucket_size)[:n]
        if expect.bucket_params == 2:
            values += tf.repeat(params[1], expect.bucket_size)[:n]
        values = put_exceptions(values, exc_idx, exc_val, n, position, checks)
        decoded.append(values)
        offset = end
    checks.append(tf.debugging.assert_equal(
        offset, size, message=f"received {size} payload bytes, expected {len(expects)} "
                              "payloads"))
    with tf.control_dependencies(checks):
        return [tf.identity(values) for values in decoded]
