import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from horovod_tnq import core
from reference import pack_bits_reference


@st.composite
def codes_and_bits(draw):
    bits = draw(st.integers(1, 8))
    n = draw(st.integers(0, 300))
    codes = draw(arrays(np.uint8, n, elements=st.integers(0, 2**bits - 1)))
    return codes, bits


@given(codes_and_bits())
@settings(max_examples=400, deadline=None)
def test_pack_matches_reference_and_round_trips(case):
    codes, bits = case
    packed = core.pack_bits(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.size == (codes.size * bits + 7) // 8 == core.packed_size(codes.size, bits)
    np.testing.assert_array_equal(packed, pack_bits_reference(codes, bits))
    np.testing.assert_array_equal(core.unpack_bits(packed, bits, codes.size), codes)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 100_003])
def test_round_trip_edge_lengths(bits, n):
    codes = np.random.default_rng(n + bits).integers(0, 2**bits, n).astype(np.uint8)
    packed = core.pack_bits(codes, bits)
    assert packed.size == (n * bits + 7) // 8
    np.testing.assert_array_equal(core.unpack_bits(packed, bits, n), codes)


def test_code_too_wide_is_rejected():
    with pytest.raises(ValueError, match="does not fit in 2 bits"):
        core.pack_bits(np.array([4], dtype=np.uint8), 2)


def test_unpack_short_buffer_is_rejected():
    with pytest.raises(ValueError, match="bytes"):
        core.unpack_bits(np.zeros(2, dtype=np.uint8), 3, 8)
