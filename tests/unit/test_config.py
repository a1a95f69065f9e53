"""Compressor settings are validated up front, with messages naming the setting."""

import pytest

from horovod_tnq import CompressorConfig


@pytest.mark.parametrize("options, match", [
    (dict(bits=0), "bits"), (dict(bits=9), "bits"), (dict(scheme="zip"), "unknown scheme"),
    (dict(scheme="terngrad", bits=3), "2 bits"), (dict(bucket_size=0), "bucket_size"),
    (dict(min_numel=-1), "min_numel"), (dict(seed=1.5), "seed"),
    (dict(error_feedback=1.5), "error_feedback"), (dict(error_feedback="yes"), "error_feedback"),
    (dict(min_bits=3), "min_bits applies to scheme dqsgd only"),
    (dict(dp_clip=1.0, scheme="qsgd"), "dp_clip applies to scheme dp-binomial only"),
    (dict(scheme="dqsgd", bits=4, min_bits=5), "min_bits"),
    (dict(scheme="dqsgd", nmse_target=0), "nmse_target"),
    (dict(scheme="dp-binomial", dp_sensitivity=0.1), "dp_clip"),
    (dict(scheme="dp-binomial", dp_clip=1.0), "dp_sensitivity"),
    (dict(scheme="dp-binomial", dp_clip=1.0, dp_sensitivity=0.1, error_feedback=0.5),
     "error_feedback cannot be used with dp-binomial"),
])
def test_bad_settings_are_refused(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        CompressorConfig(**options)


def test_defaults_and_bits_per_element():
    config = CompressorConfig()
    assert (config.bits, config.scheme, config.bucket_size, config.error_feedback) == \
        (4, "tnq-rht", 512, 0.0)
    assert config.bits_per_element() == pytest.approx(4 + 32 / 512)
    # MaxMin sends two floats per bucket
    assert CompressorConfig(scheme="maxmin", bits=3).bits_per_element() == \
        pytest.approx(3 + 64 / 512)


def test_error_feedback_is_on_by_default_for_the_sparsifying_schemes_only():
    for scheme in ("topk", "tnq-sparse"):
        assert CompressorConfig(scheme=scheme).error_feedback == 1.0
        assert CompressorConfig(scheme=scheme, error_feedback=0.0).error_feedback == 0.0
    for scheme in ("qsgd", "tnq", "tnq-fit"):
        assert CompressorConfig(scheme=scheme).error_feedback == 0.0


def test_scheme_options_are_what_the_scheme_reads():
    assert CompressorConfig(scheme="dqsgd", bits=6, min_bits=3).scheme_options() == \
        {"min_bits": 3, "nmse_target": 0.1}
    dp = CompressorConfig(scheme="dp-binomial", dp_clip=1.0, dp_sensitivity=0.01)
    assert dp.scheme_options() == {"dp_clip": 1.0, "dp_epsilon": 1.0, "dp_delta": 1e-5,
                                   "dp_sensitivity": 0.01}
    assert CompressorConfig().scheme_options() == {}
