"""Dynamic bit width per step (DQ-SGD: Yan, Huang, Lan, Song, arXiv 2107.14575).

DQ-SGD chooses the quantization of every step by minimising the communication cost subject to a
constraint on the convergence error, which its analysis bounds by a sum over steps of the
quantizer's variance E||Q(g_t) - g_t||^2 (Q unbiased). The scheme ``dqsgd`` quantizes like
QSGDinf (per bucket, uniform levels {-1, ..., -1/s, 0, 1/s, ..., 1} times the bucket's max |g|,
s = 2^(b-1) - 1, unbiased stochastic rounding) and picks the width b of each payload as the
cheapest one meeting the constraint

    E||Q_b(g_t) - g_t||^2 <= nmse_target * ||g_t||^2,       min_bits <= b <= max_bits,

i.e. the smallest b whose variance is within the target, ``max_bits`` when none is. The
variance is computed exactly for the gradient at hand (``expected_nmse``), not bounded: for a
value at y in units of the cell width 1/s the rounding variance is frac(y)(1 - frac(y)) / s^2.
Bounding the relative variance by nmse_target at every step bounds the bound's quantization
term by nmse_target times the run's sum of squared gradient norms: the convergence guarantee of
SGD with an omega-variance unbiased compressor (omega = nmse_target) holds throughout, while
the bits follow the gradient's shape (heavy-tailed buckets need more bits, flat ones fewer).
(The paper's full text was not available to this project. Its stated problem weights each step
by how much of its error survives to the end of training, which needs the horizon and the
contraction factor of the loss; this per-step constraint is the horizon-free sufficient
condition, and it is what this module implements.)

Every rank chooses its own width from its own gradient: payloads are self-describing (the
header carries their bits), so the decoder reads each with its own width and no rank has to
wait for a common choice. The decoder still refuses payloads that differ from its own in
scheme, dtype, element count, bucket size or shape (``decoder.decode_sum``); only the width may
differ, and only for this scheme.
"""

import numpy as np

from .levels import qsgd_levels
from .quantize import bucket_statistic, per_element
from .schemes import Scheme

DEFAULT_MIN_BITS = 2
DEFAULT_NMSE_TARGET = 0.1


def check_options(max_bits, min_bits, nmse_target):
    """Raise a ValueError naming the problem with the dynamic-width settings."""
    if isinstance(min_bits, bool) or not isinstance(min_bits, int) or \
            not 2 <= min_bits <= max_bits:
        raise ValueError(f"min_bits must be an int in [2, bits={max_bits}] (QSGD levels need a "
                         f"sign and one magnitude level), got {min_bits!r}")
    if isinstance(nmse_target, bool) or not isinstance(nmse_target, (int, float)) or \
            not nmse_target > 0:
        raise ValueError(f"nmse_target must be a positive number, got {nmse_target!r}")


def expected_nmse(flat, bucket_size, bits_range):
    """Exact E||Q_b(g) - g||^2 / ||g||^2 of QSGDinf rounding for each b in ``bits_range``."""
    values = np.abs(flat).astype(np.float64)
    norm2 = float(np.sum(values * values))
    scales = bucket_statistic(flat, bucket_size, "max_abs")
    scale = per_element(scales, bucket_size, values.size)
    unit = values / np.where(scale > 0, scale, 1.0)
    weight = scale * scale
    result = []
    for bits in bits_range:
        s = (1 << (bits - 1)) - 1
        y = unit * s
        frac = y - np.floor(y)
        error = float(np.sum(weight * (frac * (1.0 - frac)))) / (s * s)
        result.append(error / norm2 if norm2 > 0 else 0.0)
    return result


def choose_bits(flat, bucket_size, max_bits, *, min_bits=DEFAULT_MIN_BITS,
                nmse_target=DEFAULT_NMSE_TARGET, **_options):
    """The width of this payload: the smallest b in [min_bits, max_bits] whose expected NMSE is
    at most ``nmse_target`` (``max_bits`` when none is)."""
    check_options(max_bits, min_bits, nmse_target)
    candidates = range(min_bits, max_bits + 1)
    for bits, nmse in zip(candidates, expected_nmse(flat, bucket_size, candidates)):
        if nmse <= nmse_target:
            return bits
    return max_bits


SCHEME = Scheme("dqsgd", 21, qsgd_levels, "max_abs", "Yan, Huang, Lan, Song, DQ-SGD, "
                "arXiv 2107.14575", choose_bits=choose_bits,
                options={"min_bits": DEFAULT_MIN_BITS, "nmse_target": DEFAULT_NMSE_TARGET},
                check_options=check_options)
