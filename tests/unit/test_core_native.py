"""The compiled codec loops (core/native.c) against the numpy reference: the same bytes out of
encode and the same numbers out of decode_sum, for every scheme, bit width, dtype and edge case."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from horovod_tnq import core
from horovod_tnq.core import native

# schemes with their own payload body (Top-K, binomial DP) have no compiled loops
CASES = [(name, bits) for name, scheme in core.SCHEMES.items() for bits in range(1, 9)
         if scheme.body is None and core.supports(name, bits)]


def test_the_compiled_kernel_is_built_and_loaded():
    # make install builds it; without it every test below would compare numpy with itself
    assert native.LIBRARY is not None


@pytest.fixture(autouse=True, params=["avx512", "portable"])
def vector_path(request):
    """Every test runs on the hand-written AVX-512 loops and on the portable C."""
    try:
        if native.set_vector_path(request.param == "avx512") != (request.param == "avx512"):
            pytest.skip("this CPU has no AVX-512: the portable run covers it")
        yield request.param
    finally:
        native.set_vector_path(True)


def both_encodings(values, **options):
    options = dict(dict(key=core.stream_key(5, 1, "w"), step=3, bucket_size=512), **options)
    return (core.encode(values, **options),
            core.encode(values, reference=True, **options))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scheme, bits", CASES)
def test_encode_gives_the_reference_bytes(scheme, bits, dtype):
    values = np.random.default_rng(bits).standard_t(3, size=(37, 111)).astype(dtype)
    ours, reference = both_encodings(values, scheme=scheme, bits=bits, bucket_size=256)
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
@pytest.mark.parametrize("n, bucket_size", [(0, 512), (1, 512), (7, 512), (4097, 1), (4097, 7),
                                            (5000, 4096), (3, 2)])
def test_edge_lengths_and_bucket_sizes(n, bucket_size, bits):
    values = np.random.default_rng(n).laplace(size=n).astype(np.float32)
    ours, reference = both_encodings(values, bits=bits, bucket_size=bucket_size)
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("values", [
    np.zeros(3000, np.float32), np.full(3000, -2.5, np.float32),
    np.full(3000, 3e38, np.float32), np.full(3000, 1e-45, np.float32),
    np.array([np.nan, np.inf, -np.inf, 1.0] * 700, np.float32),
    np.array([1e150, -1e150, 1e-320, 0.0] * 300, np.float64),
], ids=["zeros", "constant", "huge", "subnormal", "nonfinite", "float64-extremes"])
@pytest.mark.parametrize("scheme", ["tnq", "qsgd", "tnq-fit", "maxmin"])
def test_special_values_give_the_reference_bytes(values, scheme):
    ours, reference = both_encodings(values, scheme=scheme, bits=4)
    np.testing.assert_array_equal(ours, reference)


@given(values=arrays(np.float32, st.integers(0, 2000),
                     elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=True)),
       bits=st.integers(2, 8), step=st.integers(0, 2**32 - 1),
       # whole groups of 16 (the one-pass AVX-512 encoder) or anything (the portable loops)
       bucket_size=st.one_of(st.sampled_from([16, 48, 512]), st.integers(1, 700)))
@settings(max_examples=200, deadline=None)
def test_any_input_gives_the_reference_bytes(values, bits, bucket_size, step):
    ours, reference = both_encodings(values, bits=bits, bucket_size=bucket_size, step=step)
    np.testing.assert_array_equal(ours, reference)


def payloads(scheme="tnq", bits=4, n=10_001, ranks=3, dtype=np.float32, nonfinite=False):
    parts = []
    for rank in range(ranks):
        values = np.random.default_rng(rank).laplace(size=n).astype(dtype) * (rank + 1)
        if nonfinite and rank == 1:
            values[[3, 9]] = [np.inf, np.nan]
        parts.append(core.encode(values, scheme=scheme, bits=bits, bucket_size=512, key=rank))
    return np.concatenate(parts), core.read_header(parts[0])


@pytest.mark.parametrize("out_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scheme, bits", [("tnq", 2), ("tnq", 4), ("tnq", 8), ("qsgd", 3),
                                          ("sign", 1), ("nuqsgd", 5)])
def test_decode_sum_gives_the_reference_numbers(scheme, bits, out_dtype):
    gathered, header = payloads(scheme, bits)
    ours, count = core.decode_sum(gathered, header, 0.25, out_dtype)
    reference, reference_count = core.decode_sum(gathered, header, 0.25, out_dtype,
                                                 reference=True)
    assert ours.dtype == reference.dtype == out_dtype and count == reference_count == 3
    np.testing.assert_array_equal(ours, reference)


@given(n=st.integers(0, 3000), bucket_size=st.sampled_from([1, 7, 8, 24, 512, 1000]),
       bits=st.integers(1, 8), ranks=st.integers(1, 4),
       scheme=st.sampled_from(["tnq", "qsgd", "maxmin", "dqsgd"]), wide=st.booleans())
@settings(max_examples=200, deadline=None)
def test_decode_sum_of_any_length_width_and_bucket_gives_the_reference(
        n, bucket_size, bits, ranks, scheme, wide):
    # The AVX-512 decoder takes buckets of whole groups of 8 codes of at most 4 bits, with or
    # without offsets (maxmin), and a last partial group; the portable loop takes the rest.
    # dqsgd picks each payload's width (2 to 4 bits for these), so its payloads mix widths.
    assume(core.supports(scheme, bits))
    rng = np.random.default_rng(n)
    gradients = [rng.uniform(-1, 1, n), rng.laplace(size=n) * (rng.random(n) < 0.05),
                 rng.standard_t(1, n), rng.normal(size=n)]
    parts = [core.encode(gradients[rank].astype(np.float32), scheme=scheme, bits=bits,
                         bucket_size=bucket_size, key=rank) for rank in range(ranks)]
    gathered, header = np.concatenate(parts), core.read_header(parts[0])
    out_dtype = np.float64 if wide else np.float32
    ours, count = core.decode_sum(gathered, header, 0.5, out_dtype)
    reference, _ = core.decode_sum(gathered, header, 0.5, out_dtype, reference=True)
    assert count == ranks
    np.testing.assert_array_equal(ours, reference)


def test_decode_sum_of_more_payloads_than_the_vector_decoder_takes_gives_the_reference():
    # the AVX-512 decoder keeps up to 64 payloads in hand; more go through the portable loop
    parts = [core.encode(np.random.default_rng(rank).laplace(size=1000).astype(np.float32),
                         bits=3, bucket_size=64, key=rank) for rank in range(65)]
    gathered, header = np.concatenate(parts), core.read_header(parts[0])
    ours, count = core.decode_sum(gathered, header, 1 / 65, np.float32)
    reference, _ = core.decode_sum(gathered, header, 1 / 65, np.float32, reference=True)
    assert count == 65
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("out_dtype", [np.float32, np.float64])
def test_decode_sum_writes_into_a_slice_of_a_larger_result(reference, out_dtype):
    gathered, header = payloads()
    alone, _ = core.decode_sum(gathered, header, 0.5, out_dtype, reference=reference)
    whole = np.full(header.numel + 20, -7.0, dtype=out_dtype)
    written, count = core.decode_sum(gathered, header, 0.5, out_dtype, reference=reference,
                                     out=whole[10:-10])
    assert count == 3 and np.shares_memory(written, whole)
    np.testing.assert_array_equal(whole[10:-10], alone)
    assert (whole[:10] == -7).all() and (whole[-10:] == -7).all()  # nothing beyond the slice


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("out", [np.empty(10_000, np.float32), np.empty(10_001, np.float64)],
                         ids=["too-short", "wrong-dtype"])
def test_decode_sum_refuses_an_out_that_does_not_fit(reference, out):
    gathered, header = payloads()
    with pytest.raises(ValueError, match="out must be 10001"):
        core.decode_sum(gathered, header, 1.0, np.float32, reference=reference, out=out)


def test_decode_sum_is_the_scaled_sum_of_decoded_payloads():
    gathered, header = payloads(dtype=np.float64)
    total, _ = core.decode_sum(gathered, header, 1 / 3)
    parts = list(core.iter_payloads(gathered))
    expected = (parts[0][0] + parts[1][0] + parts[2][0]) * (1 / 3)
    np.testing.assert_array_equal(total, expected)


def test_decode_sum_with_nonfinite_exceptions():
    gathered, header = payloads(nonfinite=True)
    total, _ = core.decode_sum(gathered, header, 0.5, np.float32)
    assert np.isinf(total[3]) and total[3] > 0 and np.isnan(total[9])
    assert np.isfinite(np.delete(total, [3, 9])).all()


@pytest.mark.parametrize("reference", [False, True])
def test_codes_beyond_the_table_are_a_payload_error(reference):
    # QSGD at 2 bits has 3 levels, so code 3 can only come from a corrupted payload
    payload = core.encode(np.linspace(-1, 1, 4000, dtype=np.float32), scheme="qsgd", bits=2,
                          bucket_size=512, key=1)
    payload[-1] = 0xFF
    with pytest.raises(core.PayloadError, match="codes beyond the 3 levels of qsgd"):
        core.decode_sum(payload, core.read_header(payload), reference=reference)
