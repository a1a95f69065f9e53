"""The schemes beside TNQ: tables, unbiasedness, optimality conditions, variance bounds, bits."""

import numpy as np
import pytest

from horovod_tnq import core
from horovod_tnq.core import fitting
from horovod_tnq.core.quantize import expected_error
from reference import best_inner_level_reference, level_cost_reference

UNBIASED = ["qsgd", "qsgdinf", "nuqsgd", "terngrad", "sign", "maxmin", "orq"]
BITS = {"qsgd": [2, 3, 4, 8], "qsgdinf": [2, 3, 4, 8], "nuqsgd": [2, 3, 4, 8],
        "terngrad": [2], "sign": [1], "tnq": [1, 2, 3, 4, 8], "tnq-uniform": [1, 2, 3, 4, 8],
        "tnq-fit": [1, 2, 3, 4, 8], "tnq-opt": [1, 2, 3, 4, 8], "maxmin": [1, 2, 3, 4, 8],
        "orq": [2, 3, 4, 8], "bingrad": [1], "tnq-rht": [1, 2, 3, 4, 8]}
CASES = [(scheme, bits) for scheme, all_bits in BITS.items() for bits in all_bits]


# schemes with payloads or widths of their own (topk, dp-binomial, dqsgd) have their own tests
LEVEL_TABLE_SCHEMES = [name for name, scheme in core.SCHEMES.items()
                       if scheme.body is None and scheme.choose_bits is None]


def test_every_scheme_is_covered():
    assert set(BITS) == set(LEVEL_TABLE_SCHEMES)


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
                                          ("sign", 2), ("orq", 1), ("bingrad", 2)])
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
    # one bucket per draw: every bucket gets the same parameters (and ORQ the same table as for
    # x alone), and each element its own random draw
    copies = round_trip(np.tile(x, draws), scheme, bits, bucket_size=x.size)
    mean = copies.reshape(draws, x.size).mean(axis=0)
    fit = core.codec.fit_buckets(core.get_scheme(scheme), x, x.size, bits)
    widest = np.diff(fit.table).max() * np.abs(fit.scales[0])
    np.testing.assert_array_less(np.abs(mean - x), 5 * widest / 2 / np.sqrt(draws) + 1e-6)


@pytest.mark.parametrize("scheme", LEVEL_TABLE_SCHEMES)
def test_zeros_constants_and_edge_sizes(scheme):
    bits = next(b for b in (3, 2, 1) if core.supports(scheme, b))
    assert np.all(round_trip(np.zeros(1000, np.float32), scheme, bits, bucket_size=128) == 0)
    constant = np.full(4096, -0.25, np.float32)
    decoded = round_trip(constant, scheme, bits)
    fit = core.codec.fit_buckets(core.get_scheme(scheme), constant, 512, bits)
    widest = np.diff(fit.table).max() * np.abs(fit.scales).max()
    assert abs(decoded.mean() + 0.25) <= 5 * widest / 2 / np.sqrt(constant.size) + 1e-6
    if scheme in ("maxmin", "bingrad", "tnq-opt"):  # a level lands on the constant itself
        assert np.all(decoded == -0.25)
    assert round_trip(np.zeros(0, np.float32), scheme, bits).size == 0
    one = round_trip(np.array([3.5], np.float32), scheme, bits)
    assert np.isfinite(one).all() and one[0] > 0


def test_maxmin_levels_span_each_buckets_min_to_max():
    x = np.random.default_rng(6).normal(size=3000).astype(np.float32) + 5.0
    decoded = round_trip(x, "maxmin", 2, bucket_size=1000)
    for part, seen in zip(x.reshape(3, 1000), decoded.reshape(3, 1000)):
        levels = part.min() + (part.max() - part.min()) * np.arange(4) / 3
        np.testing.assert_allclose(np.unique(seen), levels, rtol=1e-6)
    payload = core.encode(x, scheme="maxmin", bits=2, bucket_size=1000, key=0)
    assert payload.size == core.HEADER.size + 2 * 3 * 4 + 3000 * 2 // 8


def test_bingrad_meets_the_binary_optimal_condition():
    """Each bucket's two levels are the means of the values sent to them, every value goes to the
    nearer level (Xu et al.'s binary condition), and no other split of the bucket does better."""
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.standard_t(3, 512), rng.laplace(size=512) + 2.0]).astype(np.float32)
    decoded = round_trip(x, "bingrad", 1, bucket_size=512)
    for part, seen in ((x[:512], decoded[:512]), (x[512:], decoded[512:])):
        low, high = np.unique(seen)
        assert part[seen == low].mean() == pytest.approx(low, rel=1e-5, abs=1e-6)
        assert part[seen == high].mean() == pytest.approx(high, rel=1e-5, abs=1e-6)
        nearer = np.where(np.abs(part - low) < np.abs(part - high), low, high)
        assert np.mean(nearer == seen) > 0.999
        # the best of all splits of the sorted values, each side at its mean
        ordered = np.sort(part.astype(np.float64))
        best = min(((ordered[:k] - ordered[:k].mean()) ** 2).sum() +
                   ((ordered[k:] - ordered[k:].mean()) ** 2).sum() for k in range(1, 512))
        assert ((seen - part) ** 2).sum() == pytest.approx(best, rel=1e-6)
    x = np.array([1.5, -2.0, 0.25], np.float32)
    np.testing.assert_array_equal(round_trip(x, "bingrad", 1, bucket_size=1), x)


def sample_and_fit(scheme, x, bits, bucket_size=256):
    fit = core.codec.fit_buckets(core.get_scheme(scheme), x, bucket_size, bits)
    values, weights = fitting.normalised_sample(x, bucket_size, fit.scales)
    return fit, values.astype(np.float64), weights


@pytest.mark.parametrize("scheme, bits", [("orq", 2), ("orq", 3), ("tnq-opt", 3)])
def test_fitted_levels_are_each_the_best_between_their_neighbours(scheme, bits):
    """The levels updated last in fit_level_table (even positions) are, given their final
    neighbours, the best value-weighted choice by exhaustive search (tests/reference.py)."""
    x = np.random.default_rng(bits).standard_t(3, 768).astype(np.float32)
    fit, values, weights = sample_and_fit(scheme, x, bits)
    table = fit.table.astype(np.float64)
    for i in range(2, table.size - 1, 2):
        best, best_cost = best_inner_level_reference(values, weights, table[i - 1], table[i + 1])
        cost = level_cost_reference(values, weights, table[i - 1], table[i], table[i + 1])
        assert cost <= best_cost * (1 + 1e-9), (i, table[i], best)


def test_tnq_opt_top_level_is_the_best_truncation_threshold():
    x = np.random.default_rng(8).standard_t(2.5, 768).astype(np.float32)
    fit, values, weights = sample_and_fit("tnq-opt", x, 3)
    table = fit.table.astype(np.float64)
    below = table[-2]
    cost = level_cost_reference(values, weights, below, table[-1], None, truncate_above=True)
    grid = np.concatenate([np.linspace(below, values.max(), 500)[1:], values[values > below]])
    costs = [level_cost_reference(values, weights, below, b, None, truncate_above=True)
             for b in grid]
    assert cost <= min(costs) * (1 + 1e-6)


def test_orq_keeps_the_end_levels_and_beats_uniform_levels():
    x = np.random.default_rng(9).standard_t(3, 20_000).astype(np.float32)
    fit = core.codec.fit_buckets(core.get_scheme("orq"), x, 512, 3)
    assert fit.table[0] == -1 and fit.table[-1] == 1
    rows = np.zeros((40, 512))
    rows.reshape(-1)[: x.size] = x
    uniform = core.maxmin_levels(3).astype(np.float64)
    assert expected_error(rows, fit.scales, fit.table.astype(np.float64)).sum() < \
        0.6 * expected_error(rows, fit.scales, uniform).sum()


@pytest.mark.parametrize("source", ["standard_t", "laplace", "skewed"])
def test_tnq_opt_improves_on_tnq_fit(source):
    """Each step of tnq-opt lowers the expected error on the values it fits (no sampling below
    FIT_SAMPLE elements), so it ends at or below tnq-fit, and well below it on heavy tails and
    on buckets of one sign."""
    rng = np.random.default_rng(10)
    x = {"standard_t": lambda: rng.standard_t(3, 40_000),
         "laplace": lambda: rng.laplace(size=40_000),
         "skewed": lambda: rng.exponential(size=40_000) * rng.choice([-1, 1], 40_000 // 500
                                                                      ).repeat(500)}[source]()
    x = x.astype(np.float32)
    rows = np.zeros((79, 512))
    rows.reshape(-1)[: x.size] = x
    errors = {}
    for scheme in ("tnq-fit", "tnq-opt"):
        fit = core.codec.fit_buckets(core.get_scheme(scheme), x, 512, 4)
        signs = np.where(fit.scales < 0, -1.0, 1.0)
        errors[scheme] = expected_error(rows * signs[:, None], np.abs(fit.scales),
                                        fit.table.astype(np.float64)).sum()
    assert errors["tnq-opt"] <= errors["tnq-fit"] * (1 + 1e-6)
    if source != "laplace":
        assert errors["tnq-opt"] < 0.8 * errors["tnq-fit"], errors


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
        assert min(errors, key=errors.get) in ("tnq-rht", "tnq", "tnq-fit", "tnq-opt"), \
            (bits, errors)
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


@pytest.mark.parametrize("bucket_size", [32, 64])
@pytest.mark.parametrize("bits", [2, 4])
def test_tnq_opt_decodes_its_own_payloads_on_spiky_gradients(bucket_size, bits):
    # buckets of ~1e-9 beside buckets holding a 1.0: weights 18 orders of magnitude apart
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(2000) * 1e-9).astype(np.float32)
    x[::97] = 1.0
    for reference in (True, False):
        payload = core.encode(x, scheme="tnq-opt", bits=bits, bucket_size=bucket_size, key=1,
                              reference=reference)
        decoded = core.decode(payload)[0]
        assert np.all(np.isfinite(decoded)) and abs(decoded[0] - 1.0) < 0.5
