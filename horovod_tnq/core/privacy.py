"""Differential privacy by binomial noise on uniformly quantized gradients (scheme ``dp-binomial``).

The mechanism is cpSGD's (Agarwal, Suresh, Yu, Kumar, McMahan, "cpSGD: Communication-efficient
and differentially-private distributed SGD", NeurIPS 2018, arXiv 1805.10559), the one Yan et al.
build on for the communication / privacy / learning trade-off ("Killing Two Birds with One
Stone: Quantization Achieves Privacy in Distributed Learning", arXiv 2304.13545):

1. clip every element to [-dp_clip, dp_clip] (a fixed range: a data-dependent scale would itself
   leak, so no scale is sent);
2. stochastically round it onto k = 2^bits uniform levels, an integer code u in [0, k - 1];
3. add Z ~ Binomial(m, 1/2) to the code and send v = u + Z with w = ceil(log2(k + m)) bits;
4. decode v to -dp_clip + step (v - m / 2), step = 2 dp_clip / (k - 1): unbiased for elements
   inside the clipping range.

Z is the number of ones among m bits of the counter-based generator (rng.random_words, one
32-bit word per 32 trials, each word from its own derived key), so it is exactly binomial and
reproducible bit for bit in both frameworks.

Accounting (what ``account`` reports; all of it documented here so it can be checked):

* Threat model: every rank receives every payload (Horovod's allgather), so the guarantee is
  local: what other ranks, or anyone who sees the payloads, can learn about one rank's input from
  that rank's payloads. Noise from other ranks is not counted.
* Neighbouring inputs: this rank's gradient tensors g, g' with ||g - g'||_2 <= dp_sensitivity,
  in gradient units. The compressor cannot enforce that: clip per-example gradients before the
  allreduce (e.g. to norm C over a local batch of B examples, dp_sensitivity = 2 C / B for
  replace-one neighbours). Clipping to [-dp_clip, dp_clip] is 1-Lipschitz and does not increase
  it. Each tensor is accounted with the full dp_sensitivity (one example may move only it).
* One release (one tensor, one step) is cpSGD's binomial mechanism on the integer codes,
  conditioned on the rounding draws, which both neighbours share. Its epsilon is cpSGD's
  Theorem 1 (equation 7, with c_p, d_p, b_p from equations 12, 16, 17), valid when
  m p (1 - p) >= max(23 ln(10 d / delta), 2 Delta_inf), codes being integers (s = 1).
* Sensitivities of the codes (derived here, not from the papers): with a = |g_i - g'_i| / step in
  code units and a shared uniform draw per element, the two codes of element i differ by
  floor(a_i) + B_i with B_i ~ Bernoulli(frac(a_i)) independent across elements. Hence
  Delta_inf <= floor(A) + 1 with A = dp_sensitivity / step, and, by Bernstein's inequality with
  failure probability beta (added to delta), Delta_1 <= sqrt(d) A + F and
  Delta_2^2 <= A^2 + S, where F and S bound the rounding flips (``code_sensitivities``). The
  sqrt(d) term is the price of rounding: coarse levels on large tensors need much noise.
* Per step: the tensors released in one step compose by basic composition (epsilons and deltas
  add). Over T steps: the better of basic composition (T eps, T delta) and advanced
  composition (Dwork, Rothblum, Vadhan, FOCS 2010; Dwork & Roth 2014, Theorem 3.20):
  (sqrt(2 T ln(1 / delta')) eps + T eps (e^eps - 1), T delta + delta'), delta' = dp_delta.

The number of trials m is the smallest meeting the per-release target ``dp_epsilon`` at
per-release delta ``dp_delta`` (as cpSGD chooses N); a target that needs more than a 16-bit wire
can carry is refused with the numbers. Error feedback is refused with this scheme: the residual
would carry the private gradient into later releases and break the accounting.
"""

import functools
import math
import struct

import numpy as np

from . import levels
from .payload import HEADER, PayloadError
from .packing import pack_bits, unpack_bits
from .quantize import stochastic_round
from .rng import derived_key, random_words, uniform_noise
from .schemes import Body, Scheme

PREFIX = struct.Struct("<IB3xd")  # trials m, wire bits w, reserved, clip (float64)
MAX_WIRE_BITS = 16
DEFAULT_DELTA = 1e-5
DEFAULT_EPSILON = 1.0
P = 0.5  # success probability of each trial: a fair bit


# cpSGD, Agarwal et al. 2018, Theorem 1 and the constants it uses.
def _b_p(p):  # equation (17)
    return 2.0 / 3.0 * (p ** 2 + (1 - p) ** 2) + 1 - 2 * p


def _c_p(p):  # equation (12)
    return math.sqrt(2.0) * (3 * p ** 3 + 3 * (1 - p) ** 3 + 2 * p ** 2 + 2 * (1 - p) ** 2)


def _d_p(p):  # equation (16)
    return 4.0 / 3.0 * (p ** 2 + (1 - p) ** 2)


def binomial_epsilon(trials, delta, dim, l1, l2, linf, p=P):
    """Epsilon of the binomial mechanism with ``trials`` trials of probability p on integer-valued
    data of dimension ``dim`` with sensitivities l1, l2, linf (cpSGD Theorem 1, equation 7);
    math.inf where the theorem's condition on trials does not hold."""
    variance = trials * p * (1 - p)
    if variance < max(23.0 * math.log(10.0 * dim / delta), 2.0 * linf):
        return math.inf
    return (l2 * math.sqrt(2.0 * math.log(1.25 / delta)) / math.sqrt(variance)
            + (l2 * _c_p(p) * math.sqrt(math.log(10.0 / delta)) + l1 * _b_p(p))
            / (variance * (1.0 - delta / 10.0))
            + (2.0 / 3.0 * linf * math.log(1.25 / delta)
               + linf * _d_p(p) * math.log(20.0 * dim / delta) * math.log(10.0 / delta))
            / variance)


def _bernstein(mean, variance, bound, beta):
    """A value that a sum of independent terms in [0, bound] with the given mean and variance
    exceeds with probability at most beta."""
    log_term = math.log(1.0 / beta)
    return mean + bound * log_term / 3.0 + math.sqrt((bound * log_term / 3.0) ** 2 +
                                                       2.0 * variance * log_term)


def code_sensitivities(sensitivity, step, dim, levels_count, beta):
    """(Delta_1, Delta_2, Delta_inf) of the integer codes, valid except with probability beta
    over the rounding draws (module docstring). ``sensitivity`` is the l2 bound in gradient
    units, ``step`` the level spacing."""
    a = sensitivity / step  # l2 norm of the change in code units
    root_d = math.sqrt(dim)
    # flips F = sum B_i: mean and variance at most sum min(a_i, 1) <= sqrt(d) a
    flips = _bernstein(root_d * a, root_d * a, 1.0, beta / 2.0)
    # S = sum B_i (1 + 2 a_i), each term at most 1 + 2a, mean <= sqrt(d) a + 2 a^2,
    # variance <= sqrt(d) a + 8 a^2
    squares = _bernstein(root_d * a + 2 * a * a, root_d * a + 8 * a * a, 1 + 2 * a, beta / 2.0)
    span = levels_count - 1
    linf = min(math.floor(a) + 1, span)
    l1 = min(root_d * a + flips, dim * span)
    l2 = min(math.sqrt(a * a + squares), root_d * span)
    return l1, l2, linf


def check_options(bits, dp_clip, dp_epsilon, dp_delta, dp_sensitivity):
    for name, value in (("dp_clip", dp_clip), ("dp_sensitivity", dp_sensitivity),
                        ("dp_epsilon", dp_epsilon)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not 0 < value < math.inf:
            raise ValueError(f"the dp-binomial scheme needs {name} > 0 (see "
                             f"horovod_tnq/core/privacy.py), got {value!r}")
    if isinstance(dp_delta, bool) or not isinstance(dp_delta, (int, float)) or \
            not 0 < dp_delta < 1:
        raise ValueError(f"dp_delta must be in (0, 1), got {dp_delta!r}")
    levels.check_bits(bits)


@functools.lru_cache(maxsize=1024)
def release_guarantee(numel, bits, dp_clip, dp_epsilon, dp_delta, dp_sensitivity):
    """(trials m, wire bits w, epsilon, delta) of one release of a tensor of ``numel`` elements:
    the fewest trials whose epsilon is at most dp_epsilon at delta = dp_delta (half of it for
    the binomial mechanism, half for the rounding flips)."""
    check_options(bits, dp_clip, dp_epsilon, dp_delta, dp_sensitivity)
    k = 1 << bits
    step = 2.0 * dp_clip / (k - 1)
    numel = max(int(numel), 1)
    sens = code_sensitivities(dp_sensitivity, step, numel, k, dp_delta / 2.0)

    def epsilon(trials):
        return binomial_epsilon(trials, dp_delta / 2.0, numel, *sens)

    most = (1 << MAX_WIRE_BITS) - k
    if epsilon(most) > dp_epsilon:
        raise ValueError(
            f"dp-binomial: epsilon {dp_epsilon} per release of a {numel}-element tensor at "
            f"delta {dp_delta} needs more than {most} binomial trials (a {MAX_WIRE_BITS}-bit "
            f"wire; with them epsilon is {epsilon(most):.4g}); code sensitivities l1, l2, linf "
            f"= {sens[0]:.4g}, {sens[1]:.4g}, {sens[2]}. Raise dp_epsilon, lower dp_sensitivity "
            "or use fewer bits (wider levels)")
    lo, hi = 1, most  # epsilon falls as trials grow: bisect for the fewest that meet the target
    while lo < hi:
        mid = (lo + hi) // 2
        if epsilon(mid) <= dp_epsilon:
            hi = mid
        else:
            lo = mid + 1
    return lo, wire_bits(k, lo), epsilon(lo), dp_delta


def wire_bits(levels_count, trials):
    return max(1, math.ceil(math.log2(levels_count + trials)))


def check_bits(bits):
    levels.check_bits(bits)


def binomial_noise(n, key, step, trials):
    """n draws of Binomial(trials, 1/2) as int64: ones among ``trials`` generator bits."""
    total = np.zeros(n, dtype=np.int64)
    for word in range(-(-trials // 32)):
        bits_here = min(32, trials - 32 * word)
        words = random_words(n, derived_key(key, word), step)
        if bits_here < 32:
            words &= np.uint32((1 << bits_here) - 1)
        total += np.bitwise_count(words)
    return total


def _pack(values, wire):
    if wire <= 8:
        return pack_bits(values.astype(np.uint8), wire)
    return np.concatenate([(values & 0xFF).astype(np.uint8),
                           pack_bits((values >> 8).astype(np.uint8), wire - 8)])


def _packed_size(n, wire):
    return (n * wire + 7) // 8 if wire <= 8 else n + (n * (wire - 8) + 7) // 8


def encode(flat, *, bits, key, step, dp_clip=None, dp_epsilon=DEFAULT_EPSILON,
           dp_delta=DEFAULT_DELTA, dp_sensitivity=None, **_options):
    n = flat.size
    trials, wire, _, _ = release_guarantee(n, bits, dp_clip, dp_epsilon, dp_delta,
                                           dp_sensitivity)
    k = 1 << bits
    work = flat.dtype.type
    clip = float(work(dp_clip))
    level_step = work(2.0 * clip / (k - 1))
    scaled = (np.clip(flat, work(-clip), work(clip)) + work(clip)) / level_step
    codes = stochastic_round(np.clip(scaled.astype(np.float32), 0, k - 1),
                             np.arange(k, dtype=np.float32), uniform_noise(n, key, step))
    noisy = codes.astype(np.int64) + binomial_noise(n, key, step, trials)
    prefix = np.frombuffer(PREFIX.pack(trials, wire, clip), dtype=np.uint8)
    return np.concatenate([prefix, _pack(noisy, wire)])


def _read_prefix(buf, at, header):
    if len(buf) - at < PREFIX.size:
        raise PayloadError(f"truncated payload: the dp-binomial body at offset {at} has "
                           f"{len(buf) - at} bytes, its prefix needs {PREFIX.size}")
    trials, wire, clip = PREFIX.unpack_from(buf, at)
    k = 1 << header.bits
    if not 1 <= wire <= MAX_WIRE_BITS or k + trials > (1 << wire) or not 0 < clip < math.inf:
        raise PayloadError(f"invalid dp-binomial prefix (trials {trials}, wire bits {wire}, "
                           f"clip {clip}) for {header.bits}-bit levels")
    return trials, wire, clip


def size(buf, at, header):
    _, wire, _ = _read_prefix(buf, at, header)
    return PREFIX.size + _packed_size(header.numel, wire)


def decode(body, header):
    n = header.numel
    trials, wire, clip = _read_prefix(body, 0, header)
    data = body[PREFIX.size:]
    if wire <= 8:
        noisy = unpack_bits(data, wire, n).astype(np.float64)
    else:
        noisy = (data[:n].astype(np.float64) +
                 256.0 * unpack_bits(data[n:], wire - 8, n).astype(np.float64))
    level_step = 2.0 * clip / ((1 << header.bits) - 1)
    return -clip + level_step * (noisy - trials / 2.0)


def max_size(numel, bits, **options):
    options = {name: value for name, value in options.items() if name.startswith("dp_")}
    _, wire, _, _ = release_guarantee(numel, bits, options.get("dp_clip"),
                                      options.get("dp_epsilon", DEFAULT_EPSILON),
                                      options.get("dp_delta", DEFAULT_DELTA),
                                      options.get("dp_sensitivity"))
    return HEADER.size + PREFIX.size + _packed_size(numel, wire)


def account(numels, steps, bits, dp_clip, dp_epsilon=DEFAULT_EPSILON, dp_delta=DEFAULT_DELTA,
            dp_sensitivity=None):
    """The (epsilon, delta) a rank has spent: ``numels`` lists the element counts of the tensors
    released each step, ``steps`` how many steps released them (module docstring)."""
    releases = [release_guarantee(n, bits, dp_clip, dp_epsilon, dp_delta, dp_sensitivity)
                for n in numels]
    step_epsilon = sum(r[2] for r in releases)
    step_delta = sum(r[3] for r in releases)
    basic = (steps * step_epsilon, steps * step_delta)
    total = basic
    if steps:
        advanced = (math.sqrt(2.0 * steps * math.log(1.0 / dp_delta)) * step_epsilon
                    + steps * step_epsilon * math.expm1(step_epsilon),
                    steps * step_delta + dp_delta)
        if advanced[0] < basic[0]:
            total = advanced
    return {"epsilon": total[0], "delta": total[1], "steps": steps,
            "step_epsilon": step_epsilon, "step_delta": step_delta,
            "trials": [r[0] for r in releases], "wire_bits": [r[1] for r in releases],
            "composition": "advanced" if total is not basic else "basic"}


SCHEME = Scheme("dp-binomial", 22, None, "", "binomial mechanism on quantized gradients: cpSGD "
                "(Agarwal et al., NeurIPS 2018); Yan et al., arXiv 2304.13545",
                body=Body(check_bits, encode, size, decode, max_size),
                options={"dp_clip": None, "dp_epsilon": DEFAULT_EPSILON, "dp_delta": DEFAULT_DELTA,
                         "dp_sensitivity": None},
                check_options=check_options,
                refuses_error_feedback="the residual would carry the private gradient into "
                "later releases, outside the privacy accounting")
