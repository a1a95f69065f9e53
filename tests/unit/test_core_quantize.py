import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from horovod_tnq import core
from reference import stochastic_round_reference

FINITE32 = st.floats(-1e6, 1e6, allow_nan=False, width=32)


def encode_decode(x, bits, key=1, bucket_size=None, scheme="tnq"):
    payload = core.encode(x, bits=bits, key=key, scheme=scheme,
                          bucket_size=bucket_size or max(x.size, 1))
    values, header, end = core.decode(payload)
    assert end == payload.size == header.total_size
    return values.reshape(x.shape), payload


def nmse(decoded, x):
    x = x.astype(np.float64)
    unit = np.abs(x).max()  # keeps squares of tiny float64 values out of underflow
    return float((((decoded - x) / unit) ** 2).sum() / ((x / unit) ** 2).sum())


@given(arrays(np.float32, st.integers(1, 60), elements=st.floats(-8, 8, width=32)),
       st.integers(1, 8), st.integers(0, 2**32))
@settings(max_examples=300, deadline=None)
def test_stochastic_round_matches_reference(values, bits, key):
    table = core.tnq_levels(bits)
    noise = core.uniform_noise(values.size, key)
    np.testing.assert_array_equal(core.stochastic_round(values, table, noise),
                                  stochastic_round_reference(values, table, noise))


@pytest.mark.parametrize("scheme", ["tnq", "tnq-uniform"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_mean_over_draws_equals_truncated_input(bits, scheme):
    rng = np.random.default_rng(bits)
    x = rng.laplace(size=64).astype(np.float32)
    gamma = np.float32(np.abs(x).astype(np.float64).mean())
    table = core.get_scheme(scheme).level_table(bits).astype(np.float64) * gamma
    truncated = np.clip(x, table[0], table[-1])
    draws = 4000
    mean = np.mean([encode_decode(x, bits, key=k, scheme=scheme)[0] for k in range(draws)], axis=0)
    # Each draw has variance <= (cell width / 2)^2; the mean of `draws` has std <= that / sqrt.
    # Five standard deviations, for 64 elements at once, fails by chance about once in 10^5.
    widest = np.diff(table).max()
    np.testing.assert_array_less(np.abs(mean - truncated), 5 * widest / 2 / np.sqrt(draws) + 1e-6)


@pytest.mark.parametrize("bits", range(1, 9))
def test_laplace_error_is_below_the_closed_form_bound(bits):
    x = np.random.default_rng(0).laplace(scale=0.01, size=200_000).astype(np.float32)
    decoded, _ = encode_decode(x, bits)
    bound = core.laplace_error_bound(bits) / 2.0  # E[x^2] = 2 gamma^2
    assert nmse(decoded, x) < bound


@pytest.mark.parametrize("source", ["laplace", "student_t3", "normal"])
def test_error_falls_as_bits_rise(source):
    rng = np.random.default_rng(1)
    x = getattr(rng, source.replace("student_t3", "standard_t"))(
        *([3] if source == "student_t3" else []), size=100_000).astype(np.float32)
    errors = [nmse(encode_decode(x, bits, bucket_size=512)[0], x) for bits in range(1, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_tnq_beats_truncated_uniform_on_laplace_at_low_bits():
    x = np.random.default_rng(2).laplace(size=200_000).astype(np.float32)
    for bits in (2, 3, 4):
        tnq = nmse(encode_decode(x, bits)[0], x)
        uniform = nmse(encode_decode(x, bits, scheme="tnq-uniform")[0], x)
        assert tnq < uniform, (bits, tnq, uniform)


def test_all_zero_decodes_to_exact_zero():
    decoded, _ = encode_decode(np.zeros(1000, dtype=np.float32), 3, bucket_size=128)
    assert np.all(decoded == 0)


def test_constant_input_is_unbiased():
    x = np.full(4096, -0.25, dtype=np.float32)
    decoded, _ = encode_decode(x, 2, bucket_size=512)
    assert decoded.mean() == pytest.approx(-0.25, rel=0.02)


def test_single_element_and_empty():
    one, payload = encode_decode(np.array([3.5], dtype=np.float32), 4)
    assert np.isfinite(one).all() and abs(one[0]) > 0
    empty, payload = encode_decode(np.zeros(0, dtype=np.float32), 4)
    assert empty.size == 0 and payload.size == core.HEADER.size


@pytest.mark.parametrize("scale", [1e37, 1e-40, 1e-30])
def test_huge_and_subnormal_magnitudes(scale):
    x = (np.random.default_rng(3).laplace(size=10_000) * scale).astype(np.float32)
    assert np.isfinite(x).all()
    decoded, _ = encode_decode(x, 4, bucket_size=512)
    assert np.isfinite(decoded).all()
    assert nmse(decoded, x) < 0.06


def test_float16_and_float64_inputs_keep_their_scale_precision():
    rng = np.random.default_rng(4)
    for dtype, scale in ((np.float16, 1e-3), (np.float64, 1e-300)):
        x = (rng.laplace(size=5000) * scale).astype(dtype)
        decoded, payload = encode_decode(x, 4, bucket_size=256)
        assert core.read_header(payload).dtype_name == np.dtype(dtype).name
        assert nmse(decoded, x) < 0.06


def test_non_finite_values_propagate_exactly():
    x = np.random.default_rng(5).normal(size=2000).astype(np.float32)
    x[[3, 700, 1999]] = [np.nan, np.inf, -np.inf]
    decoded, payload = encode_decode(x, 3, bucket_size=512)
    assert np.isnan(decoded[3]) and decoded[700] == np.inf and decoded[1999] == -np.inf
    finite = np.isfinite(x)
    assert np.isfinite(decoded[finite]).all()
    assert nmse(decoded[finite], x[finite]) < 0.2
    assert core.read_header(payload).num_exceptions == 3


def test_noise_is_reproducible_uniform_and_key_dependent():
    a = core.uniform_noise(100_000, 42)
    np.testing.assert_array_equal(a, core.uniform_noise(100_000, 42))
    assert a.min() >= 0 and a.max() < 1
    assert abs(a.mean() - 0.5) < 0.005 and abs(a.var() - 1 / 12) < 0.002
    b = core.uniform_noise(100_000, 43)
    assert np.mean(a == b) < 0.001
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.02
    keys = {core.stream_key(seed, rank, name)
            for seed in (0, 1) for rank in (0, 1) for name in ("a", "b")}
    assert len(keys) == 8
    steps = [core.uniform_noise(1000, 42, step) for step in range(3)]
    assert np.mean(steps[0] == steps[1]) < 0.01 and np.mean(steps[1] == steps[2]) < 0.01


def test_non_float_input_is_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        core.encode(np.arange(10), bits=2, bucket_size=4, key=0)
