"""Sparse TNQ (core/tnq_sparse.py): level shapes, the exact error, the choice, budget, payload."""

import math

import numpy as np
import pytest

from horovod_tnq import core
from horovod_tnq.core import tnq_sparse, topk
from reference import cell_masses_by_quadrature, sparse_error_reference, topk_error_reference


def encode(x, bits, key=0, step=0):
    return core.encode(x, scheme="tnq-sparse", bits=bits, bucket_size=512, key=key, step=step)


def prefix(payload):
    header = core.read_header(payload)
    return tnq_sparse.PREFIX.unpack_from(payload, core.HEADER.size + 12 * header.num_exceptions)


def exact_error(x, payload):
    """The slow reference's expected error of the choice this payload made."""
    k, _, q, _, shape, lo, width = prefix(payload)
    return sparse_error_reference(x, k, tnq_sparse.levels(lo, width, q, shape))


def sources(n, seed=0):
    rng = np.random.default_rng(seed)
    return {"laplace": rng.laplace(size=n), "student_t2": rng.standard_t(2, n),
            "sparse": rng.laplace(size=n) * (rng.random(n) < 0.05),
            "normal": rng.normal(size=n)}


@pytest.mark.parametrize("q", tnq_sparse.VALUE_BITS)
def test_unit_shapes_are_equal_masses_of_the_cube_root_density(q):
    """Every shape cuts [0, 1] into equal masses of lambda ~ p^(1/3) for a generalized Pareto
    tail (module docstring), checked by quadrature; ends at 0 and 1, strictly increasing."""
    tables = tnq_sparse.unit_tables(q)
    assert tables.shape == (len(tnq_sparse.SHAPES), 1 << (q - 1))
    for (xi, gap), table in zip(tnq_sparse.SHAPES, tables):
        assert table[0] == 0.0 and table[-1] == 1.0 and np.all(np.diff(table) > 0)
        if gap == 1.0:
            def density(u):
                return 1.0
        elif xi == 0.0:
            def density(u):
                return math.exp(-math.log(gap) * u)
        else:
            k = (1 + xi) / (3 * xi)
            rho = gap ** (1 / k) - 1

            def density(u):
                return (1 + rho * u) ** -k
        masses = cell_masses_by_quadrature(density, table)
        np.testing.assert_allclose(masses, masses.mean(), rtol=1e-5)
        assert density(0.0) / density(1.0) == pytest.approx(gap)


def test_exponential_tail_closed_form_bound_and_grid():
    """On exponential exceedances (a Laplace gradient's kept tail) the xi = 0 closed form,
    alpha* = lo + 3 sigma ln(1 + S / c'), G* = 1 + S / c', keeps the error per kept element
    below 27 sigma^2 / (4 (S + c')^2); the grid holds G* within a factor 2 for every q."""
    c = 3 * math.sqrt(6) / 4
    rng = np.random.default_rng(1)
    sigma, lo = 0.7, 2.0
    kept = lo + rng.exponential(sigma, 20_000)
    kept[0] = lo
    for q in tnq_sparse.VALUE_BITS:
        cells = (1 << (q - 1)) - 1
        gap = 1 + cells / c
        grid = [g for xi, g in tnq_sparse.SHAPES if xi == 0.0]
        assert min(max(g / gap, gap / g) for g in grid + [1.0]) <= 2.0
        table = lo + 3 * sigma * math.log1p(cells / c) * tnq_sparse.unit_levels(
            cells + 1, 0.0, gap)
        error = sparse_error_reference(kept, kept.size, table) / kept.size
        assert error <= 27 * sigma ** 2 / (4 * (cells + c) ** 2), q


def test_table_errors_equal_the_slow_reference():
    rng = np.random.default_rng(2)
    x = rng.standard_t(3, 2000)
    ascending = np.sort(np.abs(x))
    p1, p2 = tnq_sparse.prefix_sums(ascending)
    for k, q in ((1, 2), (300, 3), (1999, 8), (2000, 5)):
        start = 2000 - k
        lo, hi = ascending[start], ascending[-1]
        w = tnq_sparse.widths(np.array([lo]), hi)[0]
        tables = np.array([[tnq_sparse.levels(lo, width, q, shape) for width in w]
                           for shape in range(len(tnq_sparse.SHAPES))]).reshape(1, -1, 1 << (q - 1))
        fast = tnq_sparse.table_errors(ascending, p1, p2, np.array([start]), tables)[0]
        for table, error in list(zip(tables[0], fast))[::7]:
            slow = sparse_error_reference(x, k, table) - float(np.sum(ascending[:start] ** 2))
            assert error == pytest.approx(slow, rel=1e-9, abs=1e-9 * p2[-1])


@pytest.mark.parametrize("source", ["laplace", "student_t2", "sparse"])
def test_choice_is_the_smallest_error_and_more_budget_never_does_worse(source):
    x = sources(1500, seed=3)[source].astype(np.float32)
    ascending = np.sort(np.abs(x.astype(np.float64)))
    previous = np.inf
    for bits in range(1, 9):
        payload = encode(x, bits)
        chosen = exact_error(x, payload)
        # against a sample of the other candidates, by the slow reference
        for q, ks in tnq_sparse.candidates(x.size, bits)[::3]:
            for k in ks[::4]:
                k = k if k == x.size else min(k, np.count_nonzero(x))
                lo, hi = ascending[x.size - k], ascending[-1]
                for shape in (0, 7, 20):
                    table = tnq_sparse.levels(lo, tnq_sparse.widths(np.array([lo]), hi)[0][2],
                                              q, shape)
                    assert chosen <= sparse_error_reference(x, k, table) * (1 + 1e-9)
        assert chosen <= previous * (1 + 1e-9), bits
        previous = chosen


def test_kept_elements_are_the_largest_and_decode_within_their_cell():
    x = np.random.default_rng(4).laplace(size=20_000).astype(np.float32)
    payload = encode(x, 3)
    k, _, q, _, shape, lo, width = prefix(payload)
    decoded = core.decode(payload)[0]
    kept = np.flatnonzero(decoded)
    assert 0 < kept.size == k < x.size
    np.testing.assert_array_equal(np.sort(kept), np.sort(np.argsort(-np.abs(x))[:k]))
    table = tnq_sparse.levels(lo, width, q, shape)
    truncated = np.minimum(np.abs(x[kept]), table[-1])
    cell = np.searchsorted(table, truncated, side="right").clip(1, table.size - 1)
    assert np.all(np.abs(decoded[kept]) >= table[cell - 1] - 1e-12)
    assert np.all(np.abs(decoded[kept]) <= table[cell] + 1e-12)
    assert np.all(np.sign(decoded[kept]) == np.sign(x[kept]))


def test_expected_error_matches_monte_carlo():
    x = np.random.default_rng(5).standard_t(3, 3000).astype(np.float32)
    exact = exact_error(x, encode(x, 2))
    sampled = np.mean([((core.decode(encode(x, 2, key=key))[0] - x) ** 2).sum()
                       for key in range(300)])
    assert sampled == pytest.approx(exact, rel=0.03)


def test_rounding_is_unbiased_below_the_threshold_and_truncates_above():
    x = np.random.default_rng(6).laplace(size=2048).astype(np.float32)
    k, _, q, _, shape, lo, width = prefix(encode(x, 2))
    table = tnq_sparse.levels(lo, width, q, shape)
    kept = np.sort(np.abs(x.astype(np.float64)))[-k:]
    assert np.sum(kept > table[-1]) > 0 and np.sum(kept < table[-1]) > 100
    draws = 4000
    noise = np.random.default_rng(0).random((draws, k))
    decoded = table[tnq_sparse.round_magnitudes(np.tile(kept, draws), table,
                                                noise.reshape(-1)).reshape(draws, k)]
    spread = np.max(np.diff(table))
    np.testing.assert_array_less(np.abs(decoded.mean(0) - np.minimum(kept, table[-1])),
                                 5 * spread / 2 / np.sqrt(draws) + 1e-12)
    assert np.all(decoded[:, kept >= table[-1]] == table[-1])


def test_the_fitted_tail_shape_follows_the_data():
    """Laplace exceedances are exponential (xi = 0), Student-t(2)'s have xi = 1/2."""
    rng = np.random.default_rng(7)
    for x, xi in ((rng.laplace(size=100_000), 0.0), (rng.standard_t(2, 100_000), 0.5)):
        for bits in (2, 4):
            shape = prefix(encode(x.astype(np.float32), bits))[4]
            assert tnq_sparse.SHAPES[shape][0] == xi


def test_lower_error_than_topk_at_the_same_budget():
    for name, x in sources(30_000, seed=8).items():
        x = x.astype(np.float32)
        for bits in (2, 3, 4):
            mine = exact_error(x, encode(x, bits))
            k, _, q, _, _, _ = topk.PREFIX.unpack_from(
                core.encode(x, scheme="topk", bits=bits, bucket_size=512, key=0), core.HEADER.size)
            assert mine < topk_error_reference(x, k, q), (name, bits)


def test_dense_payload_has_no_indices_and_codes_zeros_exactly():
    rng = np.random.default_rng(9)
    n = 4096
    signs = np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32)
    payload = encode(signs, 3)  # every magnitude equal: all n sent exactly, 2-bit values
    k, length, q, r, _, lo, width = prefix(payload)
    assert (k, length, q, r) == (n, 0, 2, 0) and lo == 1.0
    assert payload.size == topk.FIXED_BYTES + n * 2 // 8
    np.testing.assert_array_equal(core.decode(payload)[0], signs)
    assert prefix(encode(signs, 2))[0] < n  # at 2 bits the dense payload does not fit
    with_zeros = signs * (rng.random(n) < 0.7)
    decoded = core.decode(encode(with_zeros, 3))[0]
    np.testing.assert_array_equal(decoded, with_zeros)


def test_decode_sum_adds_sparse_contributions_of_every_rank():
    rng = np.random.default_rng(10)
    inputs = (rng.laplace(size=6000), rng.standard_t(2, 6000), rng.normal(size=6000))
    parts = [encode(x.astype(np.float32), 2, key=r) for r, x in enumerate(inputs)]
    assert len({p.size for p in parts}) == 3
    total, count = core.decode_sum(np.concatenate(parts), core.read_header(parts[0]))
    assert count == 3
    np.testing.assert_array_equal(total, sum(core.decode(p)[0] for p in parts))
    with pytest.raises(core.PayloadError, match="scheme_id"):
        core.decode_sum(np.concatenate([parts[0], core.encode(
            inputs[0].astype(np.float32), scheme="topk", bits=2, bucket_size=512, key=0)]),
            core.read_header(parts[0]))


def test_corrupted_payloads_are_reported():
    """(The byte budget, truncation, non-finite values and other dtypes are tested for both
    sparse schemes in tests/test_core_topk.py.)"""
    payload = encode(np.random.default_rng(12).laplace(size=4000).astype(np.float32), 2)
    for offset, value in ((16, 9), (18, len(tnq_sparse.SHAPES))):  # q, shape
        bad = payload.copy()
        bad[core.HEADER.size + offset] = value
        with pytest.raises(core.PayloadError, match="invalid tnq-sparse payload prefix"):
            core.decode(bad)
    bad = payload.copy()
    bad[core.HEADER.size + 39] = 0xFF  # w negative (sign bit of the float64)
    with pytest.raises(core.PayloadError, match="invalid tnq-sparse payload prefix"):
        core.decode(bad)
