"""decode() and decode_sum(): payloads (payload.py's format) back into values, one payload or
the sum of a concatenation. Each scheme family (schemes.py) decodes its coded elements with one
function of DECODERS; decode_sum checks every payload against the header this rank expects,
sums in float64 in payload order (the compiled kernel where it was built, the numpy reference
otherwise: the same values) and settles sums beyond the dtype's range as Horovod's would.
"""

import math

import numpy as np

from . import native, rotation
from .packing import unpack_bits
from .payload import PayloadError, coded_mask, overflow_rule, split, value_bound
from .quantize import per_element
from .schemes import SCHEMES_BY_ID


def _check_codes(invalid, header, table):
    if invalid:
        raise PayloadError(f"{invalid} codes beyond the {table.size} levels of "
                           f"{SCHEMES_BY_ID[header.scheme_id].name} at {header.bits} bits: "
                           "corrupted payload")


def _values(sections):
    """The decoded values (float64) of one payload: the numpy reference."""
    return _spread(_coded_values(sections), sections)


def _spread(coded, sections):
    """The coded elements' values (float64) placed around the payload's zero runs."""
    if sections.zero_runs is None:
        return coded
    values = np.zeros(sections.header.numel)
    values[coded_mask(sections.header.numel, sections.zero_runs)] = coded
    return values


def _codes(sections):
    """The payload's codes, checked against its table."""
    header = sections.header
    codes = unpack_bits(sections.packed, header.bits, header.num_codes)
    _check_codes(int(np.count_nonzero(codes >= sections.table.size)), header, sections.table)
    return codes


def _table_values(sections):
    """The "table" family: offset + scale * table[code] per bucket."""
    header = sections.header
    values = sections.table[_codes(sections)]
    values *= per_element(sections.scales, header.bucket_size, header.num_codes)
    if sections.offsets is not None:
        values += per_element(sections.offsets, header.bucket_size, header.coded_numel)
    values[sections.exception_indices] = sections.exception_values
    return values


def _rotated_values(sections):
    """The "rotated" family: each bucket's scale * table[code], inverse-rotated. Tensors
    narrower than float64 sent float32 levels and scales, and are decoded in float32 (their
    rounding is far below the quantization error)."""
    header = sections.header
    work = header.scale_dtype.type
    values = sections.table.astype(work)[_codes(sections)]
    values *= per_element(sections.scales.astype(work), header.bucket_size, header.num_codes)
    key, step, exponent = sections.rotation
    values = rotation.unrotate(values.reshape(-1, header.bucket_size), key, step)
    values = np.ldexp(values[: header.coded_numel].astype(np.float64), exponent)
    values[sections.exception_indices] = sections.exception_values
    return values


def _body_values(sections):
    """The "body" family: the scheme's own body decoded (Scheme.body)."""
    header = sections.header
    values = header.scheme.body.decode(sections.packed, header)
    values[sections.exception_indices] = sections.exception_values
    return values


# How each scheme family (Scheme.family) decodes a payload's coded elements (float64).
DECODERS = {"table": _table_values, "rotated": _rotated_values, "body": _body_values}


def _coded_values(sections):
    """The decoded values (float64) of the coded elements of one payload."""
    return DECODERS[sections.header.scheme.family](sections)


# decode() and iter_payloads() read payloads without a header to compare with, and the sparse
# schemes' payloads (Top-K) do not bound their element count by their length: a payload that
# declares more elements than this is refused unless the caller allows more.
MAX_DECODE_NUMEL = 1 << 28


def decode(buf, offset=0, max_numel=MAX_DECODE_NUMEL):
    """(values as float64 numpy, header, offset just past this payload)."""
    sections = split(np.ascontiguousarray(buf, dtype=np.uint8).reshape(-1), offset, max_numel)
    return _values(sections), sections.header, sections.end


def iter_payloads(buf, max_numel=MAX_DECODE_NUMEL):
    """Yield (values, header) for each payload of a concatenation, in order."""
    buf = np.ascontiguousarray(buf, dtype=np.uint8).reshape(-1)
    offset = 0
    while offset < buf.size:
        values, header, offset = decode(buf, offset, max_numel)
        yield values, header


def _overflow_rule(payloads, factor, dtype_name):
    """payload.overflow_rule for the decoded sum of ``payloads`` times ``factor``: None where no
    element can reach the dtype's range, else (threshold, value)."""
    bound = 0.0
    for p in payloads:
        if p.table is None:  # own bodies: no cheap bound
            bound = math.inf
            break
        bound += value_bound(p.header, float(np.max(np.abs(p.scales), initial=0.0)),
                             float(np.max(np.abs(p.table))),
                             p.rotation[2] if p.rotation is not None else 0,
                             float(np.max(np.abs(p.offsets), initial=0.0))
                             if p.offsets is not None else 0.0)
    return overflow_rule(dtype_name, factor, sum(p.header.amax for p in payloads), bound)


def _settle_overflow(total, payloads, rule):
    """``rule`` (_overflow_rule's) applied in place to ``total`` (numpy), the decoded sum of
    ``payloads`` times the factor; infinities that came as exceptions stay as they are."""
    if rule is None:
        return
    threshold, value = rule
    with np.errstate(invalid="ignore", over="ignore"):  # (a float32 total: beyond is inf)
        over = np.abs(total) >= threshold
    if math.isfinite(value) and any(p.exception_indices.size for p in payloads):
        over &= np.isfinite(total)
    total[over] = np.copysign(value, total[over])


def _native_decode_sum(payloads, numel, factor, out_dtype, out=None):
    """The compiled kernel's decode_sum of payloads of ``numel`` coded elements each."""
    header = payloads[0].header
    kernel = native.rotated_decode_sum if header.rotated else native.decode_sum
    return kernel(payloads, numel, header.bucket_size, factor, out_dtype, out)


def _payload_values(sections, use_native):
    """_coded_values(sections), by the compiled kernel where it can (the same values)."""
    if not use_native or sections.exception_indices.size:
        return _coded_values(sections)
    values, invalid = _native_decode_sum([sections], sections.header.coded_numel, 1.0,
                                         np.float64)
    _check_codes(invalid[0], sections.header, sections.table)
    return values


MATCHING_FIELDS = ("scheme_id", "bits", "dtype_code", "numel", "bucket_size", "shape_tag",
                   "bucket_params", "num_levels")


def decode_sum(buf, expect, factor=1.0, out_dtype=np.float64, reference=False, out=None):
    """``factor`` times the sum of all payloads in ``buf``, as ``out_dtype`` (float32 or
    float64), and the number of payloads; each payload is checked against ``expect`` (a header).
    With ``out`` (a contiguous array of expect.numel out_dtype, e.g. a slice of a larger
    result) the sum is written there, without an extra copy, and ``out`` is returned.

    The sum is taken in float64 in payload order, then multiplied by ``factor`` and rounded once
    to ``out_dtype``, so every rank that decodes the same bytes holds the same result. Raises
    PayloadError naming the first field in which a payload differs from ``expect``: ranks
    configured differently must fail loudly rather than average misread codes.
    """
    buf = np.ascontiguousarray(buf, dtype=np.uint8).reshape(-1)
    fields = MATCHING_FIELDS
    if SCHEMES_BY_ID[expect.scheme_id].choose_bits is not None:
        fields = tuple(f for f in fields if f != "bits")  # each payload carries its own bits
    payloads = []
    offset = 0
    while offset < buf.size:
        sections = split(buf, offset, max_numel=expect.numel)
        for name in fields:
            theirs, ours = getattr(sections.header, name), getattr(expect, name)
            if theirs != ours:
                raise PayloadError(
                    f"payload {len(payloads)} has {name}={theirs} but this rank expects "
                    f"{ours}: all ranks must use the same compressor settings for the same "
                    "tensor")
        payloads.append(sections)
        offset = sections.end
    if not payloads:
        raise PayloadError("no payload received")
    out_dtype = np.dtype(out_dtype)
    use_native = native.LIBRARY is not None and not reference and \
        SCHEMES_BY_ID[expect.scheme_id].body is None
    # Non-finite exceptions are rare (an overflowing step): the reference handles them. Payloads
    # with zero runs: the rotated scheme's summed a chunk at a time, each payload around its own
    # runs; the others' decoded one by one and added around their runs.
    if use_native and not any(p.exception_indices.size or p.zero_runs is not None
                              for p in payloads):
        total, invalid = _native_decode_sum(payloads, expect.numel, factor, out_dtype, out)
        for sections, count in zip(payloads, invalid):
            _check_codes(count, sections.header, sections.table)
        _settle_overflow(total, payloads, _overflow_rule(payloads, factor, expect.dtype_name))
        return total, len(payloads)
    if use_native and payloads[0].header.rotated and \
            not any(p.exception_indices.size for p in payloads):
        # one pass over the tensor, every payload's buckets decoded in cache beside the sum
        rule = _overflow_rule(payloads, factor, expect.dtype_name)
        total, invalid = native.rotated_decode_runs_sum(
            payloads, expect.numel, expect.bucket_size, factor,
            out_dtype if rule is None else np.float64, out if rule is None else None)
        for sections, count in zip(payloads, invalid):
            _check_codes(count, sections.header, sections.table)
        if rule is None:
            return total, len(payloads)
        return _finish_sum(total, payloads, 1.0, expect.dtype_name, out_dtype, out, rule)
    if use_native and not any(p.exception_indices.size for p in payloads):
        # each payload decoded in its coded elements and added around its own runs (every
        # rank's zeros lie elsewhere), by one copy or add per gap between runs; one scratch
        # array for every payload's coded values (fewer fresh pages to fault in)
        total = np.empty(expect.numel)
        scratch = np.empty(max(p.header.coded_numel for p in payloads))
        for index, sections in enumerate(payloads):
            coded = scratch[:sections.header.coded_numel]
            _, invalid = _native_decode_sum([sections], coded.size, 1.0, np.float64, coded)
            _check_codes(invalid[0], sections.header, sections.table)
            native.spread_sum(coded, sections.zero_runs, total, first=index == 0)
        return _finish_sum(total, payloads, factor, expect.dtype_name, out_dtype, out)
    total = _spread(_payload_values(payloads[0], use_native), payloads[0])
    for sections in payloads[1:]:
        values = _payload_values(sections, use_native)
        if sections.zero_runs is None:
            total += values
        else:
            total[coded_mask(sections.header.numel, sections.zero_runs)] += values
    return _finish_sum(total, payloads, factor, expect.dtype_name, out_dtype, out)


def _finish_sum(total, payloads, factor, dtype_name, out_dtype, out, rule=False):
    """(``factor`` times ``total``, the float64 sum of ``payloads``, settled and rounded to
    ``out_dtype``, in ``out`` where given; the number of payloads). ``rule``: the overflow rule
    of the sum times the factor, where the caller has it (False: found here)."""
    if rule is False:
        rule = _overflow_rule(payloads, factor, dtype_name)
    if rule is None and out is not None and out.dtype == out_dtype and out.shape == total.shape:
        # nothing to settle: the product rounded once, straight into out (one pass)
        np.multiply(total, factor, out=out, casting="unsafe")
        return out, len(payloads)
    total *= factor
    _settle_overflow(total, payloads, rule)
    if out is None:
        return total.astype(out_dtype, copy=False), len(payloads)
    if out.dtype != out_dtype or out.shape != total.shape:
        raise ValueError(f"out must be {total.size} {out_dtype}, got {out.size} {out.dtype}")
    out[...] = total
    return out, len(payloads)
