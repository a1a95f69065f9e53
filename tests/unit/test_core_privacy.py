"""Binomial-noise differential privacy (core/privacy.py, scheme "dp-binomial"): the noise, the
round trip, the accounting."""

import math

import numpy as np
import pytest

from horovod_tnq import core
from horovod_tnq.core import privacy

DP = {"dp_clip": 2.0, "dp_epsilon": 2.0, "dp_delta": 1e-5, "dp_sensitivity": 0.01}


def encode(x, bits=4, key=0, step=0, **options):
    return core.encode(x, scheme="dp-binomial", bits=bits, bucket_size=512, key=key, step=step,
                       options=dict(DP, **options))


def test_theorem_1_matches_an_independent_implementation():
    # cpSGD Theorem 1 at N = 2000, p = 1/2, delta = 1e-6, d = 1, all sensitivities 1: a public
    # re-implementation of equation (7) reports 0.6375 < epsilon < 0.6376
    assert 0.6375 < privacy.binomial_epsilon(2000, 1e-6, 1, 1, 1, 1) < 0.6376
    # and gives no guarantee below the theorem's condition on the number of trials
    assert privacy.binomial_epsilon(100, 1e-6, 1, 1, 1, 1) == math.inf


def test_binomial_noise_has_the_binomial_distribution():
    draws = privacy.binomial_noise(200_000, key=12345, step=3, trials=5)
    expected = np.array([math.comb(5, j) for j in range(6)]) / 32 * draws.size
    observed = np.bincount(draws, minlength=6)
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < 20.5  # 99.9% quantile of chi-square with 5 degrees of freedom
    large = privacy.binomial_noise(100_000, key=7, step=0, trials=1000)
    assert large.mean() == pytest.approx(500, abs=0.2)
    assert large.var() == pytest.approx(250, rel=0.02)


def test_noise_is_reproducible_and_fresh_per_step():
    a = privacy.binomial_noise(1000, key=1, step=0, trials=100)
    np.testing.assert_array_equal(a, privacy.binomial_noise(1000, key=1, step=0, trials=100))
    assert not np.array_equal(a, privacy.binomial_noise(1000, key=1, step=1, trials=100))
    assert not np.array_equal(a, privacy.binomial_noise(1000, key=2, step=0, trials=100))


def test_round_trip_is_unbiased_inside_the_clipping_range():
    x = np.random.default_rng(0).uniform(-1.9, 1.9, 64).astype(np.float32)
    draws = np.array([core.decode(encode(x, key=k))[0] for k in range(3000)])
    trials = privacy.release_guarantee(64, 4, 2.0, 2.0, 1e-5, 0.01)[0]
    spread = 4.0 / 15 * math.sqrt(trials / 4 + 0.25)  # noise + rounding std, gradient units
    np.testing.assert_array_less(np.abs(draws.mean(0) - x), 5 * spread / math.sqrt(3000))
    outside = np.array([5.0, -7.0] * 32, np.float32)
    mean = np.mean([core.decode(encode(outside, key=k))[0] for k in range(2000)], axis=0)
    np.testing.assert_allclose(mean, np.clip(outside, -2, 2), atol=5 * spread / math.sqrt(2000))


@pytest.mark.parametrize("bits, epsilon", [(2, 8.0), (4, 2.0), (8, 1.0)])
def test_payload_layout_and_exact_codes(bits, epsilon):
    n = 5000
    x = np.random.default_rng(bits).normal(size=n).astype(np.float32)
    payload = encode(x, bits=bits, dp_epsilon=epsilon)
    trials, wire, eps, _ = privacy.release_guarantee(n, bits, 2.0, epsilon, 1e-5, 0.01)
    assert eps <= epsilon and wire == math.ceil(math.log2(2 ** bits + trials))
    data_bytes = (n * wire + 7) // 8 if wire <= 8 else n + (n * (wire - 8) + 7) // 8
    assert payload.size == core.HEADER.size + privacy.PREFIX.size + data_bytes
    assert payload.size == core.encoded_size(n, bits, 512, scheme="dp-binomial",
                                             options=dict(DP, dp_epsilon=epsilon))
    decoded = core.decode(payload)[0]
    step = 4.0 / (2 ** bits - 1)
    codes = (decoded + 2.0) / step + trials / 2
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-6)
    assert codes.min() >= 0 and codes.max() <= 2 ** bits - 1 + trials


def test_trials_are_the_fewest_meeting_the_target():
    n, bits = 20_000, 4
    trials, _, eps, _ = privacy.release_guarantee(n, bits, 2.0, 1.0, 1e-5, 0.01)
    step = 4.0 / 15
    sens = privacy.code_sensitivities(0.01, step, n, 16, 1e-5 / 2)
    assert eps == privacy.binomial_epsilon(trials, 1e-5 / 2, n, *sens) <= 1.0
    assert 1.0 < privacy.binomial_epsilon(trials - 1, 1e-5 / 2, n, *sens) < math.inf
    more_private = privacy.release_guarantee(n, bits, 2.0, 0.5, 1e-5, 0.01)[0]
    less_sensitive = privacy.release_guarantee(n, bits, 2.0, 1.0, 1e-5, 0.001)[0]
    assert more_private > trials > less_sensitive
    # the theorem's own condition sets a floor: 23 ln(10 d / delta) <= trials / 4
    floor = privacy.release_guarantee(n, bits, 2.0, 100.0, 1e-5, 0.001)[0]
    assert floor == math.ceil(4 * 23 * math.log(10 * n / (1e-5 / 2)))


def test_code_sensitivity_bounds_hold_for_coupled_rounding():
    """Neighbouring inputs rounded with the same uniform draws: the code differences stay
    within the bounds (which hold except with probability beta)."""
    rng = np.random.default_rng(1)
    n, levels, step, sensitivity = 20_000, 16, 4.0 / 15, 0.02
    l1, l2, linf = privacy.code_sensitivities(sensitivity, step, n, levels, 1e-6)
    table = np.arange(levels, dtype=np.float32)
    for trial in range(30):
        y = rng.uniform(0, levels - 1, n)
        change = rng.normal(size=n) * (rng.random() < 0.5 or rng.random(n) < 0.01)
        change *= sensitivity / step / np.linalg.norm(change)
        noise = core.uniform_noise(n, trial)
        a = core.stochastic_round(y.astype(np.float32), table, noise).astype(np.int64)
        b = core.stochastic_round(np.clip(y + change, 0, levels - 1).astype(np.float32), table,
                                  noise).astype(np.int64)
        diff = np.abs(a - b)
        assert diff.sum() <= l1 and np.sqrt((diff ** 2).sum()) <= l2 and diff.max() <= linf


def test_accounting_composes_over_steps():
    numels = [20_000, 5_000]
    one = privacy.account(numels, 1, 4, 2.0, 2.0, 1e-5, 0.01)
    assert one["step_epsilon"] == pytest.approx(sum(
        privacy.release_guarantee(n, 4, 2.0, 2.0, 1e-5, 0.01)[2] for n in numels))
    assert (one["epsilon"], one["delta"]) == (one["step_epsilon"], one["step_delta"])
    many = privacy.account(numels, 10_000, 2, 2.0, 0.3, 1e-5, 0.001)
    eps, steps = many["step_epsilon"], many["steps"]
    advanced = math.sqrt(2 * steps * math.log(1e5)) * eps + steps * eps * math.expm1(eps)
    assert many["composition"] == "advanced" and many["epsilon"] == pytest.approx(advanced)
    assert many["epsilon"] < steps * eps
    assert many["delta"] == pytest.approx(steps * many["step_delta"] + 1e-5)


def test_impossible_targets_and_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="needs more than"):
        privacy.release_guarantee(1_000_000, 8, 1.0, 0.01, 1e-5, 1.0)
    for options, match in ((dict(dp_clip=None), "dp_clip"), (dict(dp_sensitivity=0), "dp_sens"),
                           (dict(dp_delta=1.5), "dp_delta"), (dict(dp_epsilon=-1), "dp_eps")):
        with pytest.raises(ValueError, match=match):
            encode(np.ones(100, np.float32), **options)
