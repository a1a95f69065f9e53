"""Adaptive Top-K sparsification: K chosen per step, sent as Rice-coded indices + quantized values.

Ruan, Yan, Xiao, Song and Xu ("Adaptive Top-K in SGD for Communication-Efficient Distributed
Learning", arXiv 2210.13532) bound the convergence error of Top-K SGD by a sum over steps of
the sparsification error E||C(g_t) - g_t||^2 (weighted by how much of it survives to the end of
training), and choose the degree of sparsification of every step by minimising that bound under
a communication constraint. This module does the same at the level of one payload, counting
every byte that goes on the wire:

* the budget is the scheme's ``bits``: a payload (40-byte header, this body, indices, values)
  never exceeds ``bits * n / 8`` bytes, so "bits per element sent" is at most ``bits``;
* the per-step term of the bound is the *exact* expected error of the payload,

      E(K, q) = sum of g_i^2 over the elements left out
              + sum over the K kept elements of (m_i - l_j)(l_{j+1} - m_i),

  the first part the sparsification error, the second the variance of stochastic rounding the
  kept magnitudes m_i onto 2^(q-1) uniform levels l_j between the smallest and the largest kept
  magnitude (one more bit carries the sign);
* for each value width q = 2..8 the budget fixes the largest K that fits whatever the positions
  of the kept elements (``max_k``); sending fewer can still be better (the levels span the kept
  magnitudes, so a tiny smallest one coarsens them all), so the candidates are that K and every
  K = n / 2^j below it (``candidates``). The step sends the candidate with the smallest
  E(K, q). A gradient whose energy sits in few entries gets a small K with precise values, a
  flat one a large K with coarse values, so K changes from step to step with the gradient. The
  grid n / 2^j is the same for every budget, so a larger budget never gives a larger error.

What this does not do: the paper also moves budget *between* steps (its communication
constraint is over the whole run). Here every step has the same byte budget; the adaptivity is
in how each step spends it. (The paper's full text was not available to this project; the rule
follows its stated problem, with the bound's per-step term written exactly for this payload.)

Top-K is biased: what is left out is lost unless error feedback puts it back, and Top-K without
it is known to train poorly (Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS
2018). The compressors therefore turn error feedback on by default for this scheme.

Body layout (after the payload header and non-finite exceptions, little-endian):

    offset size  field
    0      8     K, number of kept elements
    8      8     length in bits of the unary stream
    16     1     q, bits per kept value (sign + q - 1 magnitude bits)
    17     1     r, Rice parameter of the index gaps
    18     6     reserved, 0
    24     8     lo, smallest kept magnitude (float64)
    32     8     hi, largest kept magnitude (float64)
    40     ...   gap remainders: K codes of r bits, bit-packed (none when r = 0)
           ...   gap quotients in unary (q ones then a zero per index), packed LSB first
           ...   values: K codes of q bits, bit-packed; the top bit is the sign

Indices are coded as gaps between consecutive kept indices (gap = index - previous - 1), each
split Rice-style into r low bits and a unary quotient; r is the one giving the fewest bytes for
this payload. With r = 0 the unary stream is a bitmap of the kept positions, so dense payloads
cost at most one bit per element for their indices, sparse ones about log2(n / K) + 2.
"""

import functools
import struct

import numpy as np

from . import levels
from .payload import HEADER, PayloadError
from .packing import pack_bits, unpack_bits
from .rng import uniform_noise
from .schemes import Body, Scheme

PREFIX = struct.Struct("<QQBB6xdd")
FIXED_BYTES = HEADER.size + PREFIX.size
VALUE_BITS = tuple(range(2, 9))
RICE_WIDTHS = tuple(range(0, 9))


def packed_bytes(count, width):
    """Bytes holding ``count`` codes of ``width`` bits, bit-packed."""
    return (int(count) * int(width) + 7) // 8


def worst_case_bytes(n, k, q, r):
    """Payload bytes (header included, exceptions excluded) for k kept values of q bits out of n,
    Rice parameter r, whatever the kept positions are: the gaps of k sorted indices in [0, n) sum
    to at most n - k, so their quotients sum to at most (n - k) >> r."""
    if k == 0:
        return FIXED_BYTES
    return FIXED_BYTES + packed_bytes(k, r) + packed_bytes(k + ((n - k) >> r), 1) + \
        packed_bytes(k, q)


def budget_bytes(n, bits):
    return int(n) * int(bits) // 8


@functools.lru_cache(maxsize=4096)
def max_k(n, bits, q):
    """The largest K whose payload fits the budget at value width q, for the best Rice r."""
    budget = budget_bytes(n, bits)
    best = 0
    for r in RICE_WIDTHS:
        lo, hi = 0, int(n)  # worst_case_bytes grows with k: bisect for the last k that fits
        if worst_case_bytes(n, 1, q, r) > budget:
            continue
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if worst_case_bytes(n, mid, q, r) <= budget:
                lo = mid
            else:
                hi = mid - 1
        best = max(best, lo)
    return best


@functools.lru_cache(maxsize=4096)
def candidates(n, bits):
    """The (K, q) pairs the choice compares, in the order it compares them (q ascending, K
    descending): for each width the largest K that fits, then every n >> j below it."""
    pairs = []
    for q in VALUE_BITS:
        largest = max_k(n, bits, q)
        pairs.append((largest, q))
        pairs.extend((n >> j, q) for j in range(n.bit_length()) if 0 < n >> j < largest)
    return tuple(pairs)


def check_bits(bits):
    """Any budget from 1 to 8 bits per element (a budget below the fixed 72 bytes sends K=0)."""
    levels.check_bits(bits)


def rounding_variance(kept, q):
    """Sum over ``kept`` magnitudes (float64, descending) of the stochastic-rounding variance on
    2^(q-1) uniform levels from kept[-1] to kept[0]."""
    if kept.size == 0:
        return 0.0
    lo, hi = float(kept[-1]), float(kept[0])
    steps = (1 << (q - 1)) - 1
    if hi == lo:
        return 0.0
    cell, below, above = _cells(kept, lo, hi, steps)
    return float(np.sum((kept - below) * (above - kept)))


def _cells(magnitudes, lo, hi, steps):
    """Cell index of each magnitude on the level grid lo + j (hi - lo) / steps, and the levels
    below and above it. The decoder rebuilds levels with the same formula (``_level``)."""
    width = (hi - lo) / steps
    cell = np.clip(np.floor((magnitudes - lo) / width), 0, steps - 1)
    return cell, _level(lo, hi, steps, cell), _level(lo, hi, steps, cell + 1)


def _level(lo, hi, steps, j):
    return lo + j * ((hi - lo) / steps)


def choose(magnitudes_sorted, n, bits):
    """(K, q) minimising the expected error E(K, q) within the byte budget (module docstring).
    ``magnitudes_sorted`` holds |g| in descending order, float64."""
    # running sums, accumulated in order
    energy = np.cumsum(magnitudes_sorted * magnitudes_sorted)
    total = float(energy[-1]) if energy.size else 0.0
    nonzero = int(np.count_nonzero(magnitudes_sorted))
    best = None
    for k, q in candidates(n, bits):
        k = min(k, nonzero)  # zeros cost bytes and remove no error
        kept = magnitudes_sorted[:k]
        error = total - (float(energy[k - 1]) if k else 0.0) + rounding_variance(kept, q)
        if best is None or error < best[0]:
            best = (error, k, q)
    return best[1], best[2]


def rice_parameter(gaps):
    """The r in RICE_WIDTHS giving the fewest bytes for these gaps (the first on ties)."""
    k = gaps.size
    costs = [packed_bytes(k, r) + packed_bytes(k + int(np.sum(gaps >> r)), 1) for r in RICE_WIDTHS]
    return RICE_WIDTHS[int(np.argmin(costs))]


def encode_indices(indices, r):
    """(remainder bytes, unary bytes, unary length in bits) for sorted indices."""
    gaps = np.diff(indices, prepend=-1) - 1
    quotients = gaps >> r
    length = int(quotients.sum()) + indices.size
    stream = np.ones(length, dtype=np.uint8)
    stream[np.cumsum(quotients + 1) - 1] = 0
    remainders = pack_bits(gaps & ((1 << r) - 1), r) if r and indices.size else \
        np.zeros(0, np.uint8)
    return remainders, np.packbits(stream, bitorder="little"), length


def decode_indices(remainders, unary, length, k, r, n):
    stream = np.unpackbits(unary, count=length, bitorder="little")
    ends = np.flatnonzero(stream == 0)
    if ends.size != k or (length and stream[-1] != 0):
        raise PayloadError(f"top-k payload: the index stream holds {ends.size} indices, the "
                           f"payload says {k}")
    quotients = np.diff(ends, prepend=-1) - 1
    gaps = quotients.astype(np.int64) << r
    if r:
        gaps |= unpack_bits(remainders, r, k).astype(np.int64)
    indices = np.cumsum(gaps + 1) - 1
    if k and indices[-1] >= n:
        raise PayloadError(f"top-k payload: index {int(indices[-1])} out of range for {n} "
                           "elements")
    return indices


def largest_first(flat):
    """(|flat| as float64, the indices ordered by decreasing magnitude; ties: lower index first,
    as tf.argsort's stable sort)."""
    magnitudes = np.abs(flat).astype(np.float64)
    return magnitudes, np.argsort(-magnitudes, kind="stable")


def index_section(indices):
    """(r, remainder bytes, unary bytes, unary length in bits) coding sorted ``indices`` with
    the cheapest Rice parameter."""
    gaps = np.diff(indices, prepend=-1) - 1
    r = rice_parameter(gaps) if indices.size else 0
    return (r,) + encode_indices(indices, r)


def index_section_size(k, length, r):
    return packed_bytes(k, r) + packed_bytes(length, 1)


def read_index_section(body, at, k, length, r, n):
    """(the k sorted indices coded at offset ``at`` of ``body``, offset just past them)."""
    remainders = body[at: at + packed_bytes(k, r)]
    at += packed_bytes(k, r)
    unary = body[at: at + packed_bytes(length, 1)]
    at += packed_bytes(length, 1)
    return decode_indices(remainders, unary, length, k, r, n), at


def encode(flat, *, bits, key, step, **_options):
    """The body for finite ``flat`` (float32 or float64)."""
    n = flat.size
    magnitudes, order = largest_first(flat)
    k, q = choose(magnitudes[order], n, bits)
    indices = np.sort(order[:k])
    r, remainders, unary, length = index_section(indices)

    kept = magnitudes[indices]
    lo, hi = (float(kept.min()), float(kept.max())) if k else (0.0, 0.0)
    steps = (1 << (q - 1)) - 1
    codes = np.zeros(k, dtype=np.uint8)
    if k and hi > lo:
        cell, below, above = _cells(kept, lo, hi, steps)
        up = uniform_noise(n, key, step)[indices].astype(np.float64) < \
            (kept - below) / (above - below)
        codes = (cell + up).astype(np.uint8)
    codes |= (flat[indices] < 0).astype(np.uint8) << np.uint8(q - 1)
    prefix = np.frombuffer(PREFIX.pack(k, length, q, r, lo, hi), dtype=np.uint8)
    return np.concatenate([prefix, remainders, unary, pack_bits(codes, q) if k else
                           np.zeros(0, np.uint8)])


def _read_prefix(buf, at):
    if len(buf) - at < PREFIX.size:
        raise PayloadError(f"truncated payload: the top-k body at offset {at} has "
                           f"{len(buf) - at} bytes, its prefix needs {PREFIX.size}")
    k, length, q, r, lo, hi = PREFIX.unpack_from(buf, at)
    return k, length, q, r, lo, hi


def size(buf, at, header):
    """Bytes of the body that starts at ``at`` in ``buf``, from its prefix."""
    k, length, q, r, lo, hi = _read_prefix(buf, at)
    if k > header.numel or q not in VALUE_BITS or r not in RICE_WIDTHS or \
            length < k or length > k + header.numel or not 0 <= lo <= hi:
        raise PayloadError(f"invalid top-k payload prefix (K={k}, q={q}, r={r}, unary length "
                           f"{length}, lo={lo}, hi={hi}) for {header.numel} elements")
    return PREFIX.size + index_section_size(k, length, r) + packed_bytes(k, q)


def decode(body, header):
    """Dense float64 values of one payload body (zeros where nothing was sent)."""
    n = header.numel
    k, length, q, r, lo, hi = _read_prefix(body, 0)
    indices, at = read_index_section(body, PREFIX.size, k, length, r, n)
    values = np.zeros(n, dtype=np.float64)
    if k:
        codes = unpack_bits(body[at: at + packed_bytes(k, q)], q, k)
        sign_bit = np.uint8(1 << (q - 1))
        magnitude = _level(lo, hi, (1 << (q - 1)) - 1, (codes & (sign_bit - 1)).astype(np.float64))
        values[indices] = np.where(codes & sign_bit, -magnitude, magnitude)
    return values


def max_size(numel, bits, **_options):
    """Upper bound on a payload's bytes (exceptions excluded): the budget, or the fixed part when
    the budget cannot hold even that."""
    return max(budget_bytes(numel, bits), FIXED_BYTES)


SCHEME = Scheme("topk", 20, None, "", "Ruan, Yan, Xiao, Song, Xu, Adaptive Top-K in SGD, "
                "arXiv 2210.13532", body=Body(check_bits, encode, size, decode, max_size),
                error_feedback_default=1.0)  # what it leaves out must come back later
