import numpy as np
import pytest

from horovod_tnq import core
from horovod_tnq.core import levels
from reference import lambert_w_reference, laplace_levels_by_quadrature


@pytest.mark.parametrize("bits", range(1, 9))
def test_tnq_levels_match_numerical_optimum(bits):
    alpha, reference = laplace_levels_by_quadrature(bits)
    table = core.tnq_levels(bits)
    assert table.shape == (2**bits,)
    assert core.laplace_truncation_threshold(bits) == pytest.approx(alpha, abs=0.01)
    # Quadrature levels are those of the grid's alpha; compare shapes relative to alpha.
    np.testing.assert_allclose(table / table[-1], reference / reference[-1], atol=2e-3)


@pytest.mark.parametrize("bits", range(1, 9))
def test_tables_sorted_symmetric_and_end_at_threshold(bits):
    for table, threshold in ((core.tnq_levels(bits), core.laplace_truncation_threshold(bits)),
                             (core.uniform_levels(bits), core.uniform_truncation_threshold(bits))):
        assert table.dtype == np.float32
        assert np.all(np.diff(table) > 0)
        np.testing.assert_array_equal(table, -table[::-1])
        assert table[-1] == pytest.approx(threshold, rel=1e-6)


def test_uniform_threshold_solves_its_optimality_condition():
    for bits in range(1, 9):
        s = 2**bits - 1
        w = core.uniform_truncation_threshold(bits)
        assert w * np.exp(w) == pytest.approx(s * s, rel=1e-9)
        assert w == pytest.approx(lambert_w_reference(s * s), rel=1e-9)


@pytest.mark.parametrize("bad", [0, 9, -1, 2.0, True, "4", None])
def test_bits_out_of_range_is_a_clear_error(bad):
    with pytest.raises((ValueError, TypeError), match="bits"):
        levels.check_bits(bad)
