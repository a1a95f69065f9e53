"""Truncation thresholds and quantization levels in closed form.

All level tables here are for a unit scale: a bucket with scale ``gamma`` uses ``gamma * table``.
A table for ``bits`` has ``2**bits`` entries, sorted ascending and symmetric about zero, so a code
is an index into it and there is no separate sign bit; ``s = 2**bits - 1`` is the number of cells.

TNQ (Yan et al., "Truncated Non-uniform Quantization for Distributed SGD", arXiv 2402.01160)
models gradient elements as Laplace with scale gamma and minimises truncation bias plus
stochastic-rounding variance under the bit budget. Re-deriving its closed form (see
shared notes ALGORITHMS.md, which reproduces the paper's E_TQ = 27 d gamma^2 / (N (s + c)^2)):

* point density of levels  lambda(x) ~ p(x)^(1/3) ~ exp(-|x| / (3 gamma)),
* threshold                 alpha* = 3 gamma ln(1 + s / c),   c = 3 sqrt(6) / 2,
* level at fraction t of the way out from 0 (equal lambda-mass per cell):
                            x(t) = -3 gamma ln(1 - t s / (s + c)).
"""

import math

import numpy as np

from .lloyd_max_tables import POSITIVE_LEVELS

LAPLACE_C = 3.0 * math.sqrt(6.0) / 2.0

MIN_BITS = 1
MAX_BITS = 8


def check_bits(bits):
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    return int(bits)


def num_cells(bits):
    return (1 << check_bits(bits)) - 1


def laplace_truncation_threshold(bits):
    """alpha* / gamma for TNQ's non-uniform levels."""
    s = num_cells(bits)
    return 3.0 * math.log1p(s / LAPLACE_C)


def tnq_levels(bits):
    """TNQ's non-uniform level table (unit Laplace scale), float32, 2**bits entries."""
    s = num_cells(bits)
    half = 1 << (bits - 1)
    # With an odd number of cells the middle cell straddles zero, so positive levels sit at odd
    # multiples of 1/s of the lambda-mass on [0, alpha*]; the last one is alpha* itself.
    t = (2.0 * np.arange(half) + 1.0) / s
    positive = -3.0 * np.log1p(-t * s / (s + LAPLACE_C))
    return _symmetric(positive)


def lambert_w(z):
    """Principal branch of Lambert's W for z >= 0 (w e^w = z), by Newton's method."""
    if z < 0:
        raise ValueError("lambert_w needs z >= 0")
    w = math.log1p(z) if z < math.e else math.log(z) - math.log(math.log(z))
    for _ in range(100):
        ew = math.exp(w)
        step = (w * ew - z) / (ew * (w + 1.0))
        w -= step
        if abs(step) <= 1e-15 * max(1.0, abs(w)):
            break
    return w


def uniform_truncation_threshold(bits):
    """alpha* / gamma for truncated *uniform* levels under the same Laplace model.

    With s equal cells on [-alpha, alpha] the rounding variance is at most (2 alpha / s)^2 / 4 and
    the truncation bias is 2 gamma^2 exp(-alpha / gamma); setting the derivative of their sum to
    zero gives (alpha / gamma) exp(alpha / gamma) = s^2, i.e. alpha* = gamma W(s^2).
    """
    s = num_cells(bits)
    return lambert_w(float(s * s))


def uniform_levels(bits):
    """Truncated uniform level table (unit Laplace scale): the baseline TNQ's levels must beat."""
    s = num_cells(bits)
    alpha = uniform_truncation_threshold(bits)
    return (-alpha + 2.0 * alpha * np.arange(s + 1) / s).astype(np.float32)


def _symmetric(positive):
    positive = np.asarray(positive, dtype=np.float64)
    return np.concatenate([-positive[::-1], positive]).astype(np.float32)


def laplace_error_bound(bits):
    """Upper bound on E[(Q(x) - x)^2] / gamma^2 per element for Laplace data: 27 / (s + c)^2."""
    s = num_cells(bits)
    return 27.0 / (s + LAPLACE_C) ** 2


# Baselines TNQ is compared with. Their tables are for the bucket statistic named in schemes.SCHEMES
# (L2 norm or max |x|); a table may use fewer than 2**bits codes.

def qsgd_levels(bits):
    """QSGD (Alistarh et al., NeurIPS 2017): sign and s = 2**(bits-1) - 1 uniform magnitude
    levels {0, 1/s, ..., 1} of |v_i| / scale, i.e. 2s + 1 symmetric levels including zero."""
    s = (1 << (check_bits(bits) - 1)) - 1
    if s < 1:
        raise ValueError("QSGD needs at least 2 bits (a sign and one magnitude level)")
    return (np.arange(-s, s + 1) / s).astype(np.float32)


def nuqsgd_levels(bits):
    """NUQSGD (Ramezani-Kebrya et al.): magnitudes {0, 2^-(s-1), ..., 1/4, 1/2, 1}, s nonzero
    ones for s = 2**(bits-1) - 1, and their negatives."""
    s = (1 << (check_bits(bits) - 1)) - 1
    if s < 1:
        raise ValueError("NUQSGD needs at least 2 bits (a sign and one magnitude level)")
    magnitudes = 2.0 ** -np.arange(s - 1, -1, -1)
    return np.concatenate([-magnitudes[::-1], [0.0], magnitudes]).astype(np.float32)


def ternary_levels(bits):
    """TernGrad-style (Wen et al., NeurIPS 2017): {-1, 0, 1} times the bucket's max |x|."""
    if check_bits(bits) != 2:
        raise ValueError("ternary quantization uses exactly 2 bits")
    return np.array([-1.0, 0.0, 1.0], dtype=np.float32)


def sign_levels(bits):
    """1-bit sign quantization, made unbiased by stochastic rounding between -max and +max."""
    if check_bits(bits) != 1:
        raise ValueError("sign quantization uses exactly 1 bit")
    return np.array([-1.0, 1.0], dtype=np.float32)


def maxmin_levels(bits):
    """MaxMin (CGX, Bagua's ByteGrad): 2**bits uniform levels on [-1, 1], applied per bucket as
    offset + scale * level with offset = (max + min) / 2 and scale = (max - min) / 2, so the levels
    run from the bucket's min to its max. Also the starting point of ORQ's level search."""
    return np.linspace(-1.0, 1.0, 1 << check_bits(bits)).astype(np.float32)


def binary_levels(bits):
    """BinGrad's two levels b1 < b2 as offset -/+ scale (see fitting.bingrad_fit)."""
    if check_bits(bits) != 1:
        raise ValueError("BinGrad is binary quantization: it uses exactly 1 bit")
    return np.array([-1.0, 1.0], dtype=np.float32)


def orq_levels(bits):
    """ORQ's starting table (uniform on [-1, 1]); the levels sent are fitted to each tensor."""
    if check_bits(bits) < 2:
        raise ValueError("ORQ is multi-level quantization: it needs at least 2 bits (1 bit is "
                         "'sign')")
    return maxmin_levels(bits)


# The rotated scheme (core/rotation.py): after a random Hadamard rotation a block's coordinates are
# close to N(0, sigma^2) whatever the gradient's tails, so TNQ's question -- which threshold and
# which levels minimise truncation plus rounding error for a known density -- has one answer per
# bit width, computed here once. For nearest rounding that answer is the Lloyd-Max quantizer
# (Lloyd 1957 / Max 1960): every level is the mean of N(0, 1) over its cell (centroid condition),
# every cell boundary the midpoint of its two levels (nearest-neighbour condition); the outermost
# level is the truncation threshold, values beyond it are clipped to it. Its level density tends
# to p^(1/3), the Panter-Dite law that TNQ's closed form also follows.

def _normal_cdf(x):
    return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(x, dtype=np.float64) / math.sqrt(2.0)))


def _normal_pdf(x):
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def gaussian_cell_moments(edges):
    """(probability, first moment) of N(0, 1) in each cell between consecutive ``edges``
    (-inf and inf allowed)."""
    edges = np.asarray(edges, dtype=np.float64)
    cdf, pdf = _normal_cdf(edges), _normal_pdf(edges)
    return np.diff(cdf), -np.diff(pdf)


def gaussian_distortion(table):
    """E[(Q(X) - X)^2] for X ~ N(0, 1) rounded to the nearest level of ``table`` (sorted)."""
    table = np.asarray(table, dtype=np.float64)
    edges = np.concatenate([[-np.inf], (table[1:] + table[:-1]) / 2.0, [np.inf]])
    mass, first = gaussian_cell_moments(edges)
    # E[X^2] over a cell is mass - [x pdf(x)] across its edges
    x_pdf = np.where(np.isfinite(edges), edges * _normal_pdf(np.where(np.isfinite(edges), edges,
                                                                      0.0)), 0.0)
    second = mass - np.diff(x_pdf)
    return float(np.sum(second - 2.0 * table * first + table * table * mass))


def gaussian_levels(bits):
    """Lloyd-Max levels for N(0, 1) with 2**bits entries (float32, ascending, symmetric): the
    tables of lloyd_max_tables.py, computed once by lloyd_max_gaussian."""
    return _symmetric(POSITIVE_LEVELS[check_bits(bits)])


def lloyd_max_gaussian(bits, max_steps=400_000, tolerance=1e-13):
    """Lloyd-Max levels for N(0, 1) with 2**bits entries (float64): start from the Panter-Dite
    companding grid (the levels of N(0, 3) at equal-mass quantiles), which is close to optimal,
    then apply Lloyd's two conditions until a step moves no level by more than ``tolerance``
    (8 bits converge slowly: seconds to a minute)."""
    count = 1 << check_bits(bits)
    quantiles = (np.arange(count) + 0.5) / count
    table = math.sqrt(3.0) * np.array([_normal_quantile(q) for q in quantiles])
    for _ in range(max_steps):
        edges = np.concatenate([[-np.inf], (table[1:] + table[:-1]) / 2.0, [np.inf]])
        mass, first = gaussian_cell_moments(edges)
        updated = first / mass
        updated = (updated - updated[::-1]) / 2.0  # exactly symmetric
        step = np.max(np.abs(updated - table))
        table = updated
        if step < tolerance:
            break
    return table


def _normal_quantile(q):
    """The q-quantile of N(0, 1), by bisection on the CDF (used once per table)."""
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0
