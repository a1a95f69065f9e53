"""One tensor's compressed payload: encode, validate, decode.

A payload is a self-delimiting uint8 buffer, so several ranks' payloads can be concatenated by an
allgather and walked through afterwards. Bucket i of ``bucket size`` consecutive elements decodes
as ``offset[i] + scale[i] * table[code]``. Layout (little-endian), format version 4:

    offset size  field
    0      4     magic b"TNQ" + format version (4)
    4      1     scheme id (see SCHEMES)
    5      1     bits per code (1..8)
    6      1     dtype code of the original tensor (see DTYPE_CODES)
    7      1     parameters per bucket: 1 (scale) or 2 (scale, offset)
    8      8     numel
    16     4     bucket size (elements sharing their parameters)
    20     4     number of non-finite exceptions
    24     4     shape tag (crc32 of the shape, to catch mismatched tensors)
    28     2     number of levels sent: 0 (the scheme's fixed table) or 2**bits (a fitted table)
    30     2     flags: bit 0 set when a zero-run section follows (other bits 0)
    32     8     amax: the largest |finite element| of the values encoded (float64; 0 if none),
                 which bounds every sum the decoder forms (see OVERFLOW_LIMITS)
    40     16    rotating schemes only (Scheme.rotation): the sender's stream key (uint64), step
                 (uint32) and exponent e (int32; see SAFE_NORMS): what the decoder needs to undo
                 the rotation; the values decode times 2**e
           ...   zero runs, if flagged: their count k (uint32), then k (start, length) pairs
                 (uint32): maximal runs of at least MIN_ZERO_RUN exact zeros, ascending. They
                 decode to exactly 0 and are left out of everything below, which describes the
                 other ("coded") elements in order, as a payload of that many elements would
           ...   levels, if sent: float32, strictly ascending (the table for unit scale)
           ...   per-bucket parameters, float32 (float64 for float64 tensors): all scales, then
                 all offsets if there are two per bucket. A negative scale mirrors the bucket.
           ...   exception indices (uint64), then their values (float32)
           ...   codes, bit-packed (see packing.py); rotating schemes code the padded buckets
                 (rotation.padded_size elements), and bucket i decodes as the inverse rotation
                 of scale[i] * table[code]

Version 4 added amax and the zero runs (embedding rows that no rank touched, gradients of frozen or
unused parameters: a rotation would otherwise spread its bucket's error into them, and Adam turns
that noise into full steps).
Version 3 added the rotation section; version 2 payloads of other schemes are laid out the same.
Version 1 had no levels and one scale per bucket (bytes 7 and 28-31 reserved).

Non-finite gradient elements are carried exactly (index + value) and overwrite the decoded value,
so NaN and +-Inf reach the reduced gradient exactly where uncompressed Horovod would put them
(mixed-precision loss scalers depend on that). Statistics are taken over the finite elements.

Schemes with their own payload body (Scheme.body: adaptive Top-K, binomial DP) keep the 40-byte
header and the non-finite exceptions, followed by the body their module lays out.
"""

import math
import struct
import zlib
from dataclasses import dataclass, field, replace

import numpy as np

from . import native, rotation
from .fitting import BucketFit, bingrad_fit, maxmin_fit, orq_fit, tnq_opt_fit
from .levels import (binary_levels, check_bits, gaussian_levels, maxmin_levels, nuqsgd_levels,
                     orq_levels, qsgd_levels, sign_levels, ternary_levels, tnq_levels,
                     uniform_levels)
from .packing import pack_bits, packed_size, unpack_bits
from .quantize import (LANES, bucket_statistic, fit_scales, lane_sums, per_element,
                       stochastic_round)
from .rng import key_words, uniform_noise

FORMAT_VERSION = 4
MAGIC = b"TNQ" + bytes([FORMAT_VERSION])
HEADER = struct.Struct("<4sBBBBQIIIHHd")
assert HEADER.size == 40
AMAX = struct.Struct("<d")
AMAX_OFFSET = 32  # of amax in the header
ROTATION = struct.Struct("<QIi")  # the sender's stream key, step, power-of-two exponent
# A rotated bucket sums up to bucket_size elements: float32 sums of elements near float32's
# largest overflow, and tiny ones lose their mantissa. Tensors whose bucket norms leave this
# range (float32 work; float64's is wider) are encoded as x * 2**-e, the exponent e in the
# payload, and decoded times 2**e: exact, since both are powers of two.
SAFE_NORMS = {np.dtype(np.float32): (2.0 ** -100, 2.0 ** 100),
              np.dtype(np.float64): (2.0 ** -450, 2.0 ** 450)}  # squares stay normal
MAX_EXPONENT = 1100  # |e| a payload may carry

# Runs of exact zeros at least this long travel as a (start, length) pair of 8 bytes instead of
# codes: at 2 bits per element a run of 32 costs what its codes would, and every longer one
# saves bytes. Shorter runs are coded as usual. Payloads of 2**32 elements or more (runs are
# stored as uint32) and the schemes with their own body (already sparse) have none.
MIN_ZERO_RUN = 32
ZERO_RUNS_FLAG = 1
RUN_COUNT = struct.Struct("<I")
MAX_RUNS_NUMEL = (1 << 32) - 1

# Buckets hold at most this many elements. Work arrays are padded to whole buckets, so a larger
# bucket on a small tensor would allocate up to the bucket's size (16 GiB for 2**32 - 1); 2**24
# is far beyond where a bucket stops paying (its one float costs 32 / 2**24 bits per element).
MAX_BUCKET_SIZE = 1 << 24

DTYPE_CODES = {"float16": 1, "bfloat16": 2, "float32": 3, "float64": 4}
DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}


@dataclass(frozen=True, eq=False)  # one object per scheme: compared by identity
class Scheme:
    """How a tensor is quantized: per bucket, value = offset + scale * level, the levels a sorted
    table of at most 2**bits entries for unit scale, rounded stochastically (unbiased between
    adjacent levels) or, with ``rounding="nearest"``, to the nearest level.

    Fixed-table schemes take the scale from a bucket ``statistic`` (quantize.bucket_statistic),
    searched further with ``fit_scale``. Data-fitted schemes compute table and parameters with
    ``fit(flat, bucket_size, bits) -> fitting.BucketFit``; they store ``bucket_params`` floats
    per bucket (1: scale, 2: scale and offset) and, with ``sends_levels``, the fitted table.

    Schemes that are not one level table per bucket plug in through ``body``, ``choose_bits``
    and ``options`` (registered by core/__init__.py from core/topk.py, dynamic.py, privacy.py):
    body: a module laying out the whole payload body after the header and the non-finite
    exceptions (check_bits, encode, size, decode, max_size); choose_bits: picks each payload's
    bits (at most the configured ones) from the data; options: the scheme's own settings, name
    -> default (users pass them to the compressor; encode receives them), checked by
    ``check_options(bits, **options)``.

    Error feedback (the protocol layer's): ``error_feedback_default`` is the decay a compressor
    uses unless told otherwise (1.0 for schemes that leave entries out, whose mass would
    otherwise be lost for good); ``refuses_error_feedback`` says why a scheme cannot have it.

    With ``rotation`` each bucket is rotated (rotation.py) before it is rounded to the nearest
    level of a table for unit RMS, and its scale is then EDEN's correction (encode_rotated).
    """

    name: str
    scheme_id: int
    level_table: object  # bits -> float32 table (for fitted tables: the starting one)
    statistic: object    # name of the bucket statistic, or None for data-fitted schemes
    reference: str
    fit_scale: bool = False  # search the scale on the data (quantize.fit_scales)
    fit: object = None       # data-fitted schemes: see fitting.py
    bucket_params: int = 1
    sends_levels: bool = False
    rounding: str = "stochastic"
    body: object = None
    choose_bits: object = None
    options: dict = field(default_factory=dict)
    check_options: object = None
    error_feedback_default: float = 0.0
    refuses_error_feedback: str = None
    rotation: bool = False  # buckets rotated first (rotation.py); nearest rounding, EDEN scale

    def levels_sent(self, bits):
        return 1 << bits if self.sends_levels else 0


SCHEMES = {
    scheme.name: scheme
    for scheme in (
        Scheme("tnq-rht", 24, gaussian_levels, "l2",
               "TNQ's optimal truncation and levels for the Gaussian that a random Hadamard "
               "rotation makes of any gradient; EDEN's unbiasing scale (Vargaftik et al., "
               "ICML 2022)", rounding="nearest", rotation=True),
        Scheme("tnq", 1, tnq_levels, "mean_abs",
               "Yan et al., Truncated Non-uniform Quantization, arXiv 2402.01160"),
        Scheme("tnq-fit", 8, tnq_levels, "mean_abs",
               "TNQ's levels with the threshold fitted per bucket to the observed values",
               fit_scale=True),
        Scheme("tnq-opt", 16, tnq_levels, None,
               "TNQ's E_TQ minimised over the level table on the observed values (fitting.py)",
               fit=tnq_opt_fit, sends_levels=True),
        Scheme("tnq-uniform", 2, uniform_levels, "mean_abs",
               "truncated uniform levels (Yan et al., arXiv 2402.01798), Laplace threshold"),
        Scheme("qsgd", 3, qsgd_levels, "l2", "Alistarh et al., QSGD, NeurIPS 2017"),
        Scheme("qsgdinf", 4, qsgd_levels, "max_abs", "QSGD scaled by max |x| (QSGDinf)"),
        Scheme("nuqsgd", 5, nuqsgd_levels, "l2", "Ramezani-Kebrya et al., NUQSGD, JMLR 2021"),
        Scheme("maxmin", 17, maxmin_levels, None,
               "bucketed MaxMin: CGX (IST-DASLab Horovod fork), Bagua ByteGrad",
               fit=maxmin_fit, bucket_params=2),
        Scheme("orq", 18, orq_levels, None,
               "Xu, Huo, Huang, ORQ, arXiv 2002.11082", fit=orq_fit, sends_levels=True),
        Scheme("bingrad", 19, binary_levels, None,
               "Xu, Huo, Huang, BinGrad, arXiv 2002.11082", fit=bingrad_fit, bucket_params=2,
               rounding="nearest"),
        Scheme("terngrad", 6, ternary_levels, "max_abs", "Wen et al., TernGrad, NeurIPS 2017"),
        Scheme("sign", 7, sign_levels, "max_abs", "stochastic 1-bit sign, max |x| scaled"),
    )
}
SCHEMES_BY_ID = {scheme.scheme_id: scheme for scheme in SCHEMES.values()}
assert len(SCHEMES_BY_ID) == len(SCHEMES), "scheme ids must be unique"

def register_scheme(scheme):
    """Add a scheme to the registry (get_compressor, payload decoding) under its name and id."""
    if scheme.name in SCHEMES or scheme.scheme_id in SCHEMES_BY_ID:
        raise ValueError(f"scheme name {scheme.name!r} or id {scheme.scheme_id} already taken")
    SCHEMES[scheme.name] = scheme
    SCHEMES_BY_ID[scheme.scheme_id] = scheme


_TABLES = {}


def level_table(scheme_id, bits):
    key = (scheme_id, bits)
    if key not in _TABLES:
        _TABLES[key] = SCHEMES_BY_ID[scheme_id].level_table(bits)
    return _TABLES[key]


def get_scheme(name):
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown scheme {name!r}; known: {sorted(SCHEMES)}") from None


def check_scheme_bits(name, bits):
    """Raise a ValueError naming the problem if ``name`` cannot run at ``bits``."""
    scheme = get_scheme(name)
    if scheme.body is not None:
        scheme.body.check_bits(bits)
        return
    level_table(scheme.scheme_id, check_bits(bits))  # raises where the scheme has no table


def supports(name, bits):
    """Whether scheme ``name`` runs at ``bits`` bits per element."""
    try:
        check_scheme_bits(name, bits)
    except ValueError:
        return False
    return True


def fit_buckets(scheme, flat, bucket_size, bits):
    """The table and per-bucket parameters ``scheme`` quantizes ``flat`` with (a BucketFit)."""
    if scheme.fit is not None:
        return scheme.fit(flat, bucket_size, bits)
    table = level_table(scheme.scheme_id, bits)
    scales = bucket_statistic(flat, bucket_size, scheme.statistic)
    if scheme.fit_scale:
        scales = fit_scales(flat, bucket_size, table, scales)
    return BucketFit(table, scales, None)


def shape_tag(shape):
    return zlib.crc32(repr(tuple(int(d) for d in shape)).encode("ascii"))


class PayloadError(ValueError):
    """A payload that is corrupted, truncated, or does not match what this rank expects."""


@dataclass(frozen=True)
class PayloadHeader:
    scheme_id: int
    bits: int
    dtype_code: int
    numel: int
    bucket_size: int
    num_exceptions: int
    shape_tag: int
    bucket_params: int = 1
    num_levels: int = 0
    body_size: int = None  # bytes of the body, for schemes with their own body (Scheme.body)
    zero_runs: int = 0  # runs of zeros in the zero-run section (none: no section)
    zeros: int = 0  # elements in those runs
    amax: float = 0.0  # largest |finite element| encoded

    @property
    def coded_numel(self):
        """Elements that the codes, scales and exceptions describe: those outside zero runs."""
        return self.numel - self.zeros

    @classmethod
    def describe(cls, scheme, bits, dtype_name, numel, bucket_size, shape, num_exceptions=0):
        """The header of a payload of ``scheme`` (a name or Scheme) for a tensor of ``shape``."""
        scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
        return cls(scheme.scheme_id, bits, DTYPE_CODES[dtype_name], int(numel), int(bucket_size),
                   num_exceptions, shape_tag(shape), scheme.bucket_params,
                   scheme.levels_sent(bits))

    @property
    def dtype_name(self):
        return DTYPE_NAMES[self.dtype_code]

    @property
    def scale_dtype(self):
        return np.dtype("<f8") if self.dtype_name == "float64" else np.dtype("<f4")

    @property
    def num_buckets(self):
        return -(-self.coded_numel // self.bucket_size)

    @property
    def rotated(self):
        return SCHEMES_BY_ID[self.scheme_id].rotation

    @property
    def rotation_size(self):
        """Bytes of the rotation section that follows the header (rotating schemes only)."""
        return ROTATION.size if self.rotated else 0

    @property
    def num_codes(self):
        """Codes in the payload: rotating schemes code their padded last bucket."""
        if self.rotated:
            return rotation.padded_size(self.coded_numel, self.bucket_size)
        return self.coded_numel

    @property
    def runs_size(self):
        """Bytes of the zero-run section (none without runs)."""
        return RUN_COUNT.size + 8 * self.zero_runs if self.zero_runs else 0

    def section_sizes(self):
        """Bytes of: levels, per-bucket parameters, exception indices, exception values, codes
        (after the header, the rotation section and the zero runs)."""
        return (
            self.num_levels * 4,
            self.bucket_params * self.num_buckets * self.scale_dtype.itemsize,
            self.num_exceptions * 8,
            self.num_exceptions * 4,
            packed_size(self.num_codes, self.bits),
        )

    @property
    def total_size(self):
        if self.body_size is not None:
            return HEADER.size + 12 * self.num_exceptions + self.body_size
        return HEADER.size + self.rotation_size + self.runs_size + sum(self.section_sizes())

    def pack(self):
        return HEADER.pack(MAGIC, self.scheme_id, self.bits, self.dtype_code, self.bucket_params,
                           self.numel, self.bucket_size, self.num_exceptions, self.shape_tag,
                           self.num_levels, ZERO_RUNS_FLAG if self.zero_runs else 0,
                           self.amax)


def encoded_size(numel, bits, bucket_size, dtype_name="float32", num_exceptions=0,
                 scheme="tnq", options=None):
    """Bytes of one payload: what each rank contributes to the allgather for this tensor (at
    most that, for schemes whose payloads vary with the data)."""
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    if scheme.body is not None:
        return scheme.body.max_size(int(numel), bits, **(options or {})) + 12 * num_exceptions
    header = PayloadHeader.describe(scheme, bits, dtype_name, numel, bucket_size, (numel,),
                                    num_exceptions)
    return header.total_size


def encode(values, *, scheme="tnq", bits, bucket_size, key, step=0, dtype_name=None, shape=None,
           options=None, reference=False):
    """Compress a float array into one payload (uint8).

    ``values`` is float16/32/64 numpy data (frameworks hand bfloat16 over as float32 and name it
    in ``dtype_name``); ``key`` and ``step`` seed the stochastic rounding (see rng.py);
    ``options`` holds the scheme's own settings (Scheme.options).
    The compiled kernel (native.py) does the element-wise work where it was built;
    ``reference=True`` runs the numpy reference instead (the same bytes). Runs of at least
    MIN_ZERO_RUN exact zeros travel as (start, length) and decode to exactly 0 (module
    docstring); the scheme codes the other elements as if they were the whole tensor.
    """
    bits = check_bits(bits)
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    check_scheme_bits(scheme.name, bits)
    values = np.asarray(values)
    if values.dtype.kind != "f":
        raise TypeError(f"only floating-point tensors can be quantized, got {values.dtype}")
    dtype_name = dtype_name or values.dtype.name
    if dtype_name not in DTYPE_CODES:
        raise TypeError(f"unsupported dtype {dtype_name}; supported: {sorted(DTYPE_CODES)}")
    if not isinstance(bucket_size, (int, np.integer)) or not 1 <= bucket_size <= MAX_BUCKET_SIZE:
        raise ValueError(f"bucket_size must be an int in [1, {MAX_BUCKET_SIZE}], got "
                         f"{bucket_size!r}")
    if scheme.rotation:
        rotation.check_bucket_size(bucket_size)
    work = np.float64 if dtype_name == "float64" else np.float32
    flat = values.reshape(-1).astype(work, copy=False)
    use_native = native.LIBRARY is not None and not reference and scheme.body is None
    shape = values.shape if shape is None else shape
    runs, amax = scan(flat, native.LIBRARY is not None and not reference)
    if scheme.body is None and runs.size:
        coded = flat[coded_mask(flat.size, runs)]
        payload = _encode_flat(coded, scheme, bits, bucket_size, key, step, dtype_name, shape,
                               options, use_native)
        payload = _with_zero_runs(payload, flat.size, runs, scheme.rotation)
    else:
        payload = _encode_flat(flat, scheme, bits, bucket_size, key, step, dtype_name, shape,
                               options, use_native)
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


def coded_mask(numel, runs):
    """Boolean mask of the ``numel`` elements outside ``runs`` ((start, length) rows,
    ascending, disjoint)."""
    runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    ends = runs[:, 0] + runs[:, 1]
    # alternating segments: coded before the first run, the run, coded before the next, ...
    segments = np.empty(2 * len(runs) + 1, dtype=np.int64)
    segments[0:-1:2] = runs[:, 0] - np.concatenate(([0], ends[:-1]))
    segments[1::2] = runs[:, 1]
    segments[-1] = numel - (ends[-1] if len(runs) else 0)
    kinds = np.zeros(segments.size, dtype=bool)
    kinds[0::2] = True
    return np.repeat(kinds, segments)


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


def _encode_flat(flat, scheme, bits, bucket_size, key, step, dtype_name, shape, options,
                 use_native):
    """encode() of a flat float32/float64 array, without zero runs."""
    n, work = flat.size, flat.dtype.type
    if scheme.rotation:
        return encode_rotated(flat, PayloadHeader.describe(scheme, bits, dtype_name, n,
                                                           bucket_size, shape), key, step,
                              use_native)
    native_statistic = use_native and scheme.fit is None
    if native_statistic:
        # the kernel counts non-finite elements as zeros in the statistic and the codes
        scales, nonfinite = native.bucket_statistic(flat, bucket_size, scheme.statistic)
    else:
        nonfinite = not np.isfinite(np.sum(np.abs(flat), dtype=np.float64))
    exc_idx, exc_val, finite = _exceptions(flat, nonfinite)

    options = options or {}
    if scheme.choose_bits is not None:
        bits = scheme.choose_bits(finite, bucket_size, bits, **options)
    header = PayloadHeader.describe(scheme, bits, dtype_name, n, bucket_size, shape,
                                    exc_idx.size)
    if scheme.body is not None:
        body = scheme.body.encode(finite, bits=bits, key=key, step=step, **options)
        header = replace(header, body_size=body.size)
        return np.concatenate([np.frombuffer(header.pack(), dtype=np.uint8),
                               exc_idx.view(np.uint8), exc_val.view(np.uint8), body])
    if native_statistic:
        table = level_table(scheme.scheme_id, bits)
        if scheme.fit_scale:
            scales = fit_scales(finite, bucket_size, table, scales)
        fit = BucketFit(table, scales, None)
    else:
        fit = fit_buckets(scheme, finite, bucket_size, bits)
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
    at = 0
    for section in (np.frombuffer(header.pack(), dtype=np.uint8), levels, params, exc_idx,
                    exc_val):
        raw = np.ascontiguousarray(section).view(np.uint8).reshape(-1)
        out[at: at + raw.size] = raw
        at += raw.size
    if use_native:
        native.quantize_pack(flat, bucket_size, divisor, fit.table, key_words(key), step, bits,
                             offsets=offsets, nearest=nearest, out=out[at:])
        return out
    if offsets is not None:
        finite = finite - per_element(offsets, bucket_size, n)
    normalised = (finite / per_element(divisor, bucket_size, n)).astype(np.float32)
    if nearest:
        noise = np.full(n, 0.5, dtype=np.float32)  # rounds up exactly when p > 1/2
    else:
        noise = uniform_noise(n, key, step)
    out[at:] = pack_bits(stochastic_round(normalised, fit.table, noise), bits)
    return out


def _exceptions(flat, nonfinite):
    """(indices, float32 values, flat with them zeroed) of flat's non-finite elements, where
    ``nonfinite`` says there are any."""
    if not nonfinite:
        return np.zeros(0, dtype="<u8"), np.zeros(0, dtype="<f4"), flat
    bad = ~np.isfinite(flat)
    values = flat[bad].astype("<f4")
    values[np.isnan(values)] = np.nan  # one NaN bit pattern, whatever the framework
    return np.flatnonzero(bad).astype("<u8"), values, np.where(bad, 0, flat).astype(flat.dtype)


def encode_rotated(flat, header, key, step, use_native=False):
    """The payload of the rotated scheme for ``flat`` (``header`` without exceptions yet).

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
    payload, norms = _encode_rotated(flat, header, key, step, use_native, exponent)
    low, high = SAFE_NORMS[flat.dtype]
    largest = float(norms.max()) if norms.size else 0.0
    # (an overflowing rotation makes inf - inf: NaN norms; float64 squares of values below
    # ~1e-154 underflow: zero norms of a nonzero tensor)
    if not largest <= high or 0.0 < largest < low or \
            (largest == 0.0 and np.any((flat != 0) & np.isfinite(flat))):
        # rare: encode x * 2**-e with the largest finite |x| scaled into [0.5, 1)
        finite = flat[np.isfinite(flat)]
        exponent = int(np.frexp(np.abs(finite).max())[1]) if finite.size else 0
        payload, _ = _encode_rotated(np.ldexp(flat, -exponent).astype(flat.dtype), header, key,
                                     step, use_native, exponent, exceptions_of=flat)
    return payload


def _encode_rotated(flat, header, key, step, use_native, exponent, exceptions_of=None):
    """(payload, norm of each rotated bucket) of encode_rotated for values already scaled by
    2**-exponent; non-finite exceptions are taken from ``exceptions_of`` (the unscaled values)
    when given."""
    bucket, bits = header.bucket_size, header.bits
    table = level_table(header.scheme_id, bits)
    codes_size = header.section_sizes()[4]
    out = np.empty(header.total_size, dtype=np.uint8)
    original = flat if exceptions_of is None else exceptions_of
    if use_native:
        codes = out[out.size - codes_size:]
        norms, dots, nonfinite = native.encode_rotated(flat, bucket, key_words(key), step, table,
                                                       bits, codes)
        exc_idx, exc_val, _ = _exceptions(original, nonfinite)
    else:
        nonfinite = not np.isfinite(np.sum(np.abs(flat), dtype=np.float64))
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
    at = 0
    for section in sections:
        raw = section.view(np.uint8).reshape(-1)
        out[at: at + raw.size] = raw
        at += raw.size
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


def read_header(buf, offset=0, max_numel=None):
    """The validated PayloadHeader of the payload at ``offset``; one that declares more than
    ``max_numel`` elements is refused before anything of that size is allocated."""
    buf = memoryview(np.ascontiguousarray(buf, dtype=np.uint8)).cast("B")
    if len(buf) - offset < HEADER.size:
        raise PayloadError(f"truncated payload: {len(buf) - offset} bytes left at offset "
                           f"{offset}, a header needs {HEADER.size}")
    (magic, scheme_id, bits, dtype_code, bucket_params, numel, bucket, n_exc, tag, num_levels,
     flags, amax) = HEADER.unpack_from(buf, offset)
    if magic[:3] != MAGIC[:3]:
        raise PayloadError(f"not a horovod_tnq payload (magic {magic!r} at offset {offset}); "
                           "corrupted data, or ranks disagree on which tensors are compressed")
    if magic != MAGIC:
        raise PayloadError(f"payload format version {magic[3]}, this rank reads version "
                           f"{FORMAT_VERSION}: all ranks must run the same horovod_tnq")
    if scheme_id not in SCHEMES_BY_ID:
        raise PayloadError(f"unknown scheme id {scheme_id} in payload")
    scheme = SCHEMES_BY_ID[scheme_id]
    if not 1 <= bits <= 8:
        raise PayloadError(f"invalid bits {bits} in payload")
    if dtype_code not in DTYPE_NAMES:
        raise PayloadError(f"invalid dtype code {dtype_code} in payload")
    if not 1 <= bucket <= MAX_BUCKET_SIZE or n_exc > numel or not 0.0 <= amax < math.inf:
        raise PayloadError(f"invalid payload header (bucket size {bucket}, {n_exc} exceptions "
                           f"for {numel} elements, amax {amax})")
    if max_numel is not None and numel > max_numel:
        raise PayloadError(f"payload declares numel={numel}, more than the {max_numel} "
                           "elements this rank expects: corrupted, or ranks disagree on the "
                           "tensor")
    try:
        check_scheme_bits(scheme.name, bits)
        if scheme.rotation:
            rotation.check_bucket_size(bucket)
    except ValueError as exc:
        raise PayloadError(f"invalid payload header: {exc}") from None
    if bucket_params != scheme.bucket_params or num_levels != scheme.levels_sent(bits) or \
            flags & ~ZERO_RUNS_FLAG or (flags and scheme.body is not None):
        raise PayloadError(
            f"invalid payload header: {bucket_params} parameters per bucket, {num_levels} "
            f"levels sent and flags {flags}, scheme {scheme.name!r} at {bits} bits has "
            f"{scheme.bucket_params} and {scheme.levels_sent(bits)}")
    header = PayloadHeader(scheme_id, bits, dtype_code, numel, bucket, n_exc, tag,
                           bucket_params, num_levels, amax=amax)
    if flags:
        runs = _read_runs(buf, offset + HEADER.size + header.rotation_size, numel)
        header = replace(header, zero_runs=len(runs), zeros=int(runs[:, 1].sum()))
        if n_exc > header.coded_numel:
            raise PayloadError(f"invalid payload header ({n_exc} exceptions for "
                               f"{header.coded_numel} coded elements)")
    if scheme.body is not None:
        header = replace(header, body_size=scheme.body.size(
            buf, offset + HEADER.size + 12 * n_exc, header))
    if len(buf) - offset < header.total_size:
        raise PayloadError(f"truncated payload: {len(buf) - offset} bytes at offset {offset}, "
                           f"header says {header.total_size}")
    return header


def _read_runs(buf, at, numel):
    """The validated zero runs ((start, length) rows, int64) of the section at ``at``."""
    if len(buf) - at < RUN_COUNT.size:
        raise PayloadError("truncated payload: its zero-run section is missing")
    (count,) = RUN_COUNT.unpack_from(buf, at)
    if not 1 <= count <= numel // MIN_ZERO_RUN or len(buf) - at < RUN_COUNT.size + 8 * count:
        raise PayloadError(f"invalid zero-run section: {count} runs in {len(buf) - at} bytes "
                           f"for {numel} elements")
    runs = np.frombuffer(buf, dtype="<u4", count=2 * count,
                         offset=at + RUN_COUNT.size).reshape(-1, 2).astype(np.int64)
    ends = runs[:, 0] + runs[:, 1]
    if np.any(runs[:, 1] < MIN_ZERO_RUN) or np.any(runs[1:, 0] <= ends[:-1]) or \
            ends[-1] > numel:
        raise PayloadError(f"invalid zero-run section: runs must be at least {MIN_ZERO_RUN} "
                           f"long, ascending, apart and within {numel} elements")
    return runs


@dataclass(frozen=True)
class Sections:
    """One payload's parts, as views into the buffer it came in. Schemes with their own body
    (Scheme.body) have no table, scales or codes: ``packed`` is then the body."""

    header: PayloadHeader
    table: np.ndarray  # float64 levels for unit scale; None for body schemes
    scales: np.ndarray  # float64, one per bucket
    offsets: np.ndarray  # float64, one per bucket, or None (zero)
    exception_indices: np.ndarray
    exception_values: np.ndarray
    packed: np.ndarray  # the bit-packed codes, or the body
    end: int  # offset just past the payload
    rotation: tuple = None  # rotating schemes: the sender's (key, step, exponent)
    zero_runs: np.ndarray = None  # (start, length) rows of its zero runs, if it has any


def split(buf, offset=0, max_numel=None):
    """The validated Sections of the payload at ``offset`` of a uint8 buffer (see read_header
    for ``max_numel``)."""
    header = read_header(buf, offset, max_numel)
    at = offset + HEADER.size
    turn = None
    if header.rotated:
        key, step, exponent = ROTATION.unpack_from(memoryview(buf[at: at + ROTATION.size]))
        if abs(exponent) > MAX_EXPONENT:
            raise PayloadError(f"invalid rotation section in payload: exponent {exponent}")
        turn = (key, step, exponent)
        at += ROTATION.size
    runs = None
    if header.zero_runs:
        runs = _read_runs(buf, at, header.numel)
        at += header.runs_size
    if header.body_size is not None:
        sizes = (0, 0, 8 * header.num_exceptions, 4 * header.num_exceptions, header.body_size)
    else:
        sizes = header.section_sizes()
    parts = []
    for size in sizes:
        parts.append(buf[at: at + size])
        at += size
    exc_idx, exc_val = parts[2].view("<u8"), parts[3].view("<f4")
    if exc_idx.size and int(exc_idx.max()) >= header.coded_numel:
        raise PayloadError(f"exception index {int(exc_idx.max())} out of range for "
                           f"{header.coded_numel} coded elements")
    if header.body_size is not None:
        return Sections(header, None, None, None, exc_idx, exc_val, parts[4], at)
    if header.num_levels:
        table = parts[0].view("<f4").astype(np.float64)
        if not (np.all(np.isfinite(table)) and np.all(np.diff(table) > 0)):
            raise PayloadError("invalid level table in payload: levels must be finite and "
                               "strictly ascending")
    else:
        table = level_table(header.scheme_id, header.bits).astype(np.float64)
    params = parts[1].view(header.scale_dtype).astype(np.float64)
    params = params.reshape(header.bucket_params, header.num_buckets)
    offsets = params[1] if header.bucket_params == 2 else None
    return Sections(header, table, params[0], offsets, exc_idx, exc_val, parts[4], at, turn,
                    runs)


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


def _coded_values(sections):
    """The decoded values (float64) of the coded elements of one payload."""
    header = sections.header
    if header.body_size is not None:
        values = SCHEMES_BY_ID[header.scheme_id].body.decode(sections.packed, header)
    else:
        codes = unpack_bits(sections.packed, header.bits, header.num_codes)
        _check_codes(int(np.count_nonzero(codes >= sections.table.size)), header,
                     sections.table)
        if sections.rotation is not None:
            return _rotated_values(sections, codes)
        values = sections.table[codes]
        values *= per_element(sections.scales, header.bucket_size, header.num_codes)
        if sections.offsets is not None:
            values += per_element(sections.offsets, header.bucket_size, header.coded_numel)
    values[sections.exception_indices] = sections.exception_values
    return values


def _rotated_values(sections, codes):
    """The decoded values (float64) of a payload of the rotated scheme: each bucket's
    scale * table[code], inverse-rotated. Tensors narrower than float64 sent float32 levels and
    scales, and are decoded in float32 (their rounding is far below the quantization error)."""
    header = sections.header
    work = header.scale_dtype.type
    values = sections.table.astype(work)[codes]
    values *= per_element(sections.scales.astype(work), header.bucket_size, header.num_codes)
    key, step, exponent = sections.rotation
    values = rotation.unrotate(values.reshape(-1, header.bucket_size), key, step)
    values = np.ldexp(values[: header.coded_numel].astype(np.float64), exponent)
    values[sections.exception_indices] = sections.exception_values
    return values


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


def value_bound(header, scale_max, level_max, exponent=0, offset_max=0.0):
    """The largest |value| a payload of ``header`` with these largest |scale|, |level|, offset
    and exponent can decode to (an inverse rotation can gather a whole bucket into one)."""
    spread = header.bucket_size * 2.0 ** exponent if header.rotated else 1.0
    return scale_max * level_max * spread + offset_max


# Where a sum leaves each dtype's range: its largest finite value, and the smallest magnitude
# that rounds beyond it (half a unit in the last place above the largest). Horovod sums in the
# tensor's dtype, so its sum is infinite from there on. bfloat16's largest is (2 - 2**-7) * 2**127.
OVERFLOW_LIMITS = {
    "float16": (65504.0, 65520.0),
    "bfloat16": (3.3895313892515355e38, 3.3895313892515355e38 + 2.0 ** 119),
    "float32": (float(np.finfo(np.float32).max), float(np.finfo(np.float32).max) + 2.0 ** 103),
    "float64": (float(np.finfo(np.float64).max), math.inf),  # float64 sums round as Horovod's
}


def overflow_rule(dtype_name, factor, amax_sum, bound=math.inf):
    """How a decoder settles results beyond the range of the tensor's dtype, as Horovod's sum
    would: None when there is nothing to do, else (threshold, value): every result r = factor *
    S (S the decoded sum) with |r| >= threshold becomes copysign(value, r).

    The ranks' true sum at each element is at most ``amax_sum`` (the sum of the payloads'
    amax) in magnitude. Where that is below the dtype's limit, no sum of Horovod's overflows,
    and an S beyond the limit is quantization error: it is held at the largest finite value.
    Otherwise an S beyond the limit is taken as the overflow that Horovod's sum has there, and
    becomes infinite (within the quantization error of the limit, Horovod's answer could be
    either). The overflow is judged on the sum before ``factor``, as Horovod's op=Average
    divides after summing (a prescale factor is taken as a postscale one). ``bound``: a bound
    on |S| (value_bound); below the limit nothing can reach it, and the result needs no pass.
    """
    largest, limit = OVERFLOW_LIMITS[dtype_name]
    if factor == 0 or bound < limit or math.isinf(limit):
        return None
    return limit * abs(factor), largest * abs(factor) if amax_sum < limit else math.inf


def _settle_overflow(total, payloads, factor, dtype_name):
    """overflow_rule applied in place to ``total`` (numpy), the decoded sum of ``payloads``;
    infinities that came as exceptions stay as they are."""
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
    rule = overflow_rule(dtype_name, factor, sum(p.header.amax for p in payloads), bound)
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
    # with zero runs are decoded one by one and added around their runs.
    if use_native and not any(p.exception_indices.size or p.zero_runs is not None
                              for p in payloads):
        total, invalid = _native_decode_sum(payloads, expect.numel, factor, out_dtype, out)
        for sections, count in zip(payloads, invalid):
            _check_codes(count, sections.header, sections.table)
        _settle_overflow(total, payloads, factor, expect.dtype_name)
        return total, len(payloads)
    total = _spread(_payload_values(payloads[0], use_native), payloads[0])
    for sections in payloads[1:]:
        values = _payload_values(sections, use_native)
        if sections.zero_runs is None:
            total += values
        else:
            total[coded_mask(sections.header.numel, sections.zero_runs)] += values
    total *= factor
    _settle_overflow(total, payloads, factor, expect.dtype_name)
    if out is None:
        return total.astype(out_dtype, copy=False), len(payloads)
    if out.dtype != out_dtype or out.shape != total.shape:
        raise ValueError(f"out must be {total.size} {out_dtype}, got {out.size} {out.dtype}")
    out[...] = total
    return out, len(payloads)
