"""A cheap estimate of a payload's quantization error, for live training metrics (issue 18).

``estimate_error(payload)`` returns ``(squared_error, squared_norm)``: an estimate of
E||decode(payload) - x||^2 and of ||x||^2 for the tensor x that was encoded, or None where no
cheap estimate exists. Sum both over a tensor's (or a model's) payloads and divide to report the
relative error (NMSE); the norms weight the payloads correctly.

Nothing is decoded. Each estimate reads the header and the per-bucket parameters (one float per
bucket of 512 elements by default: O(n / bucket_size) work) and applies the scheme's own
mathematics; three schemes also read the packed codes, in one vectorised pass over
n * bits / 8 bytes (a 256-entry table per byte where codes do not straddle bytes), because their
parameters alone do not determine the error. Measured on 2^20 float32 elements, 4 bits, bucket
512 (tests/unit/test_core_error_estimate.py prints it): tnq-rht and tnq 0.02 ms, i.e. about 1%
of core.encode's compiled kernel (1.7-2.2 ms) and 0.02% of the numpy reference; qsgd 1.4 ms,
maxmin 2.8 ms (the pass over the codes). tnq-rht's constants cost about 30 ms once per
(bits, bucket size) below 1024-element buckets.

Accuracy, as (estimated relative error) / (true relative error), measured on real gradients of
benchmarks/gradients.py (a CNN on digits, a character-level GRU LM; summed over each model's
layers, and per layer of at least 4096 elements) and on synthetic Laplace / Student-t data, over
several rotation and rounding keys; tests/unit/test_core_error_estimate.py asserts each bound.

* ``tnq-rht`` (the default), header only. A random Hadamard rotation makes each bucket's
  coordinates r close to N(0, ||x_b||^2) (DRIVE/EDEN, Vargaftik et al., NeurIPS 2021 /
  ICML 2022; shared notes ALGORITHMS.md, "Random rotation first"); the encoder rounds r / sigma
  (sigma = ||r|| / sqrt(n), n the bucket size) to the nearest level q of the Lloyd-Max table for
  N(0, 1) and stores EDEN's scale, which after folding in the Hadamard's 1/n is
  ``scale = sigma / <q, r/sigma>`` (encoder.encode_rotated). The decoded bucket's error is exactly
  ||x_b||^2 (n ||q||^2 / <q, r/sigma>^2 - 1), and ||x_b||^2 = sigma^2 = (scale <q, r/sigma>)^2.
  For Gaussian r, <q, r/sigma> / n -> E[Q(Z) Z] and ||q||^2 / n -> E[Q(Z)^2] as n grows, so
  ||x_b||^2 ~ (n E[QZ] scale)^2 and the relative error ~ E[Q^2] / E[QZ]^2 - 1, which equals
  EDEN's D_b / (1 - D_b) for Lloyd-Max levels (D_b the distortion; 0.133, 0.0358, 0.00959,
  4.1e-5 at 2, 3, 4, 8 bits). Both constants are integrals of the level table over the Gaussian
  (levels.gaussian_cell_moments), computed once per bit width. Buckets of fewer than 1024
  elements normalise by an empirical RMS and sum few terms, which changes both constants by up
  to 40% (bucket 8); there they are the means over 2^18 Gaussian coordinates (a fixed seed, so
  deterministic), drawn once per (bits, bucket size) and cached. Each payload's estimate is then
  a constant times the sum of its squared scales. It is the error for Gaussian rotated
  coordinates; real gradients' rotated buckets are a little lighter-tailed (sums dominated by
  fewer terms), so the estimate errs slightly high. Measured at 1-8 bits: 0.95-1.05 per real
  model, 0.94-1.10 per real layer, Laplace and Student-t(3) 0.98-1.06, Student-t(2) 1.08-1.14
  (1.55 at 1 bit); Gaussian data at buckets of 8 to 4096, 0.98-1.01. The norm estimate is
  within 3% on real gradients.
* ``tnq`` and ``tnq-uniform``, header only: the Laplace model both schemes are built on (Yan et
  al., arXiv 2402.01160 and 2402.01798; levels.py): each bucket's stored scale is its mean |x|,
  the maximum-likelihood Laplace scale gamma, so ||x_b||^2 ~ 2 gamma^2 m_b (m_b elements) and
  E||Q(x_b) - x_b||^2 = gamma^2 m_b E_t, with E_t the exact expected error of the unit level table
  t for a unit Laplace variable: truncation bias e^{-t_max} + e^{t_min} plus the stochastic-
  rounding variance integral of (y - lo)(hi - y) over every cell (40-point Gauss-Legendre per
  cell, exact to rounding for polynomial-times-exponential integrands), computed once per bit
  width. E_t stays below TNQ's closed-form bound 27 / (s + c)^2 (laplace_error_bound). Accurate
  where gradients are Laplace-like: Laplace data 0.97-1.05 at 1-8 bits, real models summed over
  their layers 0.90-1.17 at 1-4 bits -- but single real layers 0.35-1.3, and heavier tails are
  exactly what this model does not see, so there the estimate is low, the more so the more bits
  (the truncation bias it misses dominates): Student-t(3) 0.89 / 0.23 / 0.00 at 1 / 4 / 8 bits,
  Student-t(2) down to 0.05 at 4 bits, the CNN at 8 bits 0.36 -- as the scheme itself is then
  the wrong choice (use tnq-rht).
* ``qsgd`` and ``nuqsgd``, codes read: the scale is the bucket's L2 norm, so ||x_b||^2 is known
  exactly; every |x_i| / ||x_b|| lies inside the level range and rounding is unbiased, so
  E||Q(x) - x||^2 = E||Q(x)||^2 - ||x||^2 exactly, and ||Q(x)||^2 = sum_b scale_b^2 sum_i
  t[c_i]^2 is read off the codes. Unbiased; its own noise, 2 <Q(x) - x, x>, is small beside the
  error at 2-3 bits (measured 0.94-1.05 everywhere; qsgd 0.93-1.09 at 4 bits) and comparable
  with it where a few large elements round in coarse cells (nuqsgd's top cells at 4-8 bits,
  qsgd at 8 bits: one step of one model 0.63-1.60, Student-t(2) 0.2-2.4); averaged over steps
  it converges (8 steps: 0.87-1.03 on the real models). A negative estimate is returned as 0.
* ``maxmin`` at 3 bits or more, codes read: 2^b uniform levels from the bucket's min to its max
  (CGX, Bagua), unbiased rounding inside the range. With cells of width delta = 2 scale /
  (2^b - 1) much narrower than the spread of the values, each value's position within its cell
  is close to uniform, so its rounding variance (y - lo)(hi - y) averages delta^2 / 6 (the
  classic high-resolution approximation, e.g. Gray & Neuhoff, "Quantization", IEEE Trans. IT
  1998): error ~ m_b delta^2 / 6, and ||x_b||^2 ~ ||Q(x_b)||^2 - error. Measured at 3-8 bits:
  0.86-1.14 (real layers 0.91-1.08; a sparse early-training embedding gradient, mostly exact
  zeros, 0.72-1.24). At 1-2 bits the cells are as wide as the data and the positions far from
  uniform (measured 0.08-0.9 at 1 bit, 0.53-1.26 at 2): None.

None (no cheap estimate): schemes whose parameters carry no information about the bucket's norm
beyond a distribution-dependent ratio that their codes do not reveal either -- ``qsgdinf``,
``terngrad``, ``sign``, ``dqsgd`` (max |x| scaled: for ternary codes E||Q(x)||^2 = max|x| ||x||_1
whatever ||x||^2 is, so the norm is not identifiable, and maxmin's approximation applied to them
measured 4.3-8.5x off at 2 bits on the real models, 4.5x at 4 bits on Student-t(2)), ``bingrad``
(deterministic 1 bit) and ``maxmin`` below 3 bits (cells as wide as the data); schemes whose levels
or scales are fitted to the data (``tnq-fit``, ``tnq-opt``, ``orq``: their error is what the fit
minimised on values the payload no longer holds); and schemes with their own payload body
(``topk``, ``tnq-sparse``, ``dp-binomial``: what they leave out or add is not in per-bucket
parameters).

Edge cases: elements that travel as non-finite exceptions are sent exactly and their norm is
infinite, so the estimate describes the finite part: they add nothing to either number (the
encoder quantized zeros in their place, and the estimates above count those zeros as it did).
An empty or all-zero tensor gives (0.0, 0.0): every covered scheme decodes zero buckets exactly,
so a caller should read 0 / 0 as no error. Rotated payloads of tensors scaled by 2^-e
(encoder.SAFE_NORMS) are scaled back by 4^e (overflowing to inf as ||x||^2 itself would).
"""

import math
from functools import lru_cache

import numpy as np

from .levels import gaussian_cell_moments, gaussian_levels
from .packing import unpack_bits
from .payload import split
from .schemes import SCHEMES_BY_ID, level_table

__all__ = ["estimate_error", "COVERED_SCHEMES"]

# scheme name -> the smallest bit width its estimate covers
COVERED_SCHEMES = {"tnq-rht": 1, "tnq": 1, "tnq-uniform": 1, "qsgd": 2, "nuqsgd": 2,
                   "maxmin": 3}

# tnq-rht: buckets at least this large use the large-bucket limit of the constants (the
# finite-size effect is below 1% there); smaller ones a Monte Carlo mean over Gaussian buckets
RHT_ASYMPTOTIC_BUCKET = 1024
RHT_MONTE_CARLO_ELEMENTS = 1 << 18
RHT_MONTE_CARLO_SEED = 18  # the number: any fixed seed, so every rank agrees


@lru_cache(maxsize=None)
def rht_constants(bits, bucket_size):
    """(c_norm, c_error) for tnq-rht: per bucket, ||x_b||^2 ~ c_norm scale_b^2 and
    E||Q(x_b) - x_b||^2 ~ c_error scale_b^2 (see the module docstring)."""
    table = gaussian_levels(bits).astype(np.float64)
    n = int(bucket_size)
    if n >= RHT_ASYMPTOTIC_BUCKET:
        edges = np.concatenate([[-np.inf], (table[1:] + table[:-1]) / 2.0, [np.inf]])
        mass, first = gaussian_cell_moments(edges)
        q2 = float(np.sum(table * table * mass))   # E[Q(Z)^2]
        qz = float(np.sum(table * first))          # E[Q(Z) Z]
        c_norm = (n * qz) ** 2
        return c_norm, c_norm * (q2 / (qz * qz) - 1.0)
    # Monte Carlo over Gaussian buckets, quantized as encoder.encode_rotated does: normalise by the
    # bucket's RMS, nearest level, EDEN's scale sigma / <q, r / sigma>.
    count = max(RHT_MONTE_CARLO_ELEMENTS // n, 64)
    rows = np.random.default_rng(RHT_MONTE_CARLO_SEED).standard_normal((count, n))
    sigma2 = np.mean(rows * rows, axis=1)
    unit = rows / np.sqrt(sigma2)[:, None]
    q = table[np.searchsorted((table[1:] + table[:-1]) / 2.0, unit)]
    dot = np.sum(q * unit, axis=1)
    scale2 = sigma2 / (dot * dot)
    error = n * scale2 * np.sum(q * q, axis=1) - sigma2  # (S^2 ||q||^2 - ||r||^2) / n
    total = float(np.sum(scale2))
    return float(np.sum(sigma2)) / total, float(np.sum(error)) / total


_GAUSS_LEGENDRE = np.polynomial.legendre.leggauss(40)


@lru_cache(maxsize=None)
def laplace_table_error(scheme_id, bits):
    """E[(Q(Y) - Y)^2] for Y ~ Laplace(0, 1), truncated to the unit level table of the scheme
    and rounded stochastically between adjacent levels (exact, by quadrature per cell)."""
    table = level_table(scheme_id, bits).astype(np.float64)
    nodes, weights = _GAUSS_LEGENDRE
    # truncation bias beyond each end level T > 0: int_T^inf (y - T)^2 e^{-y} / 2 dy = e^{-T}
    total = math.exp(-table[-1]) + math.exp(table[0])
    for lo, hi in zip(table[:-1], table[1:]):
        # the density has a kink at 0: integrate each side of it separately
        for a, b in ([(lo, hi)] if lo >= 0.0 or hi <= 0.0 else [(lo, 0.0), (0.0, hi)]):
            y = (a + b) / 2.0 + (b - a) / 2.0 * nodes
            total += float(np.sum((b - a) / 2.0 * weights * (y - lo) * (hi - y) *
                                  np.exp(-np.abs(y)) / 2.0))
    return total


def _bucket_counts(header):
    counts = np.full(header.num_buckets, header.bucket_size, dtype=np.float64)
    if counts.size:
        counts[-1] = header.coded_numel - header.bucket_size * (counts.size - 1)
    return counts


@lru_cache(maxsize=None)
def _byte_table(values, bits):
    """For each byte of packed codes (8 // bits codes each), the sum of ``values`` over its
    codes."""
    full = np.asarray(values, dtype=np.float64)
    byte = np.arange(256)
    total = np.zeros(256)
    for j in range(8 // bits):
        total += full[(byte >> (j * bits)) & ((1 << bits) - 1)]
    return total


def bucket_code_sums(sections, values):
    """Per bucket, the sum of ``values[code]`` over its codes: one vectorised pass over the
    packed codes (a byte lookup table where whole codes and whole buckets fill bytes, i.e. at
    1, 2, 4 and 8 bits with bucket_size * bits a multiple of 8; unpacking otherwise)."""
    header = sections.header
    bits, n, bucket = header.bits, header.num_codes, header.bucket_size
    full = np.zeros(1 << bits)
    full[: len(values)] = values  # codes beyond the table would be refused by decode: weight 0
    if n == 0:
        return np.zeros(0)
    starts_every = bucket * bits // 8
    if 8 % bits == 0 and (bucket * bits) % 8 == 0:
        per_byte = _byte_table(tuple(full), bits)[sections.packed]
        sums = np.add.reduceat(per_byte, np.arange(0, per_byte.size, starts_every))
        sums[-1] -= ((-n) % (8 // bits)) * full[0]  # padding codes (zeros) in the last byte
        return sums
    codes = unpack_bits(sections.packed, bits, n)
    return np.add.reduceat(full[codes], np.arange(0, n, bucket))


def estimate_error(payload):
    """(estimated E||decode(payload) - x||^2, estimated ||x||^2) for the tensor x that
    ``payload`` (one payload, numpy uint8, as core.encode returns it) encodes, or None where the
    scheme has no cheap estimate. See the module docstring for the formulas, their sources, the
    cost and the measured accuracy of each scheme."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        payload = np.frombuffer(payload, dtype=np.uint8)
    sections = split(np.ascontiguousarray(payload, dtype=np.uint8).reshape(-1))
    header = sections.header
    name = SCHEMES_BY_ID[header.scheme_id].name
    if COVERED_SCHEMES.get(name, 99) > header.bits:
        return None
    if header.coded_numel == 0:  # (zero runs decode exactly: no error, no norm)
        return 0.0, 0.0
    scales = sections.scales
    if name == "tnq-rht":
        c_norm, c_error = rht_constants(header.bits, header.bucket_size)
        scale2 = float(np.dot(scales, scales))
        exponent = 2 * sections.rotation[2]
        with np.errstate(over="ignore"):
            return (float(np.ldexp(c_error * scale2, exponent)),
                    float(np.ldexp(c_norm * scale2, exponent)))
    if name in ("tnq", "tnq-uniform"):
        gamma2_m = float(np.dot(scales * scales, _bucket_counts(header)))
        return gamma2_m * laplace_table_error(header.scheme_id, header.bits), 2.0 * gamma2_m
    table = sections.table
    if name in ("qsgd", "nuqsgd"):
        scale2 = scales * scales
        norm2 = float(np.sum(scale2))
        decoded2 = float(np.dot(scale2, bucket_code_sums(sections, table * table)))
        return max(decoded2 - norm2, 0.0), norm2
    # maxmin: value = offset + scale * t[code]
    offsets = sections.offsets
    counts = _bucket_counts(header)
    decoded2 = float(np.sum(counts * offsets * offsets +
                            2.0 * offsets * scales * bucket_code_sums(sections, table) +
                            scales * scales * bucket_code_sums(sections, table * table)))
    width = 2.0 * scales / (table.size - 1)
    error = float(np.dot(counts, width * width)) / 6.0
    return error, max(decoded2 - error, 0.0)
