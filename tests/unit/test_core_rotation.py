"""The rotated scheme "tnq-rht": the transform, its level tables, unbiasedness, error bounds,
and the same bytes from the numpy reference and both compiled vector paths."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from horovod_tnq import core
from horovod_tnq.core import levels, native, rotation

# Lloyd-Max distortion of N(0, 1) at 1-4 bits (Max, 1960)
LLOYD_MAX_DISTORTION = {1: 0.3634, 2: 0.1175, 3: 0.03455, 4: 0.009497}


def table(bits):
    """The unit level table of tnq-rht at ``bits``."""
    return core.codec.level_table(core.SCHEMES["tnq-rht"].scheme_id, bits)


def nmse(decoded, x):
    x = x.astype(np.float64)
    return float(((decoded - x) ** 2).sum() / (x ** 2).sum())


def round_trip(x, bits, key=0, bucket_size=512, step=0, reference=False):
    payload = core.encode(x, scheme="tnq-rht", bits=bits, bucket_size=bucket_size, key=key,
                          step=step, reference=reference)
    return core.decode(payload)[0]


@pytest.mark.parametrize("n", [1, 2, 8, 64, 1024])
def test_hadamard_is_orthogonal_up_to_n_and_its_own_inverse(n):
    x = np.random.default_rng(n).normal(size=(3, n))
    once = rotation.hadamard(x.copy())
    assert np.allclose((once ** 2).sum(axis=1), n * (x ** 2).sum(axis=1))
    assert np.allclose(rotation.hadamard(once.copy()) / n, x)
    dense = rotation.hadamard(np.eye(n))
    assert np.array_equal(dense, dense.T) and set(np.unique(dense)) <= {-1.0, 1.0}


def test_rotation_round_trip_and_signs_differ_by_key_and_step():
    x = np.random.default_rng(0).normal(size=1000).astype(np.float64)
    rows = rotation.rotate(x, 256, key=7, step=3)
    assert rows.shape == (4, 256)
    back = rotation.unrotate(rows.copy() / 256, key=7, step=3)
    assert np.allclose(back[:1000], x) and np.allclose(back[1000:], 0, atol=1e-12)
    base = rotation.signs(4096, 7, 3)
    assert set(np.unique(base)) == {-1.0, 1.0} and abs(base.mean()) < 0.1
    for other in (rotation.signs(4096, 8, 3), rotation.signs(4096, 7, 4)):
        assert 0.4 < np.mean(other != base) < 0.6


@pytest.mark.parametrize("bits", range(1, 9))
def test_gaussian_tables_satisfy_lloyd_max_conditions(bits):
    unit = table(bits).astype(np.float64)
    assert unit.size == 1 << bits and np.all(np.diff(unit) > 0)
    assert np.array_equal(unit, -unit[::-1])
    # each level is the mean of N(0, 1) over its cell, whose edges are the midpoints
    edges = np.concatenate([[-np.inf], (unit[1:] + unit[:-1]) / 2, [np.inf]])
    mass, first = levels.gaussian_cell_moments(edges)
    assert np.allclose(first / mass, unit, atol=1e-5)
    if bits in LLOYD_MAX_DISTORTION:
        assert levels.gaussian_distortion(unit) == pytest.approx(LLOYD_MAX_DISTORTION[bits],
                                                                 rel=1e-3)
    # Panter-Dite: distortion ~ (sqrt(3) pi / 2) 4^-bits for many levels
    if bits >= 6:
        assert levels.gaussian_distortion(unit) == pytest.approx(
            np.sqrt(3) * np.pi / 2 * 4.0 ** -bits, rel=0.1)
    if bits <= 5:  # the shipped literals are the solver's result (8 bits takes a minute)
        assert np.allclose(levels.lloyd_max_gaussian(bits), unit, rtol=0, atol=1e-6)


SOURCES = {
    "gaussian": lambda rng, n: rng.normal(size=n),
    "student_t3": lambda rng, n: rng.standard_t(3, n),
    "outliers_per_row": lambda rng, n: (rng.normal(size=(n // 256, 256)) *
                                        rng.lognormal(0, 2, size=(n // 256, 1))).ravel() +
    np.where(rng.random(n) < 1e-3, 100.0, 0.0),
    "sparse": lambda rng, n: np.where(rng.random(n) < 0.01, rng.normal(size=n), 0.0),
}


@pytest.mark.parametrize("source", sorted(SOURCES))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_error_is_near_edens_on_every_source(source, bits):
    x = SOURCES[source](np.random.default_rng(bits), 1 << 16).astype(np.float32)
    distortion = levels.gaussian_distortion(table(bits))
    # EDEN's vNMSE for a rotated Gaussian block is about D / (1 - D); allow 25% (50% at 8
    # bits, where float32 rounding starts to show) for blocks of 512 that are not exactly
    # Gaussian
    allowance = 1.5 if bits == 8 else 1.25
    assert nmse(round_trip(x, bits), x) <= allowance * distortion / (1 - distortion), source
    if bits == 8:
        assert nmse(round_trip(x, bits), x) <= 1e-4


def test_mean_of_draws_has_no_floor():
    """Unbiased over the random rotation: the error of the mean of K draws falls like 1/K."""
    x = np.random.default_rng(5).standard_t(3, 1 << 13).astype(np.float32)
    draws = [round_trip(x, 4, key=key) for key in range(64)]
    one = np.mean([nmse(d, x) for d in draws])
    assert nmse(np.mean(draws, axis=0), x) * len(draws) <= 2 * one
    # the closed-form TNQ's truncation bias stays: its mean of draws keeps most of one error
    tnq = [core.decode(core.encode(x, scheme="tnq", bits=4, bucket_size=512, key=key))[0]
           for key in range(64)]
    assert nmse(np.mean(tnq, axis=0), x) > 0.5 * np.mean([nmse(d, x) for d in tnq])


def test_special_values_and_shapes():
    x = np.zeros(3000, dtype=np.float32)
    assert np.array_equal(round_trip(x, 3), x)  # an all-zero bucket decodes to zeros
    x = np.random.default_rng(1).normal(size=3000).astype(np.float32)
    x[[5, 700, 2999]] = [np.nan, np.inf, -np.inf]
    decoded = round_trip(x, 3)
    assert np.isnan(decoded[5]) and decoded[700] == np.inf and decoded[2999] == -np.inf
    finite = np.isfinite(x)
    assert nmse(decoded[finite], x[finite]) < 0.06
    spike = np.zeros(512, dtype=np.float32)
    spike[17] = 3.0  # rotates to equal magnitudes: decoded exactly up to rounding
    assert np.allclose(round_trip(spike, 2), spike, atol=1e-5)
    one = np.array([2.5], dtype=np.float32)
    assert np.allclose(round_trip(one, 1, bucket_size=8), one)


def test_bucket_size_must_be_a_power_of_two():
    x = np.ones(100, dtype=np.float32)
    for bad in (4, 500, 1 << 17):
        with pytest.raises(ValueError, match="power of two"):
            core.encode(x, scheme="tnq-rht", bits=3, bucket_size=bad, key=0)
    from horovod_tnq.protocol import CompressorConfig
    with pytest.raises(ValueError, match="power of two"):
        CompressorConfig(scheme="tnq-rht", bucket_size=500)


def test_payload_carries_the_rotation_and_codes_whole_buckets():
    x = np.random.default_rng(2).normal(size=1000).astype(np.float32)
    payload = core.encode(x, scheme="tnq-rht", bits=3, bucket_size=256, key=123, step=9)
    header = core.read_header(payload)
    assert header.num_codes == 1024 and payload.size == header.total_size
    assert payload.size == core.encoded_size(1000, 3, 256, scheme="tnq-rht")
    sections = core.codec.split(payload)
    assert sections.rotation == (123, 9, 0)
    corrupted = payload.copy()
    corrupted[core.HEADER.size + 15] = 0x40  # the rotation section's exponent: 2**30
    with pytest.raises(core.PayloadError, match="exponent"):
        core.decode(corrupted)


def test_the_largest_bucket_gives_the_reference_bytes():
    x = np.random.default_rng(4).standard_t(3, 70_000).astype(np.float32)
    options = dict(scheme="tnq-rht", bits=3, bucket_size=rotation.MAX_BUCKET, key=5)
    payload = core.encode(x, **options)
    assert np.array_equal(payload, core.encode(x, reference=True, **options))
    header = core.read_header(payload)
    assert np.array_equal(core.decode_sum(payload, header, 1.0, np.float32)[0],
                          core.decode_sum(payload, header, 1.0, np.float32, reference=True)[0])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), log_bucket=st.integers(3, 11), bits=st.integers(1, 8),
       wide=st.booleans(), ranks=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_compiled_kernel_gives_the_reference_bytes(n, log_bucket, bits, wide, ranks, seed):
    """Both vector paths (AVX-512 where the CPU has it, and the portable code) against the
    numpy reference, for encoding and for decode_sum of several ranks' payloads."""
    if native.LIBRARY is None:
        pytest.skip("native codec not built")
    try:
        for avx512 in (True, False):
            native.set_vector_path(avx512)
            check_against_reference(n, log_bucket, bits, wide, ranks, seed)
    finally:
        native.set_vector_path(True)


def check_against_reference(n, log_bucket, bits, wide, ranks, seed):
    rng = np.random.default_rng(seed)
    dtype = np.float64 if wide else np.float32
    bucket = 1 << log_bucket
    inputs = [(rng.standard_t(3, n) * 10.0 ** rng.integers(-6, 6)).astype(dtype)
              for _ in range(ranks)]
    native_payloads, reference_payloads = [], []
    for rank, x in enumerate(inputs):
        options = dict(scheme="tnq-rht", bits=bits, bucket_size=bucket, key=seed + rank,
                       step=rank)
        native_payloads.append(core.encode(x, **options))
        reference_payloads.append(core.encode(x, reference=True, **options))
        assert np.array_equal(native_payloads[-1], reference_payloads[-1])
    buf = np.concatenate(native_payloads)
    header = core.read_header(buf)
    for out_dtype in (np.float32, np.float64):
        fast, count = core.decode_sum(buf, header, 1 / ranks, out_dtype)
        slow, _ = core.decode_sum(buf, header, 1 / ranks, out_dtype, reference=True)
        assert count == ranks and np.array_equal(fast, slow)


@pytest.mark.parametrize("dtype, magnitude", [(np.float32, 3e38), (np.float32, 1e36),
                                              (np.float32, 1e-42), (np.float64, 1e300),
                                              (np.float64, 1e-163), (np.float64, 1e-310)])
def test_values_near_the_dtypes_limits_decode_finite_and_close(dtype, magnitude):
    """A rotation sums a bucket: near the largest float it would overflow, near the smallest
    lose its mantissa; such tensors travel scaled by a power of two. Where the two ranks' sum
    itself leaves the dtype's range (3e38 + 3e38 in float32), the average is infinite, as
    Horovod's (which sums before it divides) is; everywhere else it is finite and close."""
    x = (np.random.default_rng(3).uniform(-1, 1, size=3000) * magnitude).astype(dtype)
    limit = core.codec.OVERFLOW_LIMITS[np.dtype(dtype).name][1]
    true_sum = 2 * x.astype(np.float64)
    overflows = np.abs(true_sum) > 1.25 * limit  # beyond the 4-bit error's reach
    fits = np.abs(true_sum) < 0.8 * limit
    for reference in (False, True):
        payloads = [core.encode(x, scheme="tnq-rht", bits=4, bucket_size=512, key=key,
                                reference=reference) for key in (1, 2)]
        assert core.codec.split(payloads[0]).rotation[2] != 0
        total, _ = core.decode_sum(np.concatenate(payloads), core.read_header(payloads[0]), 0.5,
                                   np.float64, reference=reference)
        assert np.all(np.isinf(total[overflows]))
        assert np.array_equal(np.sign(total[overflows]), np.sign(x[overflows]))
        assert np.all(np.isfinite(total[fits]))
        scaled = x.astype(np.float64) / magnitude  # the error relative to the values' size
        # (the error spreads over every element: measured against all the values' energy)
        error = np.sum((total[fits] / magnitude - scaled[fits]) ** 2)
        assert error / np.sum(scaled ** 2) < 0.01
