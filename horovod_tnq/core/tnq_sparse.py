"""Sparse TNQ (scheme ``tnq-sparse``): the K largest entries, on truncated non-uniform levels
fitted to their tail, K and the levels chosen per payload by TNQ's objective under a byte budget.

Why. TNQ (Yan et al., arXiv 2402.01160; levels.py) spends ``bits`` on every element. Real
gradients put most of their energy in few entries (the benchmark's char-LM embedding gradient is
71% exact zeros, and TNQ rounds each zero to +-its smallest level), so at 2 to 4 bits adaptive
Top-K (topk.py), which sends few entries precisely, beats every dense quantizer on them. But
Top-K puts its values on *uniform* levels between the smallest and the largest kept magnitude,
coarse where the kept magnitudes crowd (just above the cut) and wasted in the sparse far tail:
the problem TNQ's non-uniform levels solve. This scheme is TNQ's objective with a sparsification
term: it chooses what to send and how to quantize it by the exact expected error

    E = sum of g_i^2 over the elements left out                          (sparsification)
      + sum over kept magnitudes m_i above alpha of (m_i - alpha)^2      (truncation bias)
      + sum over kept m_i of (m_i - l_j)(l_{j+1} - m_i)                   (rounding variance)

under a byte budget, the one Top-K has: a payload never exceeds ``bits * n / 8`` bytes, header,
indices and values included. So it is compared with every scheme at the same bits per element
(the dense schemes send ``bits`` per element plus their scales).

What is sent: the K largest |g_i| (K = 0..n), their indices Rice-coded as by Top-K (or none at
all when K = n), and per kept element a sign bit and a (q-1)-bit magnitude code on the levels

    l_j = lo + w * u_j,   j = 0 .. L - 1,   L = 2^(q-1),   u_0 = 0 < u_1 < ... < u_{L-1} = 1,

lo the smallest kept magnitude, alpha = lo + w the truncation threshold, u one of the unit
shapes below; stochastic rounding between adjacent levels (unbiased for the truncated value).

The levels: TNQ on the tail. The kept magnitudes are the exceedances of |g| over the cut lo.
By the Pickands-Balkema-de Haan theorem, exceedances over a high threshold are approximately
generalized Pareto: y = m - lo has density p(y) = (1 + xi y / sigma)^(-1/xi - 1) / sigma. Its
shape xi = 0 is the exponential, which is *exactly* TNQ's Laplace model above any cut (a Laplace
tail is memoryless, with the same scale); Student-t(nu) tails have xi = 1/nu. TNQ's argument
(levels.py) carries over unchanged: with S = L - 1 cells on [lo, alpha] at point density lambda,
the rounding variance is at most (1 / (4 S^2)) integral p / lambda^2, smallest for
lambda ~ p^(1/3) ~ (1 + xi y / sigma)^(-k), k = (1 + xi) / (3 xi) (~ e^(-y / (3 sigma)) at
xi = 0). Levels at equal lambda-mass, t = j / S, A = alpha - lo, rho = xi A / sigma:

    u(t) = [(1 + t ((1 + rho)^(1-k) - 1))^(1/(1-k)) - 1] / rho      (k != 1),
    u(t) = ((1 + rho)^t - 1) / rho                                    (k = 1, xi = 1/2),
    u(t) = -ln(1 - t (1 - e^(-beta))) / beta,  beta = A / (3 sigma)   (xi = 0).

The shape depends on xi and on one more number, G = lambda(lo) / lambda(alpha) = (1 + rho)^k
(e^beta at xi = 0): the ratio of the widest cell to the narrowest. G = 1 is uniform (Top-K's
levels).

Closed form at xi = 0 (TNQ for the tail; compare levels.py): the truncation bias is
2 sigma^2 e^(-A/sigma), the variance at most 27 sigma^2 (1 - v)^3 / (4 S^2) with v = e^(-A/(3
sigma)); their sum is smallest at v = c' / (S + c'), c' = 3 sqrt(6) / 4 (2 c'^3 = 27 c' / 4):

    alpha* = lo + 3 sigma ln(1 + S / c'),   G* = 1 + S / c',   E <= 27 sigma^2 / (4 (S + c')^2)

per kept element (TNQ's two-sided 27 gamma^2 / (s + c)^2 with c = 3 sqrt(6) / 2, one-sided).
For xi > 0 the integrals have no such closed form, and for xi >= 1/2 the tail has no variance,
so moment estimates of (xi, sigma) are useless exactly where truncation matters most. So, as
``tnq-fit`` fits TNQ's threshold, the shape and the threshold are *fitted* by the exact error E
on the payload's own values, over a fixed grid: xi in {0, 1/4, 1/2, 1} times G in {4, 16, ...,
4096}, plus uniform (``SHAPES``: 25 shapes), and alpha = hi 2^(-a/2), a = 0..5, hi the largest
kept magnitude (``THRESHOLDS``; w = max(alpha - lo, 0)). The grid holds the xi = 0 closed form's
shape within a factor 2 in G for every q. Measured on the benchmark's sources (quality.py) at 2
to 4 bits, the fitted xi is 1/4 on Student-t(3) and 1/2 on Student-t(2) data, as the theory
says, and 0 on Laplace data at 2 and 4 bits (at 3 bits a near-uniform xi = 1/4 shape, G = 4,
edges it out); real gradients take 0 to 1/2.

K and q, as Top-K chooses them (topk.py): for each value width q = 2..8 the largest K that fits
the budget wherever the kept elements are (``topk.max_k``) and every n / 2^j below it, taken
for this budget and every smaller one (so a larger budget's candidates contain a smaller one's:
more budget never gives a larger E), plus K = n, sent dense with no indices at all, at the widths
where that fits. (It cannot fit at q = bits: the codes alone fill the budget, and the header
does not fit beside them. So unlike the dense schemes, this scheme never spends more than
``bits`` per element.) Zeros are never sent (K is capped at the number of nonzero elements)
except in a dense payload, where lo = 0 is a level, so a zero is coded exactly.

Exact and cheap: with the magnitudes sorted once and their prefix sums P1 = sum m, P2 = sum m^2,
the error of a cell [a, b] holding the sorted run m_i .. m_{i'-1} is
(a + b)(P1[i'] - P1[i]) - a b (i' - i) - (P2[i'] - P2[i]), so a whole table costs L binary
searches, whatever K is. A candidate's E is at least the energy it leaves out, so once the
largest K of each width has been evaluated, the candidates leaving out more than the smallest E
so far are skipped (they cannot be chosen); what remains is a few (K, q) times 150 tables. On
one core the numpy encoder takes about as long as Top-K's (1M elements: 170 to 210 ms, Top-K
180 to 280 ms; 16k elements: 5 ms, Top-K 3 ms; benchmarks/cpu_speed.py).

The scheme is biased (what is left out and what is truncated), so the compressors turn error
feedback on by default for it, as for Top-K.

Body layout (after the payload header and non-finite exceptions, little-endian): as Top-K's,
with a shape index in a reserved byte and the width of the level grid where Top-K has hi:

    offset size  field
    0      8     K, number of kept elements (K = n: every element, no index sections)
    8      8     length in bits of the unary stream (0 when K = n)
    16     1     q, bits per kept value (sign + q - 1 magnitude bits)
    17     1     r, Rice parameter of the index gaps
    18     1     shape, index into SHAPES
    19     5     reserved, 0
    24     8     lo, smallest kept magnitude (float64)
    32     8     w, alpha - lo (float64)
    40     ...   index sections as Top-K's (gap remainders, unary quotients), none when K = n
           ...   values: K codes of q bits, bit-packed; the top bit is the sign
"""

import functools
import struct

import numpy as np

from . import topk
from .payload import PayloadError
from .packing import pack_bits, unpack_bits
from .rng import uniform_noise
from .schemes import Body, Scheme

PREFIX = struct.Struct("<QQBBB5xdd")
# The same size as Top-K's prefix, so Top-K's budget arithmetic (max_k, candidates) holds as is.
assert PREFIX.size == topk.PREFIX.size
VALUE_BITS = topk.VALUE_BITS
packed_bytes = topk.packed_bytes

TAIL_SHAPES = (0.0, 0.25, 0.5, 1.0)  # xi of the generalized Pareto tail
GAP_RATIOS = tuple(4.0 ** j for j in range(1, 7))  # G, widest cell over narrowest
SHAPES = ((0.0, 1.0),) + tuple((xi, g) for xi in TAIL_SHAPES for g in GAP_RATIOS)
THRESHOLDS = tuple(2.0 ** (-a / 2) for a in range(6))  # alpha / hi


def check_bits(bits):
    topk.check_bits(bits)


def unit_levels(levels, xi, gap):
    """u_0 = 0 .. u_{levels-1} = 1: equal masses of lambda ~ (1 + rho u)^(-k) on [0, 1] with
    lambda(0) / lambda(1) = gap (module docstring), float64."""
    t = np.arange(levels) / (levels - 1)
    if gap == 1.0:
        u = t
    elif xi == 0.0:
        u = -np.log1p(-t * (1.0 - 1.0 / gap)) / np.log(gap)
    else:
        k = (1.0 + xi) / (3.0 * xi)
        base = gap ** (1.0 / k)  # 1 + rho
        if k == 1.0:
            u = (base ** t - 1.0) / (base - 1.0)
        else:
            u = ((1.0 + t * (base ** (1.0 - k) - 1.0)) ** (1.0 / (1.0 - k)) - 1.0) / (base - 1.0)
    u[0], u[-1] = 0.0, 1.0
    return u


@functools.lru_cache(maxsize=None)
def unit_tables(q):
    """The unit shapes for q-bit values, one row per entry of SHAPES (float64 holding float32
    values, so every machine's libm gives the same table)."""
    rows = [unit_levels(1 << (q - 1), xi, gap) for xi, gap in SHAPES]
    return np.array(rows).astype(np.float32).astype(np.float64)


def levels(lo, width, q, shape):
    """The magnitude levels l_j = lo + w u_j a payload's values are rounded onto."""
    return lo + width * unit_tables(q)[shape]


@functools.lru_cache(maxsize=4096)
def candidates(n, bits):
    """((q, (K, ...)), ...): for each value width, the K compared, in the order compared. Top-K's
    candidates at this budget and at every smaller one, largest first, then K = n (sent with no
    indices) where that fits."""
    budget = topk.budget_bytes(n, bits)
    table = []
    for q in VALUE_BITS:
        ks = {k for b in range(1, bits + 1) for k, width in topk.candidates(n, b)
              if width == q and k > 0}
        ks.discard(n)  # K = n is the dense payload, below
        ks = sorted(ks, reverse=True)
        if topk.FIXED_BYTES + packed_bytes(n, q) <= budget:
            ks.append(n)
        table.append((q, tuple(ks)))
    return tuple(table)


def prefix_sums(ascending):
    """P1, P2: running sums of the magnitudes and their squares, with a leading 0 (in order)."""
    zero = np.zeros(1)
    return (np.concatenate([zero, np.cumsum(ascending)]),
            np.concatenate([zero, np.cumsum(ascending * ascending)]))


def table_errors(ascending, p1, p2, starts, tables):
    """Truncation bias + rounding variance of the kept magnitudes ascending[start:] on each
    table: ``starts`` (C,), ``tables`` (C, T, L), ascending levels from ascending[start]; (C, T)."""
    n = ascending.size
    at = np.maximum(np.searchsorted(ascending, tables, side="left"),
                    starts[:, None, None])
    below, above = tables[..., :-1], tables[..., 1:]
    first, last = at[..., :-1], at[..., 1:]
    cells = (below + above) * (p1[last] - p1[first]) - below * above * (last - first) \
        - (p2[last] - p2[first])
    variance = np.cumsum(cells, axis=-1)[..., -1]
    top, alpha = at[..., -1], tables[..., -1]
    bias = (p2[n] - p2[top]) - 2.0 * alpha * (p1[n] - p1[top]) + alpha * alpha * (n - top)
    return np.maximum(variance + bias, 0.0)


def widths(lo, hi):
    """w = max(alpha - lo, 0) for each threshold alpha = hi * THRESHOLDS[a]: (C, A)."""
    return np.maximum(hi * np.array(THRESHOLDS)[None, :] - lo[:, None], 0.0)


def candidate_errors(ascending, p1, p2, q, ks):
    """(E of every (K, table) for these K at width q: (len(ks), tables), the widths w:
    (len(ks), thresholds)); tables in SHAPES-major, THRESHOLDS-minor order."""
    n = ascending.size
    starts = n - ks
    lo, hi = ascending[starts], ascending[n - 1]
    w = widths(lo, hi)
    tables = lo[:, None, None, None] + w[:, None, :, None] * unit_tables(q)[None, :, None, :]
    error = table_errors(ascending, p1, p2, starts, tables.reshape(ks.size, -1, 1 << (q - 1)))
    return error + p2[starts][:, None], w


def choose(ascending, n, bits):
    """(K, q, shape, w) with the smallest exact expected error E (module docstring) among the
    candidates, the first on ties; ``ascending`` holds |g| sorted ascending, float64."""
    p1, p2 = prefix_sums(ascending)
    nonzero = int(np.count_nonzero(ascending))
    blocks = []
    for q, ks in candidates(n, bits):
        ks = np.array([k if k == n else min(k, nonzero) for k in ks], dtype=np.int64)
        ks = ks[ks > 0]
        ks = ks[np.sort(np.unique(ks, return_index=True)[1])]  # a repeat never comes first
        if ks.size:
            blocks.append((q, ks))
    # A candidate's E is at least the energy it leaves out, p2[n - K]; those leaving out more
    # than the E of some candidate cannot be the first smallest: skip them. The largest K of
    # each width sets that bound.
    bound = min([p2[n]] + [float(candidate_errors(ascending, p1, p2, q, ks[:1])[0].min())
                           for q, ks in blocks])
    errors, found = [np.array([p2[n]])], []  # the first candidate: send nothing
    for q, ks in blocks:
        ks = ks[p2[n - ks] <= bound]
        if ks.size:
            error, w = candidate_errors(ascending, p1, p2, q, ks)
            errors.append(error.reshape(-1))
            found.append((q, ks, w))
    best = int(np.argmin(np.concatenate(errors))) - 1
    if best < 0:
        return 0, VALUE_BITS[0], 0, 0.0
    per_k = len(SHAPES) * len(THRESHOLDS)
    for q, ks, w in found:
        if best < ks.size * per_k:
            candidate, table = divmod(best, per_k)
            shape, threshold = divmod(table, len(THRESHOLDS))
            return int(ks[candidate]), q, shape, float(w[candidate, threshold])
        best -= ks.size * per_k
    raise AssertionError("unreachable")


def round_magnitudes(kept, table, noise):
    """Codes (indices into ``table``) of the kept magnitudes: truncated to table[-1], then
    rounded up with probability (m - l_j) / (l_{j+1} - l_j)."""
    cell = np.clip(np.searchsorted(table, kept, side="right") - 1, 0, table.size - 2)
    below, above = table[cell], table[cell + 1]
    spread = above - below
    up = noise < (np.minimum(kept, table[-1]) - below) / np.where(spread > 0, spread, 1.0)
    return (cell + (up & (spread > 0))).astype(np.uint8)


def encode(flat, *, bits, key, step, **_options):
    """The body for finite ``flat`` (float32 or float64)."""
    n = flat.size
    magnitudes, order = topk.largest_first(flat)
    k, q, shape, width = choose(magnitudes[order[::-1]], n, bits) if n else (0, 2, 0, 0.0)
    if k == n:
        indices = np.arange(n)
        r, sections, length = 0, [], 0
    else:
        indices = np.sort(order[:k])
        r, remainders, unary, length = topk.index_section(indices)
        sections = [remainders, unary]
    kept = magnitudes[indices]
    lo = float(kept.min()) if k else 0.0
    codes = np.zeros(k, dtype=np.uint8)
    if k:
        noise = uniform_noise(n, key, step)[indices].astype(np.float64)
        codes = round_magnitudes(kept, levels(lo, width, q, shape), noise)
    codes |= (flat[indices] < 0).astype(np.uint8) << np.uint8(q - 1)
    prefix = np.frombuffer(PREFIX.pack(k, length, q, r, shape, lo, width), dtype=np.uint8)
    return np.concatenate([prefix] + sections + [pack_bits(codes, q) if k else
                                                 np.zeros(0, np.uint8)])


def _read_prefix(buf, at, n):
    if len(buf) - at < PREFIX.size:
        raise PayloadError(f"truncated payload: the tnq-sparse body at offset {at} has "
                           f"{len(buf) - at} bytes, its prefix needs {PREFIX.size}")
    k, length, q, r, shape, lo, width = PREFIX.unpack_from(buf, at)
    dense = k == n
    if k > n or q not in VALUE_BITS or r not in topk.RICE_WIDTHS or shape >= len(SHAPES) or \
            not (lo >= 0.0 and width >= 0.0 and np.isfinite(lo + width)) or \
            (length != 0 if dense else not k <= length <= k + n):
        raise PayloadError(f"invalid tnq-sparse payload prefix (K={k}, q={q}, r={r}, shape "
                           f"{shape}, unary length {length}, lo={lo}, w={width}) for {n} "
                           "elements")
    return k, length, q, r, shape, lo, width


def size(buf, at, header):
    """Bytes of the body that starts at ``at`` in ``buf``, from its prefix."""
    k, length, q, r, _, _, _ = _read_prefix(buf, at, header.numel)
    return PREFIX.size + topk.index_section_size(k, length, r) + packed_bytes(k, q)


def decode(body, header):
    """Dense float64 values of one payload body (zeros where nothing was sent)."""
    n = header.numel
    k, length, q, r, shape, lo, width = _read_prefix(body, 0, n)
    if k == n:
        indices, at = np.arange(n), PREFIX.size
    else:
        indices, at = topk.read_index_section(body, PREFIX.size, k, length, r, n)
    values = np.zeros(n, dtype=np.float64)
    if k:
        codes = unpack_bits(body[at: at + packed_bytes(k, q)], q, k)
        sign_bit = np.uint8(1 << (q - 1))
        magnitude = levels(lo, width, q, shape)[codes & (sign_bit - 1)]
        values[indices] = np.where(codes & sign_bit, -magnitude, magnitude)
    return values


def max_size(numel, bits, **_options):
    """Upper bound on a payload's bytes (exceptions excluded), as Top-K's."""
    return topk.max_size(numel, bits)


SCHEME = Scheme("tnq-sparse", 23, None, "", "TNQ's objective with a sparsification term: the K "
                "largest entries on truncated non-uniform levels fitted to their tail (this "
                "project; Yan et al. arXiv 2402.01160, Ruan et al. arXiv 2210.13532)",
                body=Body(check_bits, encode, size, decode, max_size), error_feedback_default=1.0)
