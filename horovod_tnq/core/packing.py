"""Bit packing of b-bit codes (1 <= b <= 8) into exactly ceil(n * b / 8) bytes.

Layout: code i occupies bits [i*b, (i+1)*b) of the output, least significant bit first, i.e. a
little-endian bit stream. Eight codes always fill exactly b bytes, so both directions work on
groups of eight codes held in one 64-bit word, with no per-element loop.
"""

import numpy as np

from .levels import check_bits


def packed_size(n, bits):
    return (int(n) * check_bits(bits) + 7) // 8


def pack_bits(codes, bits):
    """Pack unsigned integer codes (each < 2**bits) into a uint8 array of packed_size bytes."""
    bits = check_bits(bits)
    codes = np.asarray(codes).reshape(-1)
    n = codes.size
    if n and int(codes.max()) >= (1 << bits):
        raise ValueError(f"a code does not fit in {bits} bits (max {int(codes.max())})")
    if bits == 8:
        return codes.astype(np.uint8)
    groups = -(-n // 8)
    words = np.zeros(groups * 8, dtype=np.uint64)
    words[:n] = codes
    words = words.reshape(groups, 8) << (np.arange(8, dtype=np.uint64) * np.uint64(bits))
    # The shifted fields do not overlap, so a sum is their bitwise OR.
    word = words.sum(axis=1, dtype=np.uint64)
    out = word.astype("<u8").view(np.uint8).reshape(groups, 8)[:, :bits]
    return out.reshape(-1)[: packed_size(n, bits)].copy()


def unpack_bits(data, bits, n):
    """Inverse of pack_bits: n codes as uint8 from the first packed_size(n, bits) bytes."""
    bits = check_bits(bits)
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    need = packed_size(n, bits)
    if data.size < need:
        raise ValueError(f"packed data has {data.size} bytes, {need} needed for {n} codes")
    if bits == 8:
        return data[:n].copy()
    groups = -(-n // 8)
    raw = np.zeros((groups, 8), dtype=np.uint8)
    padded = np.zeros(groups * bits, dtype=np.uint8)
    padded[:need] = data[:need]
    raw[:, :bits] = padded.reshape(groups, bits)
    word = raw.view("<u8").reshape(groups, 1)
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    codes = (word >> shifts) & np.uint64((1 << bits) - 1)
    return codes.astype(np.uint8).reshape(-1)[:n]
