"""The compiled codec loops (native.c), bound with ctypes; ``LIBRARY`` is None where they were
not built, and the codec then runs its numpy reference.

``pip install`` builds native.c into ``_native<EXTENSION_SUFFIX>`` next to this file (setup.py).
Set HOROVOD_TNQ_NATIVE=0 to run the numpy reference instead (the benchmarks compare both).
"""

import contextlib
import ctypes
import os
from importlib.machinery import EXTENSION_SUFFIXES

import numpy as np

STATISTIC_CODES = {"mean_abs": 0, "l2": 1, "max_abs": 2}

_i64, _i32, _u32, _f64, _ptr = (ctypes.c_int64, ctypes.c_int, ctypes.c_uint32, ctypes.c_double,
                                 ctypes.c_void_p)

RUNS_CHUNK = 4096  # native.c's: the elements rotated_decode_runs_sum sums at a time

# The C signatures of native.c's functions, declared once: name -> (return type, argument types,
# the argument names as in native.c). A name ending in "_*" is one function per work dtype
# (_f32: float, _f64: double, with the same signature).
SIGNATURES = {
    "tnq_bucket_statistic_*": (_i64, [_ptr, _i64, _i64, _i32, _ptr],
                               "x n bucket statistic out"),
    "tnq_quantize_pack_*": (None, [_ptr, _i64, _i64, _ptr, _ptr, _ptr, _i32, _u32, _u32, _u32,
                                   _i32, _i32, _ptr],
                            "x n bucket divisors offsets levels size key_lo key_hi step bits "
                            "nearest out"),
    "tnq_decode_sum": (None, [_i32, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _f64, _ptr,
                              _ptr, _ptr],
                       "payloads packed bits tables table_sizes scales offsets n bucket factor "
                       "out32 out64 invalid"),
    "tnq_encode_rotated_*": (_i64, [_ptr, _i64, _i64, _u32, _u32, _u32, _ptr, _i32, _i32, _ptr,
                                    _ptr, _ptr, _ptr, _ptr, _ptr, _i64],
                             "x n bucket key_lo key_hi step levels size bits norms dots scratch "
                             "codes out runs run_count"),
    "tnq_rotated_decode_sum": (None, [_i32, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr,
                                      _i64, _i64, _i32, _f64, _ptr, _ptr, _ptr, _ptr, _ptr],
                               "payloads packed bits tables table_sizes scales keys_lo keys_hi "
                               "steps exponents n bucket single factor out32 out64 invalid "
                               "scratch codes"),
    "tnq_rotated_decode_runs_sum": (
        None, [_i32, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr,
               _i64, _i64, _i32, _f64, _ptr, _ptr, _ptr, _ptr, _ptr],
        "payloads packed bits tables table_sizes scales keys_lo keys_hi steps exponents runs "
        "run_counts coded_numels n bucket single factor out32 out64 invalid scratch codes"),
    "tnq_scan_*": (_i64, [_ptr, _i64, _i64, _ptr, _i64, _ptr], "data n min_run runs capacity amax"),
    "tnq_gather_coded_*": (None, [_ptr, _i64, _ptr, _i64, _ptr], "data n runs count into"),
    "tnq_spread_sum": (None, [_ptr, _i64, _ptr, _i64, _ptr, _i32], "coded n runs count acc first"),
    "tnq_set_vector_path": (_i32, [_i32], "avx512"),
    "tnq_keep_denormals": (_u32, [], ""),
    "tnq_restore_csr": (None, [_u32], "csr"),
}
for _name, (_, _argtypes, _names) in SIGNATURES.items():
    assert len(_argtypes) == len(_names.split()), _name


def _declare(library):
    """Set every function's argtypes and restype from SIGNATURES."""
    for pattern, (restype, argtypes, _) in SIGNATURES.items():
        names = [pattern[:-1] + suffix for suffix in ("f32", "f64")] if pattern.endswith("_*") \
            else [pattern]
        for name in names:
            function = getattr(library, name)
            function.argtypes, function.restype = argtypes, restype


def _load():
    if os.environ.get("HOROVOD_TNQ_NATIVE", "1") == "0":
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in EXTENSION_SUFFIXES:
        path = os.path.join(here, "_native" + suffix)
        if os.path.exists(path):
            library = ctypes.CDLL(path)
            break
    else:
        return None
    _declare(library)
    library.tnq_set_vector_path(1)
    return library


LIBRARY = _load()


@contextlib.contextmanager
def keep_denormals():
    """Subnormal floats read and computed as such inside the block, on threads whose SSE
    flush-to-zero flags are set (TensorFlow's executor threads): numpy and the compiled loops
    then give the bytes they give everywhere else. Without the compiled library, nothing
    changes."""
    if LIBRARY is None:
        yield
        return
    saved = LIBRARY.tnq_keep_denormals()
    try:
        yield
    finally:
        LIBRARY.tnq_restore_csr(saved)


def _address(array):
    return array.ctypes.data


def _suffix(dtype):
    if dtype == np.float32:
        return "f32"
    if dtype == np.float64:
        return "f64"
    raise TypeError(f"the native codec takes float32 or float64, got {dtype}")


def bucket_statistic(flat, bucket_size, statistic):
    """(scales as float64, number of non-finite elements), non-finite elements counted as 0:
    quantize.bucket_statistic of the finite part."""
    flat = np.ascontiguousarray(flat)
    out = np.empty(-(-flat.size // bucket_size), dtype=np.float64)
    function = getattr(LIBRARY, f"tnq_bucket_statistic_{_suffix(flat.dtype)}")
    nonfinite = function(_address(flat), flat.size, bucket_size, STATISTIC_CODES[statistic],
                         _address(out))
    return out, int(nonfinite)


def quantize_pack(flat, bucket_size, divisors, table, key_words, step, bits, offsets=None,
                  nearest=False, out=None):
    """pack_bits(stochastic_round((flat - offset) / divisor per bucket, table, noise), bits) in
    one pass, non-finite elements taken as 0; ``divisors`` and ``offsets`` (None: no offsets)
    have flat's dtype; ``nearest`` rounds to the nearest level (noise 0.5). Writes into ``out``
    (uint8, exactly packed_size bytes) when given."""
    flat = np.ascontiguousarray(flat)
    divisors = np.ascontiguousarray(divisors, dtype=flat.dtype)
    if offsets is not None:
        offsets = np.ascontiguousarray(offsets, dtype=flat.dtype)
    table = np.ascontiguousarray(table, dtype=np.float32)
    size = (flat.size * bits + 7) // 8
    if out is None:
        out = np.empty(size, dtype=np.uint8)
    if out.dtype != np.uint8 or out.size != size or not out.flags.c_contiguous:
        raise ValueError(f"out must be {size} contiguous bytes")
    function = getattr(LIBRARY, f"tnq_quantize_pack_{_suffix(flat.dtype)}")
    lo, hi = key_words
    function(_address(flat), flat.size, bucket_size, _address(divisors),
             None if offsets is None else _address(offsets), _address(table), table.size, lo, hi,
             int(step) & 0xFFFFFFFF, bits, int(bool(nearest)), _address(out))
    return out


def scan(flat, min_run):
    """encoder.scan in one streaming pass: ((start, length) rows, int64, of flat's maximal runs of
    at least ``min_run`` exact zeros, largest |finite element| as a float)."""
    flat = np.ascontiguousarray(flat)
    function = getattr(LIBRARY, f"tnq_scan_{_suffix(flat.dtype)}")
    amax = ctypes.c_double(0.0)
    count = function(_address(flat), flat.size, min_run, None, 0, ctypes.byref(amax))
    runs = np.empty((count, 2), dtype=np.int64)
    if count:
        function(_address(flat), flat.size, min_run, _address(runs), count, ctypes.byref(amax))
    return runs, amax.value


def _checked_runs(runs, numel):
    """``runs`` as contiguous int64 (start, length) rows, refused (ValueError) unless they are
    ascending, apart and within ``numel`` elements: the compiled loops trust them."""
    runs = np.ascontiguousarray(np.zeros((0, 2)) if runs is None else runs,
                                dtype=np.int64).reshape(-1, 2)
    ends = runs[:, 0] + runs[:, 1]
    if runs.size and (runs[0, 0] < 0 or np.any(runs[:, 1] < 1) or ends[-1] > numel or
                      np.any(runs[1:, 0] <= ends[:-1])):
        raise ValueError(f"zero runs must be ascending, apart and within {numel} elements")
    return runs


def gather_coded(flat, runs):
    """flat's elements outside ``runs`` ((start, length) rows, ascending, disjoint; scan's), in
    order, as a new array: what payload.coded_mask selects, a copy per gap."""
    flat = np.ascontiguousarray(flat)
    runs = _checked_runs(runs, flat.size)
    out = np.empty(flat.size - int(runs[:, 1].sum()), dtype=flat.dtype)
    getattr(LIBRARY, f"tnq_gather_coded_{_suffix(flat.dtype)}")(
        _address(flat), flat.size, _address(runs), len(runs), _address(out))
    return out


def spread_sum(coded, runs, acc, first):
    """Add ``coded`` (float64, one payload's decoded coded elements) into ``acc`` (float64,
    contiguous) at the elements outside ``runs`` (None: none), in order; ``first``: set instead
    of add, and set the elements inside the runs to 0."""
    runs = _checked_runs(runs, acc.size)
    coded = np.ascontiguousarray(coded, dtype=np.float64)
    if acc.dtype != np.float64 or not acc.flags.c_contiguous or \
            coded.size != acc.size - int(runs[:, 1].sum()):
        raise ValueError("acc must be contiguous float64 with coded's elements and the runs")
    LIBRARY.tnq_spread_sum(_address(coded), acc.size, _address(runs), len(runs), _address(acc),
                           int(bool(first)))
    return acc


def set_vector_path(avx512):
    """Use the hand-written AVX-512 loops where the CPU has them (True, the default) or only the
    portable code (False); returns whether the AVX-512 loops are in use."""
    return bool(LIBRARY.tnq_set_vector_path(int(avx512)))


def decode_sum(payloads, numel, bucket_size, factor, out_dtype, out=None):
    """(factor * sum over payloads of offset + scale * table[code] per bucket, accumulated in
    float64 in payload order, as out_dtype (float32 or float64); per payload, the number of
    codes beyond its table). ``payloads`` are payload.Sections: each has its own bits, table,
    scales and (or None) offsets. Writes into ``out`` (numel contiguous out_dtype) when given."""
    return _decode_sum(payloads, numel, bucket_size, factor, out_dtype, out, rotated=False)


def _decode_sum(payloads, numel, bucket_size, factor, out_dtype, out, rotated,
                with_runs=False):
    count = len(payloads)
    keep = []  # the arrays whose addresses the kernel reads

    def pointers(arrays):
        arrays = [None if a is None else np.ascontiguousarray(a) for a in arrays]
        keep.extend(arrays)
        return (ctypes.c_void_p * count)(*[None if a is None else _address(a) for a in arrays])

    bits = (ctypes.c_int * count)(*[p.header.bits for p in payloads])
    sizes = (ctypes.c_int * count)(*[p.table.size for p in payloads])
    # padded to 2**bits levels, so that any code indexes inside the table
    tables = [np.zeros(1 << p.header.bits, dtype=np.float64) for p in payloads]
    for table, p in zip(tables, payloads):
        table[: p.table.size] = p.table
    if out is None:
        out = np.empty(numel, dtype=out_dtype)
    elif out.dtype != np.dtype(out_dtype) or out.size != numel or not out.flags.c_contiguous:
        raise ValueError(f"out must be {numel} contiguous {np.dtype(out_dtype)}, got "
                         f"{out.size} {out.dtype}")
    if out.dtype not in (np.float32, np.float64):
        raise TypeError(f"the native decoder writes float32 or float64, not {out.dtype}")
    invalid = np.zeros(count, dtype=np.int64)
    if rotated:
        words = [(p.rotation[0] & 0xFFFFFFFF, p.rotation[0] >> 32, p.rotation[1])
                 for p in payloads]
        lo, hi, steps = ((ctypes.c_uint32 * count)(*column) for column in zip(*words))
        exponents = (ctypes.c_int * count)(*[p.rotation[2] for p in payloads])
        arguments = [count, pointers([p.packed.astype(np.uint8, copy=False) for p in payloads]),
                     bits, pointers(tables), sizes,
                     pointers([p.scales.astype(np.float64, copy=False) for p in payloads]),
                     lo, hi, steps, exponents]
        ending = [numel, bucket_size, int(payloads[0].header.scale_dtype.itemsize == 4),
                  float(factor), _address(out) if out.dtype == np.float32 else None,
                  _address(out) if out.dtype == np.float64 else None, _address(invalid)]
        codes = np.empty(bucket_size, dtype=np.uint8)
        if with_runs:
            runs = [_checked_runs(p.zero_runs, numel) for p in payloads]
            if any(p.header.coded_numel != numel - int(r[:, 1].sum())
                   for p, r in zip(payloads, runs)):
                raise ValueError("each payload must code the elements outside its runs")
            # a chunk of doubles and a bucket of uint32; per payload, 256 float32 levels, a
            # bucket of doubles and a cursor (3 int64)
            scratch = np.empty(8 * RUNS_CHUNK + 4 * bucket_size +
                               (1024 + 8 * bucket_size + 24) * count, dtype=np.uint8)
            LIBRARY.tnq_rotated_decode_runs_sum(
                *arguments, pointers(runs), (ctypes.c_int64 * count)(*[len(r) for r in runs]),
                (ctypes.c_int64 * count)(*[p.header.coded_numel for p in payloads]), *ending,
                _address(scratch), _address(codes))
            return out, invalid.tolist()
        # 2 doubles and 1 uint32 per element of a bucket; per payload, 256 float32 levels, a
        # bucket of float32 values and its sign words
        per_payload = 1024 + 4 * bucket_size + 4 * (bucket_size // 32 + 1)
        scratch = np.empty(bucket_size * 20 + per_payload * count, dtype=np.uint8)
        LIBRARY.tnq_rotated_decode_sum(*arguments, *ending, _address(scratch), _address(codes))
        return out, invalid.tolist()
    LIBRARY.tnq_decode_sum(
        count, pointers([p.packed.astype(np.uint8, copy=False) for p in payloads]), bits,
        pointers(tables), sizes, pointers([p.scales.astype(np.float64, copy=False)
                                           for p in payloads]),
        pointers([None if p.offsets is None else p.offsets.astype(np.float64, copy=False)
                  for p in payloads]),
        numel, bucket_size, float(factor),
        _address(out) if out.dtype == np.float32 else None,
        _address(out) if out.dtype == np.float64 else None, _address(invalid))
    return out, invalid.tolist()


def encode_rotated(flat, bucket_size, key_words, step, table, bits, out, runs=None):
    """(L2 norm of each rotated bucket, <table[code], rotated> per bucket, number of
    non-finite elements) of encoder.encode_rotated, in one pass that keeps each bucket in cache;
    non-finite elements are taken as 0 and the packed codes are written into ``out``. With
    ``runs`` (scan's, of flat), the elements outside them are coded, read around the runs."""
    flat = np.ascontiguousarray(flat)
    table = np.ascontiguousarray(table, dtype=np.float32)
    runs = _checked_runs(runs, flat.size)
    coded = flat.size - int(runs[:, 1].sum())
    buckets = -(-coded // bucket_size)
    if out.dtype != np.uint8 or out.size != (buckets * bucket_size * bits + 7) // 8 or \
            not out.flags.c_contiguous:
        raise ValueError("out must hold exactly the packed codes of the padded buckets")
    norms = np.empty(buckets, dtype=np.float64)
    dots = np.empty(buckets, dtype=np.float64)
    scratch = np.empty(bucket_size * (flat.itemsize + 16), dtype=np.uint8)
    codes = np.empty(bucket_size, dtype=np.uint8)
    lo, hi = key_words
    nonfinite = getattr(LIBRARY, f"tnq_encode_rotated_{_suffix(flat.dtype)}")(
        _address(flat), coded, bucket_size, lo, hi, int(step) & 0xFFFFFFFF,
        _address(table), table.size, bits, _address(norms), _address(dots), _address(scratch),
        _address(codes), _address(out), _address(runs) if runs.size else None, len(runs))
    return norms, dots, int(nonfinite)


def rotated_decode_sum(payloads, numel, bucket_size, factor, out_dtype, out=None):
    """decode_sum for payloads of the rotated scheme (payload.Sections with ``rotation`` set)."""
    return _decode_sum(payloads, numel, bucket_size, factor, out_dtype, out, rotated=True)


def rotated_decode_runs_sum(payloads, numel, bucket_size, factor, out_dtype, out=None):
    """rotated_decode_sum for payloads of ``numel`` elements of which each codes those outside
    its own ``zero_runs`` (None: none): the sum each decoded alone and added around its runs
    (spread_sum) would give, in one pass over the tensor that keeps its work in cache."""
    return _decode_sum(payloads, numel, bucket_size, factor, out_dtype, out, rotated=True,
                       with_runs=True)
