"""Dynamic width (core/dynamic.py, scheme "dqsgd"): the rule, the bounds, unbiasedness, and a
decoder that takes each payload's own width for this scheme only."""

import numpy as np
import pytest

from horovod_tnq import core
from horovod_tnq.core import dynamic
from reference import qsgdinf_nmse_reference

OPTIONS = {"min_bits": 2, "nmse_target": 0.1}


def encode(x, max_bits=8, key=0, **options):
    return core.encode(x, scheme="dqsgd", bits=max_bits, bucket_size=256, key=key,
                       options=dict(OPTIONS, **options))


def test_expected_nmse_is_exact():
    x = np.random.default_rng(0).standard_t(3, 1000).astype(np.float32)
    for bits, nmse in zip(range(2, 9), dynamic.expected_nmse(x, 256, range(2, 9))):
        assert nmse == pytest.approx(qsgdinf_nmse_reference(x, 256, bits), rel=1e-9)
    sampled = np.mean([((core.decode(encode(x, 3, key=k, min_bits=3))[0] - x) ** 2).sum()
                       for k in range(2000)]) / (x.astype(np.float64) ** 2).sum()
    assert sampled == pytest.approx(dynamic.expected_nmse(x, 256, [3])[0], rel=0.03)


@pytest.mark.parametrize("target", [0.5, 0.1, 0.01, 0.001])
def test_width_is_the_smallest_meeting_the_target(target):
    x = np.random.default_rng(1).laplace(size=5000).astype(np.float32)
    bits = core.read_header(encode(x, nmse_target=target)).bits
    nmse = {b: qsgdinf_nmse_reference(x, 256, b) for b in range(2, 9)}
    assert nmse[bits] <= target
    assert bits == 2 or nmse[bits - 1] > target


def test_heavier_tails_get_more_bits():
    rng = np.random.default_rng(2)
    light = core.read_header(encode(rng.normal(size=20_000).astype(np.float32))).bits
    heavy = core.read_header(encode(rng.standard_t(1.5, 20_000).astype(np.float32))).bits
    assert heavy > light


def test_bounds_are_respected():
    flat = np.ones(4096, np.float32)  # every value on a level: no error at any width
    assert core.read_header(encode(flat, min_bits=3)).bits == 3
    x = np.random.default_rng(3).laplace(size=4096).astype(np.float32)
    assert core.read_header(encode(x, 5, nmse_target=1e-9)).bits == 5  # target out of reach


def test_unbiased():
    x = np.random.default_rng(4).standard_t(3, 256).astype(np.float32)
    draws = np.array([core.decode(encode(x, key=k))[0] for k in range(3000)])
    bits = core.read_header(encode(x)).bits
    cell = np.abs(x).max() / (2 ** (bits - 1) - 1)
    np.testing.assert_array_less(np.abs(draws.mean(0) - x), 5 * cell / 2 / np.sqrt(3000))


def test_decoder_takes_each_payloads_width_for_this_scheme_only():
    rng = np.random.default_rng(5)
    parts = [encode(rng.normal(size=3000).astype(np.float32)),
             encode(rng.standard_t(1.5, 3000).astype(np.float32), key=1)]
    widths = [core.read_header(p).bits for p in parts]
    assert widths[0] != widths[1]
    total, count = core.decode_sum(np.concatenate(parts), core.read_header(parts[0]))
    np.testing.assert_array_equal(total, core.decode(parts[0])[0] + core.decode(parts[1])[0])
    other = encode(rng.normal(size=3001).astype(np.float32))
    with pytest.raises(core.PayloadError, match="numel"):
        core.decode_sum(np.concatenate([parts[0], other]), core.read_header(parts[0]))
    fixed = [core.encode(rng.normal(size=3000).astype(np.float32), scheme="qsgdinf", bits=b,
                         bucket_size=256, key=0) for b in (3, 4)]
    with pytest.raises(core.PayloadError, match="bits"):
        core.decode_sum(np.concatenate(fixed), core.read_header(fixed[0]))


@pytest.mark.parametrize("options, match", [
    (dict(min_bits=1), "min_bits"), (dict(min_bits=9), "min_bits"),
    (dict(min_bits=2.5), "min_bits"), (dict(nmse_target=0), "nmse_target"),
    (dict(nmse_target="x"), "nmse_target")])
def test_bad_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        encode(np.ones(100, np.float32), **options)
