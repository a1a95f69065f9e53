"""Host side of the GPU codec: payloads of "tnq-rht" and "tnq" encoded and decode-summed by the
Triton kernels of kernels.py, byte for byte what core.codec.encode / decode_sum produce.

The element data never leaves the device. The host builds the header bytes (core.codec's
PayloadHeader), reads back one flag per encode (whether a rare path below is needed) and, per
decode, the payloads' 56-byte heads (header and rotation section) to check them against ``expect``.

Rare paths run the core on the host and copy the result back (the same bytes, so ranks mixing
both still agree):
* encode: tensors with non-finite elements (their payload carries exceptions, laid out before
  the codes), tnq-rht tensors whose bucket norms leave codec.SAFE_NORMS (the payload then
  carries a power-of-two exponent), and tensors with runs of codec.MIN_ZERO_RUN exact zeros
  (their payload carries the runs: embedding gradients, every step);
* decode_sum: payloads with exceptions or a nonzero exponent, and anything that is not exactly
  the expected header (the core then raises its PayloadError, naming the field).

A kernel that fails to compile or launch raises KernelError; encode and decode_sum do not fall
back themselves (a test of the kernels must not pass on the host's bytes): the PyTorch adapter
does (torch/codecs.py, DeviceCodec).
"""

import math
import os
import sys
from dataclasses import replace

import numpy as np

from ..core import codec as core
from ..core import rotation
from ..core.encoder import check_encode
from ..core.packing import packed_size
from ..core.rng import key_words

SCHEMES = ("tnq-rht", "tnq")
_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
# tnq-rht encode: elements per tile (ROWS buckets of the bucket size); decode: the same for the
# decode kernel; tnq: buckets per program of the statistic pass, elements per program of the
# element-wise kernels. Tiles are powers of two and at least 32 elements (one sign word).
RHT_TILE, RHT_DECODE_TILE = 4096, 2048
TNQ_ROWS, TNQ_BLOCK = 64, 2048
PROGRAMS_PER_SM = 8  # persistent tnq-rht encode programs (each owns a scratch slot)

_kernels_module = None
_import_error = None
_loaded_after_tensorflow = False  # Triton was loaded by preload() after TensorFlow


def _load():
    global _kernels_module, _import_error
    if _kernels_module is None and _import_error is None:
        if "tensorflow" in sys.modules and ("triton" not in sys.modules or
                                            _loaded_after_tensorflow):
            # TensorFlow and Triton each carry LLVM; loading Triton after TensorFlow aborts the
            # process ("inconsistency in registered CommandLine options"). The other order works.
            _import_error = ImportError("Triton cannot be loaded after TensorFlow in one "
                                        "process; import triton (or torch's GPU path) first")
            return None
        try:
            import torch  # noqa: F401
            from . import kernels
            _kernels_module = kernels
        except ImportError as exc:  # triton or torch missing
            _import_error = exc
    return _kernels_module


def preload():
    """Import Triton now, if it is installed, so that PyTorch's own import of it cannot abort
    the process: PyTorch imports Triton whenever it is installed (torch._dynamo, at an
    optimizer's first step), and torch.utils.tensorboard imports TensorFlow when that is
    installed, so a script that made a SummaryWriter before its first step would abort there
    (see _load). After TensorFlow, Triton is loaded with RTLD_DEEPBIND (its library then binds
    to its own LLVM, not TensorFlow's); the GPU kernels still stay off in that process (_load),
    as that way of loading is untested on GPUs. Not with an LD_PRELOAD (e.g. jemalloc, which
    docs/install.md suggests for CPU training): with one, a DEEPBIND library aborts the process
    at exit."""
    global _loaded_after_tensorflow
    if "triton" in sys.modules:
        return
    after_tensorflow = "tensorflow" in sys.modules
    if after_tensorflow and os.environ.get("LD_PRELOAD"):
        return  # a preloaded allocator (jemalloc) aborts at exit with a DEEPBIND library
    flags = sys.getdlopenflags()
    if after_tensorflow:
        sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
    try:
        import triton  # noqa: F401
        _loaded_after_tensorflow = after_tensorflow
    except ImportError:
        pass
    finally:
        sys.setdlopenflags(flags)


def available():
    """Whether the GPU codec can run here: torch and triton importable."""
    return _load() is not None


def _kernels():
    kernels = _load()
    if kernels is None:
        raise RuntimeError("horovod_tnq.gpu needs torch and triton (pip install triton): "
                           f"{_import_error}")
    return kernels


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _dtype_names():
    import torch
    return {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
            torch.float64: "float64"}


def _check_device(tensor):
    if tensor.device.type != "cuda" and not _interpreting():
        raise ValueError(f"the GPU codec needs CUDA tensors, got one on {tensor.device} (CPU "
                         "tensors run only under Triton's interpreter, TRITON_INTERPRET=1)")


class KernelError(RuntimeError):
    """A kernel failed to compile or to launch on this device (Triton or the driver raised). The
    payload it worked on is unchanged for the caller: core.codec makes the same bytes on the
    host (the PyTorch adapter falls back to it)."""


def _launch(kernel, grid, tensor, *args, **kwargs):
    """Launch on the tensor's device, without FMA contraction (the reference rounds every
    multiply and add). Whatever the launch raises (compilation, resources, the driver) comes
    out as a KernelError naming the kernel, the device and the error; errors that a device
    reports later, asynchronously, are not caught here."""
    import torch
    try:
        if tensor.device.type == "cuda":
            with torch.cuda.device(tensor.device):
                kernel[grid](*args, enable_fp_fusion=False, enable_reflect_ftz=False, **kwargs)
        else:
            kernel[grid](*args, enable_fp_fusion=False, **kwargs)
    except Exception as exc:
        name = getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel))
        raise KernelError(f"the Triton kernel {name} failed to compile or launch on "
                          f"{tensor.device}: {type(exc).__name__}: {exc}") from exc


def _lowbias32(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _stream_words(key, step):
    """(key_lo, step_word) of rng.random_words for a key and a step."""
    lo, hi = key_words(key)
    return lo, _lowbias32((int(step) & _MASK32) ^ hi)


def _device_bytes(data, device):
    import torch
    return torch.from_numpy(np.frombuffer(bytes(data), dtype=np.uint8).copy()).to(device)


_TABLES = {}


def _table(device, scheme_id, bits, dtype):
    """The scheme's level table on the device, kept: one upload per (device, table, dtype)."""
    import torch
    key = (str(device), scheme_id, bits, dtype)
    if key not in _TABLES:
        levels = core.level_table(scheme_id, bits)
        _TABLES[key] = torch.tensor(levels.tolist(), dtype=dtype).to(device)
    return _TABLES[key]


def _max_programs(device, tiles):
    import torch
    if device.type != "cuda":
        return tiles
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return min(tiles, sms * PROGRAMS_PER_SM)


def _rows(most, buckets, least=1):
    """Buckets per program: ``most``, fewer for a tensor of fewer buckets (a power of two, at
    least ``least``: a tile of whole sign words)."""
    rows = 1
    while rows < min(most, buckets):
        rows *= 2
    return max(rows, least, 1)


def _warps(tile):
    """Warps for a tnq-rht tile held in registers: about 16 elements a thread up to 4096, then
    more threads for the buckets above (past 16384 elements a tile spills registers: such
    buckets run, slower)."""
    return 4 if tile < 4096 else 8 if tile <= 4096 else 16 if tile <= 16384 else 32


# ---- encode ----

def encode(tensor, *, scheme="tnq-rht", bits, bucket_size, key, step=0, dtype_name=None,
           shape=None):
    """core.codec.encode for a torch tensor on the GPU: the payload as a uint8 tensor on the
    tensor's device. float16/bfloat16/float32 tensors work in float32 (bfloat16 is named in the
    header), float64 in float64; ``dtype_name`` and ``shape`` as in core.codec.encode."""
    import torch
    kernels = _kernels()
    if scheme not in SCHEMES:
        raise ValueError(f"the GPU codec runs schemes {SCHEMES}, not {scheme!r}")
    if not torch.is_tensor(tensor) or tensor.dtype not in _dtype_names():
        raise TypeError(f"the GPU codec encodes float16/bfloat16/float32/float64 torch tensors, "
                        f"got {getattr(tensor, 'dtype', type(tensor))}")
    dtype_name = dtype_name or _dtype_names()[tensor.dtype]
    spec, bits, bucket_size = check_encode(scheme, bits, bucket_size, dtype_name)  # as the host's
    _check_device(tensor)
    shape = tuple(tensor.shape) if shape is None else shape
    flat = tensor.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    header = core.PayloadHeader.describe(spec, bits, dtype_name, flat.numel(), bucket_size, shape)
    args = dict(scheme=scheme, bits=bits, bucket_size=bucket_size, key=key, step=step,
                dtype_name=dtype_name, shape=shape)
    if spec.rotation:
        payload, rare = _encode_rotated(kernels, flat, header, key, step)
    else:
        payload, rare = _encode_tnq(kernels, flat, header, key, step)
    zero_run = _zero_run_found(flat)
    rare = zero_run if rare is None else rare | zero_run
    _write_amax(payload, flat)
    # One small read-back per tensor: whether a rare path (module docstring) is needed.
    if bool(rare.item()):
        return _host_encode(flat, **args)
    return payload


def _write_amax(payload, flat):
    """The header's amax (core.AMAX_OFFSET), the largest |finite element| as float64, written
    on the device."""
    import torch
    if flat.numel():  # (one copy of the tensor: |x|, its NaN and inf zeroed in place)
        magnitudes = flat.abs().nan_to_num_(nan=0.0, posinf=0.0)
        amax = magnitudes.amax().to(torch.float64).reshape(1)
        payload[core.AMAX_OFFSET: core.AMAX_OFFSET + core.AMAX.size].copy_(
            amax.view(torch.uint8))


def _zero_run_found(flat):
    """Whether ``flat`` may hold a run of at least codec.MIN_ZERO_RUN exact zeros (a device
    bool), which the payload must carry as a zero run (core.codec.scan): every such run holds
    an aligned block of MIN_ZERO_RUN / 2 zeros, which is what this looks for, with one bool per
    element of memory. A block inside a shorter run sends the tensor to the core for nothing,
    which makes the same bytes."""
    import torch
    block = core.MIN_ZERO_RUN // 2
    whole = flat.numel() // block * block
    if not core.MIN_ZERO_RUN <= flat.numel() <= core.MAX_RUNS_NUMEL:
        return torch.zeros((), dtype=torch.bool, device=flat.device)
    return (flat[:whole] == 0).view(-1, block).all(dim=1).any()


def _host_encode(flat, **args):
    """The rare paths: core.codec.encode on a host copy, the payload copied back."""
    import torch
    values = flat.float() if flat.dtype == torch.bfloat16 else flat
    payload = core.encode(values.cpu().numpy(), **args)
    return torch.from_numpy(payload).to(flat.device)


def _payload(header, prefix, device):
    import torch
    out = torch.empty(header.total_size, dtype=torch.uint8, device=device)
    out[: len(prefix)] = _device_bytes(prefix, device)
    return out


def _encode_rotated(kernels, flat, header, key, step):
    import torch
    device, n, bucket, bits = flat.device, flat.numel(), header.bucket_size, header.bits
    work_f64 = header.dtype_name == "float64"
    work = torch.float64 if work_f64 else torch.float32
    prefix = header.pack() + core.ROTATION.pack(key & _MASK64, int(step) & _MASK32, 0)
    out = _payload(header, prefix, device)
    if n == 0:
        return out, None
    nb = header.num_buckets
    itemsize = header.scale_dtype.itemsize
    at = len(prefix)
    scales = out[at: at + nb * itemsize].view(work)
    codes = out[at + nb * itemsize:]
    table = _table(device, header.scheme_id, bits, torch.float32)
    rows = _rows(RHT_TILE // bucket, nb, 32 // bucket)
    tiles = -(-nb // rows)
    programs = _max_programs(device, tiles)
    scratch = torch.empty(programs * rows * bucket, dtype=work, device=device)
    norms = torch.empty(nb, dtype=torch.float64, device=device)
    counts = torch.empty(2 * nb, dtype=torch.int32, device=device)
    key_lo, step_word = _stream_words(key, step)
    _launch(kernels.rht_encode_kernel, (programs,), flat, flat, n, nb, tiles, scratch, table,
            scales, codes, norms, counts, key_lo, step_word, math.sqrt(bucket), B=bucket,
            LOG2B=bucket.bit_length() - 1, ROWS=rows, BITS=bits, WORK_F64=work_f64,
            num_warps=_warps(rows * bucket))
    # codec.encode_rotated's conditions for the exponent path, and non-finite elements
    low, high = core.SAFE_NORMS[np.dtype(np.float64 if work_f64 else np.float32)]
    largest = norms.max()
    rare = (counts[:nb].sum() > 0) | ~(largest <= high) | ((largest > 0) & (largest < low)) | \
        ((largest == 0) & (counts[nb:].sum() > 0))
    return out, rare


def _encode_tnq(kernels, flat, header, key, step):
    import torch
    device, n, bits = flat.device, flat.numel(), header.bits
    work_f64 = header.dtype_name == "float64"
    work = torch.float64 if work_f64 else torch.float32
    prefix = header.pack()
    out = _payload(header, prefix, device)
    if n == 0:
        return out, None
    nb = header.num_buckets
    # a single bucket is the whole tensor: its size only matters up to n (and stays an int32)
    bucket = header.bucket_size if nb > 1 else n
    fused = bucket % 8 == 0 or nb == 1
    itemsize = header.scale_dtype.itemsize
    at = len(prefix)
    scales = out[at: at + nb * itemsize].view(work)
    codes = out[at + nb * itemsize:]
    codes_size = packed_size(n, bits)
    table = _table(device, header.scheme_id, bits, torch.float32)
    divisors = scales if fused else torch.empty(nb, dtype=work, device=device)  # unused if fused
    counts = torch.empty(nb, dtype=torch.int32, device=device)
    key_lo, step_word = _stream_words(key, step)
    rows = _rows(TNQ_ROWS if bucket <= 4096 else 16, nb)
    _launch(kernels.tnq_encode_kernel, (-(-nb // rows),), flat, flat, n, bucket, nb, table,
            scales, divisors, codes, codes_size, counts, key_lo, step_word, ROWS=rows,
            BITS=bits, WORK_F64=work_f64, FUSED=fused, num_warps=4)
    if not fused:
        _launch(kernels.tnq_quantize_kernel, (-(-n // TNQ_BLOCK),), flat, flat, n, bucket,
                divisors, table, codes, codes_size, key_lo, step_word, BLOCK=TNQ_BLOCK,
                BITS=bits, WORK_F64=work_f64, num_warps=8)
    return out, counts.sum() > 0


# ---- decode_sum ----

def _valid_expect(expect):
    """Whether ``expect`` is a header the fast path can trust (else the core checks it)."""
    try:
        scheme = core.SCHEMES_BY_ID[expect.scheme_id]
        core.check_scheme_bits(scheme.name, expect.bits)
        if scheme.rotation:
            rotation.check_bucket_size(expect.bucket_size)
    except (KeyError, ValueError, TypeError):
        return False
    return (scheme.name in SCHEMES and expect.dtype_code in core.DTYPE_NAMES
            and expect.bucket_size >= 1 and expect.numel >= 0 and expect.body_size is None
            and expect.bucket_params == scheme.bucket_params
            and expect.num_levels == scheme.levels_sent(expect.bits))


def _fast_layout(buf, expect):
    """(payload size, number of payloads, [(key, step)] for rotated ones, sum of their amax) when
    every payload in ``buf`` is exactly ``expect`` without exceptions (and exponent 0) or zero
    runs, but for its amax; None otherwise."""
    if not _valid_expect(expect):
        return None
    plain = replace(expect, num_exceptions=0, zero_runs=0, zeros=0)
    size = plain.total_size
    if buf.numel() == 0 or buf.numel() % size:
        return None
    count = buf.numel() // size
    head = core.HEADER.size + plain.rotation_size
    heads = buf.view(count, size)[:, :head].cpu().numpy()  # the only read-back of a decode
    fixed = core.AMAX_OFFSET  # the header's bytes before amax
    if not np.array_equal(heads[:, :fixed],
                          np.broadcast_to(np.frombuffer(plain.pack()[:fixed], dtype=np.uint8),
                                          (count, fixed))):
        return None
    amaxes = np.ascontiguousarray(heads[:, fixed: fixed + core.AMAX.size]).view("<f8")
    if not np.all((amaxes >= 0) & np.isfinite(amaxes)):
        return None
    turns = []
    if plain.rotated:
        for row in heads:
            key, step, exponent = core.ROTATION.unpack(row[core.HEADER.size:].tobytes())
            if exponent:
                return None
            turns.append((key, step))
    return size, count, turns, float(amaxes.sum())


def decode_sum(payloads, expect, factor=1.0, out_dtype=None, out=None):
    """core.codec.decode_sum on the GPU: ``factor`` times the float64 sum, in payload order, of
    the payloads laid end to end in ``payloads`` (a uint8 tensor on the device), rounded once to
    ``out_dtype`` (torch.float32, the default, or torch.float64); returns (flat tensor, number of
    payloads). With ``out`` (a contiguous tensor of expect.numel elements of out_dtype on the
    same device) the sum is written there and ``out`` returned. Every payload is checked
    against ``expect`` as the core does (a mismatch raises core.codec.PayloadError)."""
    import torch
    kernels = _kernels()
    if not core.SCHEMES_BY_ID.get(expect.scheme_id) or \
            core.SCHEMES_BY_ID[expect.scheme_id].name not in SCHEMES:
        raise ValueError(f"the GPU codec decodes schemes {SCHEMES}, not scheme id "
                         f"{expect.scheme_id}")
    if out_dtype is None:
        out_dtype = out.dtype if out is not None else torch.float32
    if out_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"decode_sum sums into float32 or float64, not {out_dtype}")
    if not torch.is_tensor(payloads) or payloads.dtype != torch.uint8:
        raise TypeError("payloads must be a uint8 torch tensor")
    _check_device(payloads)
    buf = payloads.reshape(-1)
    if not buf.is_contiguous():
        buf = buf.contiguous()
    device, n = buf.device, expect.numel
    if out is not None and (not torch.is_tensor(out) or out.dtype != out_dtype or
                            out.numel() != n or not out.is_contiguous() or
                            out.device != device):
        raise ValueError(f"out must be a contiguous tensor of {n} {out_dtype} on {device}")
    layout = _fast_layout(buf, expect)
    if layout is None:
        return _host_decode_sum(buf, expect, factor, out_dtype, out)
    size, count, turns, amax_sum = layout
    result = out.view(-1) if out is not None else torch.empty(n, dtype=out_dtype, device=device)
    if n == 0:
        return (result if out is None else out), count
    plain = replace(expect, num_exceptions=0, zero_runs=0, zeros=0)
    nb, bits = plain.num_buckets, plain.bits
    itemsize = plain.scale_dtype.itemsize
    at = core.HEADER.size + plain.rotation_size
    sent = torch.float64 if itemsize == 8 else torch.float32
    # the scale sections, gathered into one aligned (count, nb) array (a payload's sections sit
    # at any byte offset); .contiguous() would keep a single row's stride
    scales = torch.empty((count, nb * itemsize), dtype=torch.uint8, device=device)
    scales.copy_(buf.view(count, size)[:, at: at + nb * itemsize])
    scales = scales.view(sent)
    codes_offset = at + nb * itemsize
    codes_size = plain.section_sizes()[4]
    out_f64 = out_dtype == torch.float64
    if plain.rotated:
        work = torch.float64 if plain.dtype_name == "float64" else torch.float32
        table = _table(device, plain.scheme_id, bits, work)
        keys = torch.tensor([_stream_words(key, step) for key, step in turns],
                            dtype=torch.int64).to(device)
        bucket = plain.bucket_size
        rows = _rows(RHT_DECODE_TILE // bucket, nb, 32 // bucket)
        _launch(kernels.rht_decode_kernel, (-(-nb // rows),), buf, buf, size, codes_offset,
                codes_size, scales, keys, table, result, float(factor), n, nb, count, B=bucket,
                LOG2B=bucket.bit_length() - 1, ROWS=rows, BITS=bits,
                WORK_F64=work == torch.float64, OUT_F64=out_f64,
                num_warps=_warps(2 * rows * bucket))
    else:
        table = _table(device, plain.scheme_id, bits, torch.float64)
        bucket = plain.bucket_size if nb > 1 else n
        _launch(kernels.tnq_decode_kernel, (-(-n // TNQ_BLOCK),), buf, buf, size, codes_offset,
                codes_size, scales.to(torch.float64), table, result, float(factor), n, bucket,
                nb, count, BLOCK=TNQ_BLOCK, BITS=bits, OUT_F64=out_f64, num_warps=8)
    if nb:
        # results beyond the dtype's range settled as core.codec.decode_sum does (these payloads
        # have no exceptions: every infinity is a sum's)
        levels = core.level_table(plain.scheme_id, bits)
        bound = core.value_bound(plain, float(scales.abs().max()), float(np.abs(levels).max()))
        rule = core.overflow_rule(plain.dtype_name, factor, amax_sum, bound * count)
        if rule is not None:
            threshold, value = rule
            result.copy_(torch.where(result.abs() >= threshold, torch.copysign(
                torch.full_like(result, value), result), result))
    return (result if out is None else out), count


def _host_decode_sum(buf, expect, factor, out_dtype, out):
    """The rare paths (module docstring): core.codec.decode_sum on a host copy."""
    import torch
    np_dtype = np.float64 if out_dtype == torch.float64 else np.float32
    total, count = core.decode_sum(buf.cpu().numpy(), expect, factor, out_dtype=np_dtype)
    result = torch.from_numpy(np.ascontiguousarray(total)).to(buf.device)
    if out is None:
        return result, count
    out.view(-1).copy_(result)
    return out, count
