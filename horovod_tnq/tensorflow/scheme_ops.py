"""TF twins of the core's schemes beyond one level table per bucket: payloads whose size depends
on the data (top-k, sparse TNQ, dynamic width) or on the settings (dp-binomial).

ops.encode and ops.decode_sum hand these schemes over to this module. Each scheme's element
steps live beside its core module (topk_ops.py, tnq_sparse_ops.py, dynamic_ops.py,
privacy_ops.py); this module holds what they share: non-finite exceptions, bit streams of any
width, and the walk over concatenated payloads with the header checks of
core.codec.decode_sum. For the same input, key
and step the bytes equal core.encode's (tests/test_cross_framework.py).
"""

import numpy as np
import tensorflow as tf

from .. import core
from . import dynamic_ops, privacy_ops, tnq_sparse_ops, topk_ops
from .ops import put_exceptions

BODY_OPS = {"topk": topk_ops, "tnq-sparse": tnq_sparse_ops, "dp-binomial": privacy_ops}


def split_exceptions(flat):
    """(flat with non-finite elements zeroed, their indices as uint64, their values as float32),
    as core.codec.encode does."""
    bad = tf.logical_not(tf.math.is_finite(flat))
    exc_idx = tf.cast(tf.where(bad)[:, 0], tf.uint64)
    exc_val = tf.cast(tf.boolean_mask(flat, bad), tf.float32)
    exc_val = tf.where(tf.math.is_nan(exc_val), tf.constant(np.nan, tf.float32), exc_val)
    return tf.where(bad, tf.zeros_like(flat), flat), exc_idx, exc_val


def as_bytes(tensor):
    return tf.reshape(tf.bitcast(tensor, tf.uint8), [-1])


def pack_stream(codes, width):
    """core.packing.pack_bits for a dynamic number of codes and a width (0 to 8) that may be a
    tensor: code i occupies bits [i w, (i + 1) w) of a little-endian bit stream."""
    width = tf.cast(width, tf.int32)
    codes = tf.cast(tf.reshape(codes, [-1]), tf.int32)
    bits = tf.bitwise.bitwise_and(
        tf.bitwise.right_shift(codes[:, None], tf.range(width)[None, :]), 1)
    bits = tf.reshape(bits, [-1])
    bits = tf.pad(bits, [[0, tf.math.floormod(-tf.size(bits), 8)]])
    weights = tf.bitwise.left_shift(tf.ones([8], tf.int32), tf.range(8))
    return tf.cast(tf.reduce_sum(tf.reshape(bits, [-1, 8]) * weights, axis=1), tf.uint8)


def unpack_stream(data, width, count):
    """Inverse of pack_stream: ``count`` codes (int32) of ``width`` bits from the bytes ``data``."""
    width = tf.cast(width, tf.int32)
    count = tf.cast(count, tf.int32)
    bits = tf.bitwise.bitwise_and(
        tf.bitwise.right_shift(tf.cast(data, tf.int32)[:, None], tf.range(8)[None, :]), 1)
    bits = tf.reshape(bits, [-1])[: count * width]
    weights = tf.bitwise.left_shift(tf.ones([width], tf.int32), tf.range(width))
    return tf.reduce_sum(tf.reshape(bits, [count, width]) * weights[None, :], axis=1)


def field(buf, offset, size, dtype):
    return tf.bitcast(tf.reshape(buf[offset: offset + size], [size]), dtype)


def encode(tensor, *, scheme, bits, bucket_size, key, step, dtype_name=None, shape=None,
           options=None):
    options = options or {}
    shape = tensor.shape.as_list() if shape is None else shape
    if scheme.choose_bits is not None:
        return dynamic_ops.encode(tensor, scheme=scheme, max_bits=bits, bucket_size=bucket_size,
                                  key=key, step=step, dtype_name=dtype_name, shape=shape,
                                  options=options)
    dtype_name = dtype_name or tensor.dtype.name
    if dtype_name not in core.DTYPE_CODES:
        raise TypeError(f"unsupported dtype {dtype_name}; supported: {sorted(core.DTYPE_CODES)}")
    scheme.body.check_bits(bits)
    n = tensor.shape.num_elements()
    work = tf.float64 if dtype_name == "float64" else tf.float32
    flat, exc_idx, exc_val = split_exceptions(tf.cast(tf.reshape(tensor, [-1]), work))
    header = core.PayloadHeader(scheme.scheme_id, bits, core.DTYPE_CODES[dtype_name], n,
                                bucket_size, 0, core.shape_tag(shape))
    fixed = np.frombuffer(header.pack(), dtype=np.uint8)
    body = BODY_OPS[scheme.name].encode_body(flat, n=n, bits=bits, key=key, step=step,
                                             **options)
    num_exceptions = tf.cast(tf.size(exc_idx), tf.uint32)
    return tf.concat([fixed[:20], as_bytes(tf.reshape(num_exceptions, [1])), fixed[24:],
                      as_bytes(exc_idx), as_bytes(exc_val), body], axis=0)


def decode_sum(gathered, expect, count):
    """ops.decode_sum for these schemes: the sum (float64, flat) of ``count`` concatenated
    payloads, each checked against ``expect`` like core.codec.decode_sum (the bits only for
    schemes with a fixed width)."""
    scheme = core.codec.SCHEMES_BY_ID[expect.scheme_id]
    n = expect.numel
    header_size = core.HEADER.size
    fields = [("magic", 0, 4), ("scheme_id", 4, 5), ("bits", 5, 6), ("dtype_code", 6, 7),
              ("numel", 8, 16), ("bucket_size", 16, 20), ("shape_tag", 24, 28)]
    if scheme.choose_bits is not None:
        fields = [f for f in fields if f[0] != "bits"]
    expected_head = np.frombuffer(expect.pack(), dtype=np.uint8)
    total = tf.zeros([n], tf.float64)
    checks = []
    offset = tf.constant(0, tf.int64)
    size = tf.cast(tf.size(gathered), tf.int64)
    for position in range(count):
        checks.append(tf.debugging.assert_less_equal(
            offset + header_size, size,
            message=f"truncated payload: payload {position} has no complete header"))
        with tf.control_dependencies(checks[-1:]):
            head = tf.reshape(gathered[offset: offset + header_size], [header_size])
        for name, start, stop in fields:
            checks.append(tf.debugging.assert_equal(
                head[start:stop], tf.constant(expected_head[start:stop]),
                message=f"payload {position} differs from this rank's in {name}: all ranks must "
                        "use the same compressor settings for the same tensor"))
        num_exceptions = tf.cast(field(head, 20, 4, tf.uint32), tf.int64)
        with tf.control_dependencies(checks):
            if scheme.body is not None:
                values, exc_idx, exc_val, end, more = _body_payload(
                    gathered, offset, head, num_exceptions, size, scheme, n, position)
            else:
                values, exc_idx, exc_val, end, more = dynamic_ops.decode_payload(
                    gathered, offset, head, num_exceptions, size, expect, position)
        checks.extend(more)
        values = put_exceptions(values, exc_idx, exc_val, n, position, checks)
        total += values
        offset = end
    checks.append(tf.debugging.assert_equal(
        offset, size, message=f"received {size} payload bytes, expected {count} payloads"))
    with tf.control_dependencies(checks):
        return tf.identity(total)


def read_exceptions(gathered, at, num_exceptions):
    exc_idx = tf.bitcast(tf.reshape(gathered[at: at + 8 * num_exceptions], [-1, 8]), tf.uint64)
    at += 8 * num_exceptions
    exc_val = tf.bitcast(tf.reshape(gathered[at: at + 4 * num_exceptions], [-1, 4]), tf.float32)
    return exc_idx, exc_val, at + 4 * num_exceptions


def _body_payload(gathered, offset, head, num_exceptions, size, scheme, n, position):
    at = offset + core.HEADER.size
    exc_end = at + 12 * num_exceptions
    check = tf.debugging.assert_less_equal(
        exc_end + scheme.body.PREFIX.size, size,
        message=f"truncated payload: payload {position} is cut short")
    with tf.control_dependencies([check]):
        exc_idx, exc_val, at = read_exceptions(gathered, at, num_exceptions)
    values, end, more = BODY_OPS[scheme.name].decode_body(gathered, at, head, n, size, position)
    return values, exc_idx, exc_val, end, [check] + more
