"""The payload format: one tensor's compressed payload, its header, its sections and the
bounds on what it decodes to (encoder.py writes payloads, decoder.py sums them).

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
                 (uint32) and exponent e (int32; see encoder.SAFE_NORMS): what the decoder
                 needs to undo the rotation; the values decode times 2**e
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

Schemes with their own payload body (the "body" family, schemes.py) keep the 40-byte
header and the non-finite exceptions, followed by the body their module lays out.
"""

import math
import struct
import zlib
from dataclasses import dataclass, replace

import numpy as np

from . import rotation
from .packing import packed_size
from .schemes import SCHEMES_BY_ID, check_scheme_bits, get_scheme, level_table

FORMAT_VERSION = 4
MAGIC = b"TNQ" + bytes([FORMAT_VERSION])
HEADER = struct.Struct("<4sBBBBQIIIHHd")
assert HEADER.size == 40
AMAX = struct.Struct("<d")
AMAX_OFFSET = 32  # of amax in the header
ROTATION = struct.Struct("<QIi")  # the sender's stream key, step, power-of-two exponent
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
    def scheme(self):
        return SCHEMES_BY_ID[self.scheme_id]

    @property
    def rotated(self):
        return self.scheme.rotation

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

