"""encode(): one float tensor into one payload (payload.py's format).

The work shared by every scheme (arguments checked by check_encode, the one check of the host
and the GPU codec; the scan for zero runs and amax; the zero-run section) is done here once;
each scheme family (schemes.py) then codes the elements outside the zero runs with one function
of ENCODERS. The compiled kernel (native.py) does the element-wise work where it was built;
``reference=True`` runs the numpy reference instead, which makes the same bytes.
"""

from dataclasses import dataclass, replace

import numpy as np

from . import native, rotation
from .fitting import BucketFit
from .levels import check_bits
from .packing import pack_bits
from .payload import (AMAX, AMAX_OFFSET, DTYPE_CODES, HEADER, MAX_BUCKET_SIZE, MAX_RUNS_NUMEL,
                      MIN_ZERO_RUN, ROTATION, RUN_COUNT, ZERO_RUNS_FLAG, PayloadHeader,
                      coded_mask)
from .quantize import (LANES, bucket_statistic, fit_scales, lane_sums, per_element,
                       stochastic_round)
from .rng import key_words, uniform_noise
from .schemes import check_scheme_bits, get_scheme, level_table

# A rotated bucket sums up to bucket_size elements: float32 sums of elements near float32's
# largest overflow, and tiny ones lose their mantissa. Tensors whose bucket norms leave this
# range (float32 work; float64's is wider) are encoded as x * 2**-e, the exponent e in the
# payload, and decoded times 2**e: exact, since both are powers of two.
SAFE_NORMS = {np.dtype(np.float32): (2.0 ** -100, 2.0 ** 100),
              np.dtype(np.float64): (2.0 ** -450, 2.0 ** 450)}  # squares stay normal


def check_encode(scheme, bits, bucket_size, dtype_name):
    """The checked (Scheme, bits, bucket size) of an encode of a ``dtype_name`` tensor with
    these settings; raises ValueError (TypeError for the dtype) naming the problem. The host
    (encode) and the GPU codec (horovod_tnq.gpu) both check their arguments here."""
    bits = check_bits(bits)
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    check_scheme_bits(scheme.name, bits)
    if dtype_name not in DTYPE_CODES:
        raise TypeError(f"unsupported dtype {dtype_name}; supported: {sorted(DTYPE_CODES)}")
    if not isinstance(bucket_size, (int, np.integer)) or not 1 <= bucket_size <= MAX_BUCKET_SIZE:
        raise ValueError(f"bucket_size must be an int in [1, {MAX_BUCKET_SIZE}], got "
                         f"{bucket_size!r}")
    if scheme.rotation:
        rotation.check_bucket_size(bucket_size)
    return scheme, bits, int(bucket_size)


@dataclass(frozen=True)
class Request:
    """One encode's settings, as a family's encoder receives them (``compiled``: whether the
    compiled kernel does the element-wise work)."""

    scheme: object
    bits: int
    bucket_size: int
    key: int
    step: int
    dtype_name: str
    shape: tuple
    options: dict
    compiled: bool

    def header(self, numel, bits=None, num_exceptions=0):
        return PayloadHeader.describe(self.scheme, self.bits if bits is None else bits,
                                      self.dtype_name, numel, self.bucket_size, self.shape,
                                      num_exceptions)


def encode(values, *, scheme="tnq", bits, bucket_size, key, step=0, dtype_name=None, shape=None,
           options=None, reference=False):
    """Compress a float array into one payload (uint8).

    ``values`` is float16/32/64 numpy data (frameworks hand bfloat16 over as float32 and name it
    in ``dtype_name``); ``key`` and ``step`` seed the stochastic rounding (see rng.py);
    ``options`` holds the scheme's own settings (Scheme.options).
    The compiled kernel (native.py) does the element-wise work where it was built;
    ``reference=True`` runs the numpy reference instead (the same bytes). Runs of at least
    MIN_ZERO_RUN exact zeros travel as (start, length) and decode to exactly 0 (payload.py);
    the scheme codes the other elements as if they were the whole tensor.
    """
    values = np.asarray(values)
    if values.dtype.kind != "f":
        raise TypeError(f"only floating-point tensors can be quantized, got {values.dtype}")
    dtype_name = dtype_name or values.dtype.name
    scheme, bits, bucket_size = check_encode(scheme, bits, bucket_size, dtype_name)
    work = np.float64 if dtype_name == "float64" else np.float32
    flat = values.reshape(-1).astype(work, copy=False)
    request = Request(scheme, bits, bucket_size, key, step, dtype_name,
                      values.shape if shape is None else shape, options or {},
                      native.LIBRARY is not None and not reference)
    runs, amax = scan(flat, request.compiled)
    encoder = ENCODERS[scheme.family]
    if scheme.family != "body" and runs.size:  # (the sparse bodies have no zero runs)
        if scheme.family == "rotated" and request.compiled:  # the kernel reads around the runs
            coded = encode_rotated(flat, request.header(flat.size - int(runs[:, 1].sum())),
                                   request.key, request.step, True, runs)
        else:
            coded = encoder(native.gather_coded(flat, runs) if request.compiled else
                            flat[coded_mask(flat.size, runs)], request)
        payload = _with_zero_runs(coded, flat.size, runs, scheme.rotation)
    else:
        payload = encoder(flat, request)
    payload[AMAX_OFFSET: AMAX_OFFSET + AMAX.size] = np.frombuffer(AMAX.pack(amax), np.uint8)
    return payload


_NO_RUNS = np.zeros((0, 2), dtype=np.int64)


def scan(flat, use_native=False):
    """What encode() reads off ``flat`` before quantizing it: ((start, length) rows, int64, of
    its maximal runs of at least MIN_ZERO_RUN exact zeros, +0 or -0; largest |finite element|
    as a float, 0 if none). No runs for arrays of more than MAX_RUNS_NUMEL elements.
    ``use_native``: the compiled kernel's single pass (the same results)."""
    fits = flat.size <= MAX_RUNS_NUMEL
    if use_native:  # (a run longer than the array: none counted, none stored)
        return native.scan(flat, MIN_ZERO_RUN if fits else flat.size + 1)
    finite = np.abs(flat[np.isfinite(flat)])
    amax = float(finite.max()) if finite.size else 0.0
    if not fits:
        return _NO_RUNS, amax
    zero = np.concatenate(([False], flat == 0, [False]))
    edges = np.flatnonzero(zero[1:] != zero[:-1])
    starts, lengths = edges[0::2], edges[1::2] - edges[0::2]
    long = lengths >= MIN_ZERO_RUN
    return np.stack([starts[long], lengths[long]], axis=1).astype(np.int64), amax


def _with_zero_runs(payload, numel, runs, rotated):
    """A payload of the coded elements turned into the payload of all ``numel``: its header
    takes the whole count and the flag, and the zero-run section follows the header (and the
    rotation section)."""
    fields = list(HEADER.unpack_from(payload))
    fields[5], fields[10] = numel, ZERO_RUNS_FLAG  # numel, flags
    head = HEADER.size + (ROTATION.size if rotated else 0)
    return np.concatenate([np.frombuffer(HEADER.pack(*fields), dtype=np.uint8),
                           payload[HEADER.size: head],
                           np.frombuffer(RUN_COUNT.pack(len(runs)), dtype=np.uint8),
                           runs.astype("<u4").reshape(-1).view(np.uint8), payload[head:]])


def _has_nonfinite(flat):
    return not np.isfinite(np.sum(np.abs(flat), dtype=np.float64))


def _exceptions(flat, nonfinite):
    """(indices, float32 values, flat with them zeroed) of flat's non-finite elements, where
    ``nonfinite`` says there are any."""
    if not nonfinite:
        return np.zeros(0, dtype="<u8"), np.zeros(0, dtype="<f4"), flat
    bad = ~np.isfinite(flat)
    values = flat[bad].astype("<f4")
    values[np.isnan(values)] = np.nan  # one NaN bit pattern, whatever the framework
    return np.flatnonzero(bad).astype("<u8"), values, np.where(bad, 0, flat).astype(flat.dtype)


def _chosen_bits(finite, request):
    """The payload's bits: the configured ones, or fewer where the scheme chooses them."""
    if request.scheme.choose_bits is None:
        return request.bits
    return request.scheme.choose_bits(finite, request.bucket_size, request.bits,
                                      **request.options)


def fit_buckets(scheme, flat, bucket_size, bits, scales=None):
    """The table and per-bucket parameters ``scheme`` quantizes ``flat`` with (a BucketFit);
    ``scales``: the bucket statistic, where already computed."""
    if scheme.fit is not None:
        return scheme.fit(flat, bucket_size, bits)
    table = level_table(scheme.scheme_id, bits)
    if scales is None:
        scales = bucket_statistic(flat, bucket_size, scheme.statistic)
    if scheme.fit_scale:
        scales = fit_scales(flat, bucket_size, table, scales)
    return BucketFit(table, scales, None)


def _sections(out, sections):
    """Write ``sections`` (arrays) one after the other from the start of ``out`` (uint8);
    returns where they end."""
    at = 0
    for section in sections:
        raw = np.ascontiguousarray(section).view(np.uint8).reshape(-1)
        out[at: at + raw.size] = raw
        at += raw.size
    return at


def encode_table(flat, request):
    """The "table" family: per bucket a scale (and offset) from a statistic or a fit, the
    elements rounded to the table's levels."""
    scheme, bucket_size, n, work = request.scheme, request.bucket_size, flat.size, flat.dtype.type
    if request.compiled and scheme.fit is None:
        # the kernel counts non-finite elements as zeros in the statistic and the codes
        scales, nonfinite = native.bucket_statistic(flat, bucket_size, scheme.statistic)
    else:
        scales, nonfinite = None, _has_nonfinite(flat)
    exc_idx, exc_val, finite = _exceptions(flat, nonfinite)
    bits = _chosen_bits(finite, request)
    header = request.header(n, bits, exc_idx.size)
    fit = fit_buckets(scheme, finite, bucket_size, bits, scales)
    params = [fit.scales] + ([fit.offsets] if header.bucket_params == 2 else [])
    # A bucket statistic beyond the scale's float range (an L2 norm of values near float32's
    # largest) is stored as the largest finite scale: the bucket's values still fit under it,
    # where an infinite scale would decode as inf * 0 = NaN.
    limit = np.finfo(header.scale_dtype).max
    params = np.clip(np.stack(params), -limit, limit).astype(header.scale_dtype)
    # Normalise by the parameters as stored, so the decoder's offset + scale * level is exactly
    # what the encoder rounded towards. Buckets with scale 0 decode to their offset.
    divisor = np.where(params[0] != 0, params[0], 1).astype(work)
    offsets = params[1].astype(work) if header.bucket_params == 2 else None
    nearest = scheme.rounding == "nearest"

    levels = np.asarray(fit.table, dtype="<f4") if scheme.sends_levels else np.zeros(0, "<f4")
    out = np.empty(header.total_size, dtype=np.uint8)
    at = _sections(out, (np.frombuffer(header.pack(), dtype=np.uint8), levels, params, exc_idx,
                         exc_val))
    if request.compiled:
        native.quantize_pack(flat, bucket_size, divisor, fit.table, key_words(request.key),
                             request.step, bits, offsets=offsets, nearest=nearest, out=out[at:])
        return out
    if offsets is not None:
        finite = finite - per_element(offsets, bucket_size, n)
    normalised = (finite / per_element(divisor, bucket_size, n)).astype(np.float32)
    if nearest:
        noise = np.full(n, 0.5, dtype=np.float32)  # rounds up exactly when p > 1/2
    else:
        noise = uniform_noise(n, request.key, request.step)
    out[at:] = pack_bits(stochastic_round(normalised, fit.table, noise), bits)
    return out


def encode_body(flat, request):
    """The "body" family: the header, the non-finite exceptions, then the scheme's own body
    (Scheme.body) of the finite values."""
    exc_idx, exc_val, finite = _exceptions(flat, _has_nonfinite(flat))
    bits = _chosen_bits(finite, request)
    body = request.scheme.body.encode(finite, bits=bits, key=request.key, step=request.step,
                                      **request.options)
    header = replace(request.header(flat.size, bits, exc_idx.size), body_size=body.size)
    return np.concatenate([np.frombuffer(header.pack(), dtype=np.uint8),
                           exc_idx.view(np.uint8), exc_val.view(np.uint8), body])


def encode_rotated(flat, header, key, step, use_native=False, runs=None):
    """The payload of the rotated scheme for ``flat`` (``header`` without exceptions yet); with
    ``runs`` (scan's zero runs of flat; the compiled kernel only), for flat's elements outside
    them, which ``header`` counts.

    1. Rotate each bucket (rotation.rotate): r = H (d * x), padded to whole buckets, with
       non-finite elements as zeros (they travel as exceptions).
    2. Round each coordinate to the nearest level of the unit Lloyd-Max table for N(0, 1)
       (levels.gaussian_levels) after dividing by the bucket's RMS, sigma = ||r|| / sqrt(n): the
       truncation threshold and levels that minimise the error for the Gaussian that r follows.
    3. Scale: EDEN's S = <r, r> / <t[c], r> (Vargaftik et al., ICML 2022), which makes the
       decoded bucket unbiased over the random rotation, divided by n to undo H H = n I.
    The numpy reference and the compiled kernel share every step but the element loops, which
    they compute identically; the kernel writes the codes straight into the payload.
    """
    exponent = 0
    payload, norms = _encode_rotated(flat, header, key, step, use_native, exponent, runs=runs)
    low, high = SAFE_NORMS[flat.dtype]
    largest = float(norms.max()) if norms.size else 0.0
    # (an overflowing rotation makes inf - inf: NaN norms; float64 squares of values below
    # ~1e-154 underflow: zero norms of a nonzero tensor)
    if not largest <= high or 0.0 < largest < low or \
            (largest == 0.0 and np.any((flat != 0) & np.isfinite(flat))):
        # rare: encode x * 2**-e with the largest finite |x| scaled into [0.5, 1)
        if runs is not None:
            flat = native.gather_coded(flat, runs)
        finite = flat[np.isfinite(flat)]
        exponent = int(np.frexp(np.abs(finite).max())[1]) if finite.size else 0
        payload, _ = _encode_rotated(np.ldexp(flat, -exponent).astype(flat.dtype), header, key,
                                     step, use_native, exponent, exceptions_of=flat)
    return payload


def _encode_rotated(flat, header, key, step, use_native, exponent, exceptions_of=None,
                    runs=None):
    """(payload, norm of each rotated bucket) of encode_rotated for values already scaled by
    2**-exponent; non-finite exceptions are taken from ``exceptions_of`` (the unscaled values)
    when given; ``runs``: encode_rotated's (the compiled kernel only)."""
    assert runs is None or use_native, "only the compiled kernel reads around zero runs"
    bucket, bits = header.bucket_size, header.bits
    table = level_table(header.scheme_id, bits)
    codes_size = header.section_sizes()[4]
    out = np.empty(header.total_size, dtype=np.uint8)
    original = flat if exceptions_of is None else exceptions_of
    if use_native:
        codes = out[out.size - codes_size:]
        norms, dots, nonfinite = native.encode_rotated(flat, bucket, key_words(key), step, table,
                                                       bits, codes, runs)
        if nonfinite and runs is not None:  # (rare) the exceptions' indices count coded elements
            original = native.gather_coded(original, runs)
        exc_idx, exc_val, _ = _exceptions(original, nonfinite)
    else:
        nonfinite = _has_nonfinite(flat)
        exc_idx, exc_val, _ = _exceptions(original, nonfinite)
        finite = np.where(np.isfinite(flat), flat, 0).astype(flat.dtype) if nonfinite else flat
        with np.errstate(over="ignore", invalid="ignore"):  # encode_rotated checks the norms
            rows = rotation.rotate(finite, bucket, key, step)
            rotated = rows.reshape(-1)
            norms = bucket_statistic(rotated, bucket, "l2")
            divisor = np.where(norms != 0, norms / np.sqrt(bucket), 1.0).astype(rotated.dtype)
            normalised = (rows / divisor[:, None]).astype(np.float32).reshape(-1)
        indices = stochastic_round(normalised, table, np.full(rotated.size, 0.5, np.float32))
        products = table.astype(np.float64)[indices] * rotated.astype(np.float64)
        dots = lane_sums(_lane_rows(products, bucket))
        codes = pack_bits(indices, bits)
    scales = np.zeros(norms.size)
    positive = dots > 0  # nearest rounding keeps each sign, so only an all-zero bucket has 0
    scales[positive] = norms[positive] * norms[positive] / dots[positive] / bucket
    header = replace(header, num_exceptions=exc_idx.size)
    sections = (np.frombuffer(header.pack(), dtype=np.uint8),
                np.frombuffer(ROTATION.pack(key & 0xFFFFFFFFFFFFFFFF, int(step) & 0xFFFFFFFF,
                                            exponent), dtype=np.uint8),
                scales.astype(header.scale_dtype), exc_idx, exc_val)
    if exc_idx.size:  # rare (an overflowing step): a larger payload
        return np.concatenate([np.ascontiguousarray(section).view(np.uint8).reshape(-1)
                               for section in sections + (codes,)]), norms
    at = _sections(out, sections)
    if not use_native:
        out[at:] = codes
    return out, norms


def _lane_rows(flat, bucket):
    """flat (whole buckets) as rows zero-padded to a multiple of LANES, for lane_sums."""
    rows = flat.reshape(-1, bucket)
    width = -(-bucket // LANES) * LANES
    if width == bucket:
        return rows
    padded = np.zeros((rows.shape[0], width))
    padded[:, :bucket] = rows
    return padded


def encode_rotated_family(flat, request):
    """The "rotated" family: encode_rotated."""
    return encode_rotated(flat, request.header(flat.size), request.key, request.step,
                          request.compiled)


# How each scheme family (Scheme.family) codes a flat float32/float64 array without zero runs.
ENCODERS = {"table": encode_table, "rotated": encode_rotated_family, "body": encode_body}
