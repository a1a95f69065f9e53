"""Adaptive Top-K (core/topk.py): budget, choice of (K, q), index coding, values, decoding; the
budget, zeros, truncation, non-finite values and dtypes also for sparse TNQ (SPARSE_SCHEMES)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from horovod_tnq import core
from horovod_tnq.core import topk
from reference import topk_error_reference


def encode(x, bits, key=0, step=0, scheme="topk"):
    return core.encode(x, scheme=scheme, bits=bits, bucket_size=512, key=key, step=step)


def prefix(payload):
    header = core.read_header(payload)
    return topk.PREFIX.unpack_from(payload, core.HEADER.size + 12 * header.num_exceptions)


# what holds for both sparse schemes (Top-K and tnq-sparse, tests/test_core_tnq_sparse.py)
SPARSE_SCHEMES = ["topk", "tnq-sparse"]


@pytest.mark.parametrize("scheme", SPARSE_SCHEMES)
@pytest.mark.parametrize("n", [1024, 5000, 65_537])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_payload_never_exceeds_the_budget(n, bits, scheme):
    rng = np.random.default_rng(n + bits)
    for x in (rng.laplace(size=n), rng.standard_t(2, n), np.where(rng.random(n) < 0.1, 1.0, 0.0),
              rng.normal(size=n), np.ones(n), np.zeros(n)):
        payload = encode(x.astype(np.float32), bits, scheme=scheme)
        assert payload.size <= bits * n // 8
        assert core.decode(payload)[2] == payload.size


def test_kept_elements_are_the_largest_and_the_rest_is_zero():
    x = np.random.default_rng(1).laplace(size=20_000).astype(np.float32)
    payload = encode(x, 3)
    k, _, q, _, lo, hi = prefix(payload)
    decoded = core.decode(payload)[0]
    kept = np.flatnonzero(decoded)
    assert kept.size == k > 0
    np.testing.assert_array_equal(np.sort(kept), np.sort(np.argsort(-np.abs(x))[:k]))
    cell = (hi - lo) / (2 ** (q - 1) - 1)
    assert np.all(np.abs(decoded[kept] - x[kept]) <= cell * (1 + 1e-9))
    assert np.all(np.sign(decoded[kept]) == np.sign(x[kept]))


def test_max_k_is_the_largest_k_that_fits_for_some_rice_width():
    for n, bits in ((1000, 1), (4096, 2), (10_000, 3), (100_000, 8)):
        budget = bits * n // 8
        for q in topk.VALUE_BITS:
            k = topk.max_k(n, bits, q)
            fits = [topk.worst_case_bytes(n, k, q, r) <= budget for r in topk.RICE_WIDTHS]
            assert k == 0 or any(fits)
            if k < n:
                assert not any(topk.worst_case_bytes(n, k + 1, q, r) <= budget
                               for r in topk.RICE_WIDTHS)


@pytest.mark.parametrize("source", ["laplace", "student_t", "sparse"])
def test_choice_minimises_the_exact_error_over_the_candidates(source):
    rng = np.random.default_rng(3)
    n = 3000
    x = {"laplace": rng.laplace(size=n), "student_t": rng.standard_t(2, n),
         "sparse": rng.laplace(size=n) * (rng.random(n) < 0.05)}[source].astype(np.float32)
    nonzero = np.count_nonzero(x)
    previous = np.inf
    for bits in (1, 2, 3, 4, 8):
        magnitudes = np.sort(np.abs(x).astype(np.float64))[::-1]
        k, q = topk.choose(magnitudes, n, bits)
        candidates = topk.candidates(n, bits)
        assert {w for _, w in candidates} == set(topk.VALUE_BITS)
        assert all(k_c <= topk.max_k(n, bits, w) for k_c, w in candidates)
        errors = [topk_error_reference(x, min(k_c, nonzero), w) for k_c, w in candidates]
        chosen = topk_error_reference(x, k, q)
        assert chosen <= min(errors) * (1 + 1e-9), (bits, k, q)
        assert chosen <= previous * (1 + 1e-9)  # more budget never does worse
        previous = chosen


def test_expected_error_matches_monte_carlo():
    x = np.random.default_rng(4).standard_t(3, 4000).astype(np.float32)
    k, _, q, _, _, _ = prefix(encode(x, 2))
    exact = topk_error_reference(x, k, q)
    sampled = np.mean([((core.decode(encode(x, 2, key=key))[0] - x) ** 2).sum()
                       for key in range(400)])
    assert sampled == pytest.approx(exact, rel=0.03)


def test_kept_values_are_unbiased():
    x = np.random.default_rng(5).laplace(size=2048).astype(np.float32)
    draws = np.array([core.decode(encode(x, 2, key=key))[0] for key in range(3000)])
    kept = draws[0] != 0
    k, _, q, _, lo, hi = prefix(encode(x, 2))
    cell = (hi - lo) / (2 ** (q - 1) - 1)
    np.testing.assert_array_less(np.abs(draws.mean(0)[kept] - x[kept]),
                                 5 * cell / 2 / np.sqrt(draws.shape[0]) + 1e-9)


def test_k_follows_the_shape_of_the_gradient():
    rng = np.random.default_rng(6)
    n = 50_000
    flat = rng.normal(size=n).astype(np.float32)
    concentrated = flat * (rng.random(n) < 0.02) * 100 + flat * 0.01
    k_flat, _, q_flat, _, _, _ = prefix(encode(flat, 4))
    k_peaked, _, q_peaked, _, _, _ = prefix(encode(concentrated.astype(np.float32), 4))
    assert k_peaked < k_flat and q_peaked > q_flat


@pytest.mark.parametrize("scheme", SPARSE_SCHEMES)
def test_zeros_are_never_sent(scheme):
    x = np.zeros(10_000, np.float32)
    x[[3, 500, 9999]] = [1.0, -2.0, 0.5]
    payload = encode(x, 4, scheme=scheme)
    assert prefix(payload)[0] == 3  # K, first in both prefixes
    np.testing.assert_allclose(core.decode(payload)[0], x)
    empty = encode(np.zeros(5000, np.float32), 2, scheme=scheme)
    assert prefix(empty)[0] == 0
    np.testing.assert_array_equal(core.decode(empty)[0], 0.0)


@given(st.integers(1, 3000).flatmap(
    lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1), max_size=n))),
    st.sampled_from(topk.RICE_WIDTHS))
@settings(max_examples=200, deadline=None)
def test_index_coding_round_trips_within_the_worst_case(case, r):
    n, chosen = case
    indices = np.array(sorted(chosen), dtype=np.int64)
    remainders, unary, length = topk.encode_indices(indices, r)
    np.testing.assert_array_equal(
        topk.decode_indices(remainders, unary, length, indices.size, r, n), indices)
    if indices.size:
        bytes_used = remainders.size + unary.size
        assert bytes_used <= topk.worst_case_bytes(n, indices.size, 2, r) - topk.FIXED_BYTES - \
            topk.packed_bytes(indices.size, 2)


def test_rice_parameter_is_the_cheapest():
    indices = np.sort(np.random.default_rng(7).choice(100_000, 900, replace=False))
    gaps = np.diff(indices, prepend=-1) - 1
    best = topk.rice_parameter(gaps)
    sizes = {r: sum(part.size for part in topk.encode_indices(indices, r)[:2])
             for r in topk.RICE_WIDTHS}
    assert sizes[best] == min(sizes.values())
    assert 5 <= best <= 8  # about log2(n / K)


def test_decode_sum_adds_sparse_contributions_of_every_rank():
    rng = np.random.default_rng(8)
    inputs = (rng.laplace(size=6000), rng.standard_t(2, 6000), rng.normal(size=6000))
    parts = [encode(x.astype(np.float32), 2, key=r) for r, x in enumerate(inputs)]
    assert len({p.size for p in parts}) == 3  # each rank chose its own K: uneven payloads
    total, count = core.decode_sum(np.concatenate(parts), core.read_header(parts[0]))
    assert count == 3
    np.testing.assert_array_equal(total, sum(core.decode(p)[0] for p in parts))
    other_budget = encode(rng.laplace(size=6000).astype(np.float32), 3)
    with pytest.raises(core.PayloadError, match="bits"):
        core.decode_sum(np.concatenate([parts[0], other_budget]), core.read_header(parts[0]))


@pytest.mark.parametrize("scheme", SPARSE_SCHEMES)
def test_non_finite_values_are_carried(scheme):
    x = np.random.default_rng(9).laplace(size=4000).astype(np.float32)
    x[[7, 11]] = [np.nan, -np.inf]
    decoded = core.decode(encode(x, 2, scheme=scheme))[0]
    assert np.isnan(decoded[7]) and decoded[11] == -np.inf
    assert np.isfinite(np.delete(decoded, [7, 11])).all()


@pytest.mark.parametrize("scheme", SPARSE_SCHEMES)
def test_truncated_payloads_are_reported(scheme):
    payload = encode(np.random.default_rng(10).laplace(size=4000).astype(np.float32), 2,
                     scheme=scheme)
    with pytest.raises(core.PayloadError, match="truncated"):
        core.decode(payload[:-3])
    with pytest.raises(core.PayloadError, match="truncated"):
        core.decode(payload[:40])


def test_corrupted_payloads_are_reported():
    payload = encode(np.random.default_rng(10).laplace(size=4000).astype(np.float32), 2)
    bad = payload.copy()
    bad[core.HEADER.size + 16] = 9  # q
    with pytest.raises(core.PayloadError, match="invalid top-k payload prefix"):
        core.decode(bad)
    bad = payload.copy()
    k = prefix(payload)[0]
    bad[core.HEADER.size: core.HEADER.size + 8] = np.frombuffer(np.uint64(k - 1).tobytes(),
                                                               np.uint8)
    with pytest.raises(core.PayloadError):
        core.decode(bad)


@pytest.mark.parametrize("scheme", SPARSE_SCHEMES)
def test_float64_and_half_precision_inputs(scheme):
    x = np.random.default_rng(11).laplace(size=3000)
    for dtype in (np.float64, np.float16):
        payload = encode(x.astype(dtype), 4, scheme=scheme)
        header = core.read_header(payload)
        assert header.dtype_name == np.dtype(dtype).name
        decoded = core.decode(payload)[0]
        assert ((decoded - x) ** 2).sum() < 0.1 * (x ** 2).sum()
