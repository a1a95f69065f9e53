"""Compressor settings are validated up front, with messages naming the setting."""

import json

import numpy as np
import pytest

from horovod_tnq import CompressorConfig
from horovod_tnq.protocol import TensorSettings, settings_text


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


def test_numpy_integers_are_taken_as_ints_everywhere():
    config = CompressorConfig(bits=np.int64(3), bucket_size=np.int32(256),
                              min_numel=np.uint16(10), seed=np.uint64(2**64 - 1),
                              part_elements=np.int64(0), error_feedback=np.float32(0.5))
    assert config == CompressorConfig(bits=3, bucket_size=256, min_numel=10, seed=2**64 - 1,
                                      part_elements=0, error_feedback=0.5)
    for name in ("bits", "bucket_size", "min_numel", "seed", "part_elements"):
        assert type(getattr(config, name)) is int
    assert type(config.error_feedback) is float
    json.loads(settings_text(config))  # what every rank sends at its first step
    dqsgd = CompressorConfig(scheme="dqsgd", bits=np.int8(6), min_bits=np.int64(3),
                             nmse_target=np.float32(0.25))
    assert dqsgd.scheme_options() == {"min_bits": 3, "nmse_target": 0.25}
    assert type(dqsgd.scheme_options()["min_bits"]) is int
    json.loads(settings_text(dqsgd))


def test_override_values_are_taken_as_ints_too():
    settings = TensorSettings(CompressorConfig(), {"embed*": {"bits": np.int64(8),
                                                              "bucket_size": np.int16(128)}})
    assert settings.for_name("embed.weight").bits == 8
    assert settings.describe() == [["embed*", {"bits": 8, "bucket_size": 128}]]
    json.loads(settings_text(settings.config, settings.describe()))


@pytest.mark.parametrize("name", ["bits", "bucket_size", "min_numel", "seed", "part_elements"])
@pytest.mark.parametrize("value", [True, np.bool_(False), 4.0, "4", None])
def test_integer_settings_refuse_bools_and_non_integers(name, value):
    with pytest.raises(ValueError, match=f"{name} must be an integer, got"):
        CompressorConfig(**{name: value})


@pytest.mark.parametrize("seed", [-1, 2**64, 2**70])
def test_seeds_outside_64_bits_are_refused(seed):
    with pytest.raises(ValueError, match="seed"):
        CompressorConfig(seed=seed)
