"""The baseline schemes beside TNQ: tables, unbiasedness, variance bounds, bit limits."""

import numpy as np
import pytest

from horovod_tnq import core

UNBIASED = ["qsgd", "qsgdinf", "nuqsgd", "terngrad", "sign"]
BITS = {"qsgd": [2, 3, 4, 8], "qsgdinf": [2, 3, 4, 8], "nuqsgd": [2, 3, 4, 8],
        "terngrad": [2], "sign": [1], "tnq": [1, 2, 3, 4, 8], "tnq-uniform": [1, 2, 3, 4, 8],
        "tnq-fit": [1, 2, 3, 4, 8]}
CASES = [(scheme, bits) for scheme, all_bits in BITS.items() for bits in all_bits]


def round_trip(x, scheme, bits, key=0, bucket_size=512):
    payload = core.encode(x, scheme=scheme, bits=bits, bucket_size=bucket_size, key=key)
    return core.decode(payload)[0]


@pytest.mark.parametrize("scheme, bits", CASES)
def test_tables_fit_the_bits_and_are_symmetric(scheme, bits):
    table = core.get_scheme(scheme).level_table(bits)
    assert 2 <= table.size <= 2 ** bits
    assert np.all(np.diff(table) > 0)
    np.testing.assert_array_equal(table, -table[::-1])


@pytest.mark.parametrize("scheme, bits", [("qsgd", 1), ("nuqsgd", 1), ("terngrad", 3),
                                          ("sign", 2)])
def test_unsupported_bits_are_a_clear_error(scheme, bits):
    with pytest.raises(ValueError, match="bit"):
        core.encode(np.ones(10, np.float32), scheme=scheme, bits=bits, bucket_size=8, key=0)
    with pytest.raises(ValueError, match="bit"):
        core.check_scheme_bits(scheme, bits)


def test_nuqsgd_levels_are_powers_of_two():
    np.testing.assert_array_equal(core.get_scheme("nuqsgd").level_table(3),
                                  [-1, -0.5, -0.25, 0, 0.25, 0.5, 1])


@pytest.mark.parametrize("scheme", UNBIASED)
def test_unbiased_schemes_are_unbiased_without_truncation(scheme):
    bits = BITS[scheme][0]
    x = np.random.default_rng(0).standard_t(3, 64).astype(np.float32)
    draws = 4000
    mean = np.mean([round_trip(x, scheme, bits, key=k) for k in range(draws)], axis=0)
    scale = core.bucket_statistic(x, 512, core.get_scheme(scheme).statistic)[0]
    widest = np.diff(core.get_scheme(scheme).level_table(bits)).max() * scale
    np.testing.assert_array_less(np.abs(mean - x), 5 * widest / 2 / np.sqrt(draws) + 1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_qsgd_variance_is_within_its_bound(bits):
    # Alistarh et al., Lemma 3.1: E||Q(v) - v||^2 <= min(d / s^2, sqrt(d) / s) ||v||^2
    d, s = 512, 2 ** (bits - 1) - 1
    v = np.random.default_rng(bits).normal(size=d).astype(np.float32)
    errors = [((round_trip(v, "qsgd", bits, key=k) - v) ** 2).sum() for k in range(200)]
    assert np.mean(errors) <= min(d / s ** 2, np.sqrt(d) / s) * (v.astype(np.float64) ** 2).sum()


def test_statistics_match_their_definitions():
    x = np.random.default_rng(1).normal(size=1000)
    for statistic, expected in (("mean_abs", np.abs(x[:512]).mean()),
                                ("l2", np.linalg.norm(x[:512])),
                                ("max_abs", np.abs(x[:512]).max())):
        assert core.bucket_statistic(x, 512, statistic)[0] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="unknown statistic"):
        core.bucket_statistic(x, 512, "median")


def test_tnq_beats_the_baselines_on_laplace_data():
    x = np.random.default_rng(2).laplace(size=100_000).astype(np.float32)
    norm = (x.astype(np.float64) ** 2).sum()
    for bits in (2, 3, 4):
        errors = {scheme: ((round_trip(x, scheme, bits) - x) ** 2).sum() / norm
                  for scheme, all_bits in BITS.items() if bits in all_bits}
        assert min(errors, key=errors.get) in ("tnq", "tnq-fit"), (bits, errors)
        assert errors["tnq-fit"] <= errors["tnq"] * 1.01, (bits, errors)


def test_expected_error_matches_monte_carlo():
    from horovod_tnq.core.quantize import expected_error
    x = np.random.default_rng(4).standard_t(3, 512).astype(np.float32)
    table = core.tnq_levels(3)
    scale = core.bucket_statistic(x, 512)
    exact = expected_error(x.astype(np.float64)[None, :], scale, table.astype(np.float64))[0]
    sampled = np.mean([((round_trip(x, "tnq", 3, key=k) - x) ** 2).sum() for k in range(2000)])
    assert sampled == pytest.approx(exact, rel=0.02)


@pytest.mark.parametrize("source", ["standard_t", "laplace"])
def test_fitted_scales_are_never_worse_and_close_to_a_fine_grid_search(source):
    from horovod_tnq.core.quantize import expected_error, fit_scales
    rng = np.random.default_rng(5)
    x = (getattr(rng, source)(*([3] if source == "standard_t" else []), size=64 * 256)
         .astype(np.float32))
    rows = x.astype(np.float64).reshape(64, 256)
    table = core.tnq_levels(4).astype(np.float64)
    closed = core.bucket_statistic(x, 256)
    fitted = fit_scales(x, 256, table, closed)
    fitted_error = expected_error(rows, fitted, table)
    assert np.all(fitted_error <= expected_error(rows, closed, table))
    grid = closed[None, :] * 2.0 ** np.linspace(-2, 7, 400)[:, None]
    best = np.min([expected_error(rows, g, table) for g in grid], axis=0)
    assert fitted_error.sum() <= 1.02 * best.sum()
