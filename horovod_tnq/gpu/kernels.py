"""Triton kernels of the codec's "tnq-rht" and "tnq" schemes: the same payload bytes and the same
decoded sums as the numpy reference (core/codec.py) and the CPU kernel (core/native.c).

Bit-exactness rules every kernel here follows, and why:

* Every floating-point operation is one IEEE operation in the dtype the reference uses:
  float32 divisions go through ``tl.math.div_rn`` (a plain ``/`` on float32 is approximate on
  NVIDIA GPUs), float64 ``/`` and ``tl.sqrt`` are correctly rounded there already, and the host
  launches with ``enable_fp_fusion=False`` so that no multiply-add is contracted into an FMA.
* Sums whose order the reference fixes follow it: the float64 bucket sums of
  quantize.lane_sums (LANES = 16 interleaved partial sums, each adding its elements in order, then
  lane 0 + lane 1 + ... in order) run as a loop over chunks of 16 elements; the lanes are then
  taken out one at a time with a masked sum of one value and zeros (exact whatever order the
  reduction uses). Hadamard butterflies run stage by stage, h = 1, 2, 4, ... (rotation.hadamard);
  each output of a stage is one addition or subtraction, whatever the register layout.
* The random stream (rng.py) is uint32 arithmetic, which wraps in Triton as in numpy and C.
* Codes are found as quantize.stochastic_round does: clip, the last level <= v (binary search on
  the power-of-two table), p = (v - lo) / (hi - lo) in float32, up where noise < p; nearest
  rounding is noise = 0.5.

Tables are 2**bits levels for both schemes, so every code a payload can hold is valid.
"""

import triton
import triton.language as tl

F32_MAX = tl.constexpr(3.4028234663852886e38)
F64_MAX = tl.constexpr(1.7976931348623157e308)
LANES = tl.constexpr(16)  # quantize.LANES


# ---- counter-based random stream (rng.py) ----

@triton.jit
def _lowbias32(x):
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _random_words(index, key_lo, step_word):
    """rng.random_words for uint32 counters ``index``; step_word = lowbias32(step ^ key_hi)."""
    # explicit uint32: a Python int key below 2**31 would arrive as int32 under the interpreter,
    # and int32 shifts are arithmetic
    x = index.to(tl.uint32) * 0x9E3779B9
    x ^= tl.cast(key_lo, tl.uint32)
    x = _lowbias32(x)
    x ^= tl.cast(step_word, tl.uint32)
    return _lowbias32(x)


@triton.jit
def _uniform_noise(index, key_lo, step_word):
    """rng.uniform_noise: the top 24 bits of the word, times 2**-24 (exact in float32)."""
    word = _random_words(index, key_lo, step_word)
    return (word >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def _sign_mask(first_word, key_lo, step_word, ROWS: tl.constexpr, B: tl.constexpr):
    """Which of ROWS * B consecutive elements (from element 32 * first_word) rotation.signs makes
    negative: bit i % 32 of word i // 32. One hash per 32 elements."""
    TILE: tl.constexpr = ROWS * B
    words = _random_words((first_word + tl.arange(0, TILE // 32)).to(tl.uint32), key_lo,
                          step_word)
    bit = (words[:, None] >> tl.arange(0, 32)[None, :].to(tl.uint32)) & 1
    return tl.reshape(bit, (ROWS, B)) != 0


# ---- arithmetic helpers ----

@triton.jit
def _div(a, b, F64: tl.constexpr):
    """a / b correctly rounded in the work dtype."""
    if F64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def _lane_total(part, LW: tl.constexpr):
    """lane 0 + lane 1 + ... + lane LW-1 of each row of part (float64, (rows, LW)), in that
    order: each lane is taken out exactly as a sum of itself and zeros."""
    lanes = tl.arange(0, LW)[None, :]
    total = tl.sum(tl.where(lanes == 0, part, 0.0), axis=1)
    for j in tl.static_range(1, LW):
        total += tl.sum(tl.where(lanes == j, part, 0.0), axis=1)
    return total


@triton.jit
def _hadamard(x, ROWS: tl.constexpr, B: tl.constexpr, LOG2B: tl.constexpr):
    """rotation.hadamard of each row of x ((ROWS, B), B = 2**LOG2B): stage h pairs elements i
    and i + h into (x[i] + x[i + h], x[i] - x[i + h]), h = 1, 2, 4, ..., all in registers."""
    for s in tl.static_range(LOG2B):  # h = 2**s (a constexpr may not be reassigned in a loop)
        y = tl.permute(tl.reshape(x, (ROWS, B >> (s + 1), 2, 1 << s)), (0, 1, 3, 2))
        a, b = tl.split(y)
        y = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
        x = tl.reshape(y, (ROWS, B))
    return x


@triton.jit
def _round(v, noise, table_ptr, BITS: tl.constexpr):
    """quantize.stochastic_round of float32 v onto the float32 table (2**BITS ascending levels):
    int32 codes."""
    SIZE: tl.constexpr = 1 << BITS
    v = tl.minimum(tl.maximum(v, tl.load(table_ptr)), tl.load(table_ptr + (SIZE - 1)))
    # the last level <= v (searchsorted(side="right") - 1): a binary search on 2**BITS levels
    cell = tl.zeros(v.shape, tl.int32)
    for s in tl.static_range(BITS):  # steps SIZE / 2, SIZE / 4, ..., 1
        cell = tl.where(tl.load(table_ptr + (cell + (SIZE >> (s + 1)))) <= v,
                        cell + (SIZE >> (s + 1)), cell)
    cell = tl.minimum(cell, SIZE - 2)
    lo = tl.load(table_ptr + cell)
    hi = tl.load(table_ptr + (cell + 1))
    p = tl.math.div_rn(v - lo, hi - lo)
    return cell + (noise < p).to(tl.int32)


@triton.jit
def _pack_store(codes, out_ptr, group_byte, group_ok, limit, GROUPS: tl.constexpr,
                BITS: tl.constexpr):
    """packing.pack_bits: codes (GROUPS * 8 in element order) as GROUPS groups of eight, group g
    written as BITS bytes from byte group_byte[g] (where group_ok[g] and the byte is < limit)."""
    c = tl.reshape(codes, (GROUPS, 8)).to(tl.uint64)
    j = tl.arange(0, 8)
    # the fields do not overlap, so their sum is their bitwise OR
    word = tl.sum(c << (j * BITS).to(tl.uint64)[None, :], axis=1)
    byte = ((word[:, None] >> (j * 8).to(tl.uint64)[None, :]) & 0xFF).to(tl.uint8)
    address = group_byte[:, None] + j[None, :]
    tl.store(out_ptr + address, byte,
             mask=group_ok[:, None] & (j[None, :] < BITS) & (address < limit))


@triton.jit
def _unpack_load(in_ptr, group_byte, limit, GROUPS: tl.constexpr, BITS: tl.constexpr):
    """packing.unpack_bits: (GROUPS, 8) int32 codes of the groups whose BITS bytes start at
    group_byte (bytes at or past limit read as 0)."""
    j = tl.arange(0, 8)
    address = group_byte[:, None] + j[None, :]
    raw = tl.load(in_ptr + address, mask=(j[None, :] < BITS) & (address < limit), other=0)
    word = tl.sum(raw.to(tl.uint64) << (j * 8).to(tl.uint64)[None, :], axis=1)
    codes = (word[:, None] >> (j * BITS).to(tl.uint64)[None, :]) & ((1 << BITS) - 1)
    return codes.to(tl.int32)


# ---- tnq-rht: encoder.encode_rotated / encoder._encode_rotated ----

@triton.jit(do_not_specialize=["key_lo", "step_word"])
def rht_encode_kernel(x_ptr, n, num_buckets, num_tiles, scratch_ptr, table_ptr, scales_ptr,
                      codes_ptr, norms_ptr, counts_ptr, key_lo: tl.uint32, step_word: tl.uint32,
                      root: tl.float64, B: tl.constexpr, LOG2B: tl.constexpr,
                      ROWS: tl.constexpr, BITS: tl.constexpr, WORK_F64: tl.constexpr):
    """ROWS buckets per tile, tiles pid, pid + programs, ...: zero non-finite elements, flip the
    signs, Hadamard-transform in registers, then two passes over the rotated tile (parked in this
    program's scratch slot, since the lane order needs the elements 16 at a time): the float64
    sum of squares (norms[b]), then per chunk the codes (packed into codes_ptr) and the dot
    <table[code], r>; scales[b] = norm^2 / dot / B (EDEN), 0 where dot <= 0. counts[b] and
    counts[num_buckets + b]: non-finite and finite nonzero inputs of bucket b (the host checks
    them for the rare paths)."""
    TILE: tl.constexpr = ROWS * B
    LW: tl.constexpr = 16 if B >= 16 else B  # narrower buckets: lanes past B are zeros in numpy
    GROUPS: tl.constexpr = ROWS * LW // 8
    BUCKET_BYTES: tl.constexpr = B // 8 * BITS
    if WORK_F64:
        work: tl.constexpr = tl.float64
        big: tl.constexpr = F64_MAX
    else:
        work: tl.constexpr = tl.float32
        big: tl.constexpr = F32_MAX
    pid = tl.program_id(0)
    slot = scratch_ptr + pid.to(tl.int64) * TILE
    rows = tl.arange(0, ROWS)
    elems = tl.arange(0, B)
    lanes = tl.arange(0, LW)
    in_tile = rows[:, None] * B + elems[None, :]
    in_chunk = rows[:, None] * B + lanes[None, :]
    codes_size = num_buckets.to(tl.int64) * BUCKET_BYTES
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        first = tl.cast(tile, tl.int64) * ROWS
        bucket = first + rows
        ok = bucket < num_buckets
        offs = first * B + in_tile
        valid = offs < n
        x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(work)
        finite = tl.abs(x) <= big
        tl.store(counts_ptr + bucket, tl.sum((valid & ~finite).to(tl.int32), axis=1), mask=ok)
        tl.store(counts_ptr + num_buckets + bucket,
                 tl.sum((finite & (x != 0)).to(tl.int32), axis=1), mask=ok)
        x = tl.where(finite, x, 0.0)
        x = tl.where(_sign_mask(first * B // 32, key_lo, step_word, ROWS, B), -x, x)
        r = _hadamard(x, ROWS, B, LOG2B)
        tl.debug_barrier()  # the previous tile's passes have read the slot
        tl.store(slot + in_tile, r)
        tl.debug_barrier()  # the whole tile is in the slot before any thread reads it back
        part = tl.zeros((ROWS, LW), tl.float64)
        for k in range(B // LW):
            chunk = tl.load(slot + k * LW + in_chunk).to(tl.float64)
            part += chunk * chunk
        norm = tl.sqrt(_lane_total(part, LW))
        divisor = tl.where(norm != 0, norm / root, 1.0).to(work)
        part = tl.zeros((ROWS, LW), tl.float64)
        for k in range(B // LW):
            chunk = tl.load(slot + k * LW + in_chunk)
            v = _div(chunk, divisor[:, None], WORK_F64).to(tl.float32)
            codes = _round(v, 0.5, table_ptr, BITS)
            level = tl.load(table_ptr + codes)
            part += level.to(tl.float64) * chunk.to(tl.float64)
            group_byte = bucket[:, None] * BUCKET_BYTES + \
                (k * (LW // 8) + tl.arange(0, LW // 8))[None, :] * BITS
            group_ok = ok[:, None] & (tl.arange(0, LW // 8) >= 0)[None, :]
            _pack_store(codes, codes_ptr, tl.reshape(group_byte, (GROUPS,)),
                        tl.reshape(group_ok, (GROUPS,)), codes_size, GROUPS, BITS)
        dot = _lane_total(part, LW)
        positive = dot > 0
        scale = tl.where(positive, norm * norm / tl.where(positive, dot, 1.0) / B, 0.0)
        tl.store(norms_ptr + bucket, norm, mask=ok)
        if WORK_F64:
            tl.store(scales_ptr + bucket, scale, mask=ok)
        else:
            tl.store(scales_ptr + bucket, scale.to(tl.float32), mask=ok)


@triton.jit
def _rht_values(p, buf_ptr, payload_size, codes_offset, codes_size, scales_ptr, keys_ptr,
                table_ptr, first, bucket, ok, num_buckets, B: tl.constexpr,
                LOG2B: tl.constexpr, ROWS: tl.constexpr, BITS: tl.constexpr,
                WORK_F64: tl.constexpr):
    """decoder._rotated_values of payload p for the tile's ROWS buckets (from bucket ``first``):
    scale * table[code] in the work dtype, Hadamard-transformed, signs flipped."""
    TILE: tl.constexpr = ROWS * B
    base = p * payload_size + codes_offset
    group_byte = base + first * (B // 8 * BITS) + tl.arange(0, TILE // 8).to(tl.int64) * BITS
    codes = tl.reshape(_unpack_load(buf_ptr, group_byte, base + codes_size, TILE // 8, BITS),
                       (ROWS, B))
    scale = tl.load(scales_ptr + p * num_buckets + bucket, mask=ok, other=0.0)
    if WORK_F64:
        v = tl.load(table_ptr + codes) * scale.to(tl.float64)[:, None]
    else:
        v = tl.load(table_ptr + codes) * scale.to(tl.float32)[:, None]
    v = _hadamard(v, ROWS, B, LOG2B)
    key_lo = tl.load(keys_ptr + 2 * p).to(tl.uint32)
    step_word = tl.load(keys_ptr + 2 * p + 1).to(tl.uint32)
    return tl.where(_sign_mask(first * B // 32, key_lo, step_word, ROWS, B), -v, v)


@triton.jit
def rht_decode_kernel(buf_ptr, payload_size, codes_offset, codes_size, scales_ptr, keys_ptr,
                      table_ptr, out_ptr, factor: tl.float64, n, num_buckets, num_payloads,
                      B: tl.constexpr, LOG2B: tl.constexpr, ROWS: tl.constexpr,
                      BITS: tl.constexpr, WORK_F64: tl.constexpr, OUT_F64: tl.constexpr):
    """decoder.decode_sum of num_payloads tnq-rht payloads laid end to end (payload_size bytes
    each) for ROWS buckets: each payload's values in the work dtype, summed in float64 in
    payload order (the first one is the sum's start, as in the reference: no -0 + 0), times
    factor, rounded once to the output dtype. scales: (num_payloads, num_buckets) as sent;
    keys: (key_lo, step_word) per payload; table: the level table in the work dtype."""
    first = tl.program_id(0).to(tl.int64) * ROWS
    rows = tl.arange(0, ROWS)
    bucket = first + rows
    ok = bucket < num_buckets
    acc = _rht_values(0, buf_ptr, payload_size, codes_offset, codes_size, scales_ptr, keys_ptr,
                      table_ptr, first, bucket, ok, num_buckets, B, LOG2B, ROWS, BITS,
                      WORK_F64).to(tl.float64)
    for p in range(1, num_payloads):
        acc += _rht_values(tl.cast(p, tl.int64), buf_ptr, payload_size, codes_offset, codes_size,
                           scales_ptr, keys_ptr, table_ptr, first, bucket, ok, num_buckets, B,
                           LOG2B, ROWS, BITS, WORK_F64).to(tl.float64)
    acc = acc * factor
    offs = first * B + rows[:, None] * B + tl.arange(0, B)[None, :]
    if OUT_F64:
        tl.store(out_ptr + offs, acc, mask=offs < n)
    else:
        tl.store(out_ptr + offs, acc.to(tl.float32), mask=offs < n)


# ---- tnq: encoder.encode_table with the "mean_abs" statistic ----

@triton.jit(do_not_specialize=["key_lo", "step_word"])
def tnq_encode_kernel(x_ptr, n, bucket_size, num_buckets, table_ptr, scales_ptr, divisors_ptr,
                      codes_ptr, codes_size, counts_ptr, key_lo: tl.uint32, step_word: tl.uint32,
                      ROWS: tl.constexpr, BITS: tl.constexpr, WORK_F64: tl.constexpr,
                      FUSED: tl.constexpr):
    """ROWS buckets per program: the float64 mean |x| of each bucket in lane order (non-finite
    elements as 0; counts[b]: how many), stored as the payload's scale; the divisor is that
    stored scale (1 where it is 0) in the work dtype. With FUSED (bucket_size a multiple of 8,
    so that each bucket's codes start on a byte) a second pass over the bucket, still in cache,
    rounds stochastically and packs the codes; otherwise the divisors go to divisors_ptr for
    tnq_quantize_kernel."""
    if WORK_F64:
        work: tl.constexpr = tl.float64
    else:
        work: tl.constexpr = tl.float32
    rows = tl.arange(0, ROWS)
    lanes = tl.arange(0, 16)
    bucket = tl.program_id(0).to(tl.int64) * ROWS + rows
    ok = bucket < num_buckets
    start = bucket * bucket_size
    live = tl.minimum(n - start, bucket_size)
    part = tl.zeros((ROWS, 16), tl.float64)
    bad = tl.zeros((ROWS, 16), tl.int32)
    chunks = tl.cdiv(bucket_size, 16)
    for k in range(chunks):
        e = k * 16 + lanes[None, :]
        m = ok[:, None] & (e < live[:, None])
        a = tl.abs(tl.load(x_ptr + start[:, None] + e, mask=m, other=0.0).to(work))
        a = a.to(tl.float64)
        finite = a <= F64_MAX
        bad += (m & ~finite).to(tl.int32)
        part += tl.where(finite, a, 0.0)
    tl.store(counts_ptr + bucket, tl.sum(bad, axis=1), mask=ok)
    mean = _lane_total(part, 16) / tl.where(ok, live, 1).to(tl.float64)
    if WORK_F64:
        stored = mean
    else:
        stored = mean.to(tl.float32)
    tl.store(scales_ptr + bucket, stored, mask=ok)
    divisor = tl.where(stored != 0, stored, 1.0).to(work)
    if FUSED:
        gcount = tl.arange(0, 2)
        for k in range(chunks):
            e = k * 16 + lanes[None, :]
            m = ok[:, None] & (e < live[:, None])
            x = tl.load(x_ptr + start[:, None] + e, mask=m, other=0.0).to(work)
            x = tl.where(tl.abs(x.to(tl.float64)) <= F64_MAX, x, 0.0)
            v = _div(x, divisor[:, None], WORK_F64).to(tl.float32)
            noise = _uniform_noise((start[:, None] + e).to(tl.uint32), key_lo, step_word)
            codes = tl.where(m, _round(v, noise, table_ptr, BITS), 0)
            group = (start[:, None] + k * 16 + gcount[None, :] * 8) // 8  # (ROWS, 2)
            group_ok = ok[:, None] & (k * 16 + gcount[None, :] * 8 < bucket_size)
            _pack_store(codes, codes_ptr, tl.reshape(group * BITS, (ROWS * 2,)),
                        tl.reshape(group_ok, (ROWS * 2,)), codes_size, ROWS * 2, BITS)
    else:
        tl.store(divisors_ptr + bucket, divisor, mask=ok)


@triton.jit(do_not_specialize=["key_lo", "step_word"])
def tnq_quantize_kernel(x_ptr, n, bucket_size, divisors_ptr, table_ptr, codes_ptr, codes_size,
                        key_lo: tl.uint32, step_word: tl.uint32, BLOCK: tl.constexpr,
                        BITS: tl.constexpr, WORK_F64: tl.constexpr):
    """Stochastic rounding and packing of BLOCK consecutive elements (buckets not a multiple of
    8 elements, whose codes do not start on a byte): the element-wise part of encode_table."""
    if WORK_F64:
        work: tl.constexpr = tl.float64
    else:
        work: tl.constexpr = tl.float32
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(work)
    x = tl.where(tl.abs(x.to(tl.float64)) <= F64_MAX, x, 0.0)
    divisor = tl.load(divisors_ptr + offs // bucket_size, mask=m, other=1.0)
    v = _div(x, divisor, WORK_F64).to(tl.float32)
    noise = _uniform_noise(offs.to(tl.uint32), key_lo, step_word)
    codes = tl.where(m, _round(v, noise, table_ptr, BITS), 0)
    group_byte = (start // 8 + tl.arange(0, BLOCK // 8)) * BITS
    _pack_store(codes, codes_ptr, group_byte, group_byte >= 0, codes_size, BLOCK // 8, BITS)


@triton.jit
def _tnq_values(p, buf_ptr, payload_size, codes_offset, codes_size, scales_ptr, table_ptr,
                start, bucket, m, num_buckets, BLOCK: tl.constexpr, BITS: tl.constexpr):
    """decoder._table_values of payload p for BLOCK elements from ``start``: table[code] * scale in
    float64 (scales: float64, as split() widens them)."""
    base = p * payload_size + codes_offset
    group_byte = base + (start // 8 + tl.arange(0, BLOCK // 8)) * BITS
    codes = tl.reshape(_unpack_load(buf_ptr, group_byte, base + codes_size, BLOCK // 8, BITS),
                       (BLOCK,))
    scale = tl.load(scales_ptr + p * num_buckets + bucket, mask=m, other=0.0)
    return tl.load(table_ptr + codes) * scale


@triton.jit
def tnq_decode_kernel(buf_ptr, payload_size, codes_offset, codes_size, scales_ptr, table_ptr,
                      out_ptr, factor: tl.float64, n, bucket_size, num_buckets, num_payloads,
                      BLOCK: tl.constexpr, BITS: tl.constexpr, OUT_F64: tl.constexpr):
    """decoder.decode_sum of num_payloads tnq payloads for BLOCK elements: float64 sum in payload
    order, times factor, rounded once to the output dtype. table: float64."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    m = offs < n
    bucket = offs // bucket_size
    acc = _tnq_values(0, buf_ptr, payload_size, codes_offset, codes_size, scales_ptr, table_ptr,
                      start, bucket, m, num_buckets, BLOCK, BITS)
    for p in range(1, num_payloads):
        acc += _tnq_values(tl.cast(p, tl.int64), buf_ptr, payload_size, codes_offset, codes_size,
                           scales_ptr, table_ptr, start, bucket, m, num_buckets, BLOCK, BITS)
    acc = acc * factor
    if OUT_F64:
        tl.store(out_ptr + offs, acc, mask=m)
    else:
        tl.store(out_ptr + offs, acc.to(tl.float32), mask=m)
