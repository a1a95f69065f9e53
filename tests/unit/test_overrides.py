"""Per-tensor settings by name pattern (protocol/overrides.py) and how the compressors and the
fused optimizer use them, without Horovod workers (tests/horovodrun/test_overrides.py runs them
on real ranks)."""

import json
import warnings

import pytest
import torch

from horovod_tnq.protocol import (CompressorConfig, CompressorState, TensorSettings,
                                  settings_differences, settings_text)
from horovod_tnq.protocol.overrides import given_settings
from horovod_tnq.torch import TNQCompressor
from horovod_tnq.torch.optimizer import _layout


def settings(overrides, *args, **given):
    config = CompressorConfig(*args, **given)
    return TensorSettings(config, overrides, given_settings(args, given))


def test_first_matching_pattern_wins_and_none_means_uncompressed():
    tensors = settings({"*embed*": {"bits": 8}, "*.weight": {"bits": 2}, "*norm*": None},
                       bits=3)
    assert tensors.for_name("encoder.embed.weight").bits == 8  # both match: the first wins
    assert tensors.for_name("fc.weight").bits == 2
    assert tensors.for_name("layer_norm.bias") is None
    assert tensors.for_name("fc.bias").bits == 3  # no pattern: the compressor's own
    assert tensors.for_name(None).bits == 3
    assert tensors.resolved() == {"encoder.embed.weight": tensors.rules[0][1],
                                  "fc.weight": tensors.rules[1][1], "layer_norm.bias": None,
                                  "fc.bias": tensors.config}


def test_patterns_are_case_sensitive_globs():
    tensors = settings({"layers.?.attn*": {"bits": 6}}, bits=3)
    assert tensors.for_name("layers.1.attn.in_proj").bits == 6
    assert tensors.for_name("layers.12.attn.in_proj").bits == 3
    assert tensors.for_name("Layers.1.attn.in_proj").bits == 3


def test_an_override_inherits_the_compressor_settings_it_does_not_change():
    tensors = settings({"big*": {"bits": 2}}, bits=4, bucket_size=256, min_numel=10, seed=7,
                       exchange="allgather", error_feedback=0.5)
    config = tensors.for_name("big.weight")
    assert (config.bits, config.bucket_size, config.min_numel, config.seed, config.exchange,
            config.error_feedback) == (2, 256, 10, 7, "allgather", 0.5)


def test_another_scheme_starts_from_its_own_defaults_and_options():
    tensors = settings({"head*": {"scheme": "topk"}, "dq*": {"scheme": "dqsgd", "min_bits": 3}},
                       bits=4, seed=3)
    topk = tensors.for_name("head.weight")
    assert topk.scheme == "topk" and topk.error_feedback == 1.0 and topk.seed == 3
    dqsgd = tensors.for_name("dq.weight")
    assert dqsgd.scheme_options()["min_bits"] == 3


@pytest.mark.parametrize("overrides, message", [
    ({"*embed*": {"bitz": 8}}, "override '*embed*': unknown setting(s) ['bitz']"),
    ({"*embed*": {"bits": 9}}, "override '*embed*': bits must be in [1, 8]"),
    ({"*embed*": {"bits": 0}}, "override '*embed*': bits"),
    ({"*embed*": {"seed": 1}}, "override '*embed*': unknown setting(s) ['seed']"),
    ({"*embed*": {"dp_clip": 0.1}}, "override '*embed*': unknown setting(s) ['dp_clip']"),
    ({"*embed*": {"scheme": "nope"}}, "override '*embed*': unknown scheme 'nope'"),
    ({"*embed*": {"bucket_size": 100, "scheme": "tnq-rht"}}, "override '*embed*'"),
    ({"*embed*": 8}, "override '*embed*': settings must be a dict or None"),
    ({3: {"bits": 8}}, "override pattern 3 must be a non-empty string"),
    ({"": {"bits": 8}}, "override pattern '' must be a non-empty string"),
    ({("a", "b"): None}, "override pattern ('a', 'b') must be a non-empty string"),
    ([("*", None)], "overrides must map name patterns to settings"),
    ({"x*": {"scheme": "dp-binomial"}}, "override 'x*': dp-binomial tensors"),
])
def test_bad_overrides_are_value_errors_naming_the_pattern(overrides, message):
    with pytest.raises(ValueError) as raised:
        TNQCompressor(bits=3, overrides=overrides)
    assert message in str(raised.value)


def test_dp_binomial_tensors_may_only_change_min_numel_or_go_uncompressed():
    dp = dict(scheme="dp-binomial", bits=2, dp_clip=0.1, dp_epsilon=4.0, dp_sensitivity=1e-4)
    TNQCompressor(**dp, overrides={"*norm*": None, "*bias": {"min_numel": 0}})
    with pytest.raises(ValueError, match="dp-binomial tensors must all share"):
        TNQCompressor(**dp, overrides={"*embed*": {"bits": 4}})


def test_a_pattern_that_matches_no_name_warns_once():
    tensors = settings({"*embed*": {"bits": 8}, "*nrom*": None}, bits=3)
    names = ["embed.weight", "norm.weight", "fc.weight"]
    with pytest.warns(UserWarning, match=r"\['\*nrom\*'\] match no tensor name"):
        tensors.check_names(names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensors.check_names(names)  # once
        settings({"*embed*": {"bits": 8}}, bits=3).check_names(names)  # all match: silent
        settings(None, bits=3).check_names(names)


def test_ranks_compare_their_overrides_and_name_the_difference():
    config = CompressorConfig(bits=3)
    mine = settings({"*embed*": {"bits": 8}}, bits=3).describe()
    theirs = settings({"*embed*": {"bits": 6}}, bits=3).describe()
    assert json.loads(settings_text(config, mine))["overrides"] == [["*embed*", {"bits": 8}]]
    same = settings_text(config, mine) + b"\0" * 5
    assert settings_differences(config, [same, same], mine) == ""
    differences = settings_differences(config, [same, settings_text(config, theirs)], mine)
    assert differences.startswith("overrides: ") and "on rank 1" in differences
    assert "on rank 0" not in differences
    # no overrides: the settings text is what it was before overrides existed
    assert b"overrides" not in settings_text(config)


def test_overrides_too_long_to_send_go_as_their_checksum():
    many = {f"layer.{i}.very_long_module_name.*": {"bits": 2 + i % 6} for i in range(60)}
    config = CompressorConfig(bits=3)
    described = settings(many, bits=3).describe()
    text = settings_text(config, described)
    assert json.loads(text)["overrides"].startswith("crc32:")
    other = dict(many, extra={"bits": 8})
    assert settings_differences(config, [settings_text(config, settings(other, bits=3)
                                                       .describe())], described)


def test_checkpoints_record_the_overrides_and_refuse_others():
    saved = TNQCompressor(bits=3, overrides={"*embed*": {"bits": 8}})
    state = saved.state_dict()
    assert state["overrides"] == [["*embed*", {"bits": 8}]]
    TNQCompressor(bits=3, overrides={"*embed*": {"bits": 8}}).load_state_dict(state)
    for other in (None, {"*embed*": {"bits": 6}}, {"*embed*": None}):
        with pytest.raises(ValueError, match="overrides"):
            TNQCompressor(bits=3, overrides=other).load_state_dict(state)
    # a checkpoint from before overrides existed loads into a compressor without them
    old = dict(TNQCompressor(bits=3).state_dict())
    del old["overrides"]
    TNQCompressor(bits=3).load_state_dict(old)


def test_state_encodes_with_the_tensor_settings():
    import numpy as np

    from horovod_tnq import core
    state = CompressorState(CompressorConfig(bits=3))
    x = np.random.default_rng(0).normal(size=4096).astype(np.float32)
    payload = state.encode(x, "t", 1, 0, "float32", (4096,), CompressorConfig(bits=7))
    assert core.read_header(payload).bits == 7


def test_repr_shows_the_overrides():
    text = repr(TNQCompressor(bits=3, overrides={"*norm*": None, "*embed*": {"bits": 8}}))
    assert "overrides={'*norm*': None, '*embed*': {'bits': 8}}" in text


def test_fused_layout_buckets_only_tensors_with_equal_settings():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (10, 20, 30, 40, 50)]
    names = ["embed.weight", "fc1.weight", "norm.weight", "fc2.weight", "norm.bias"]
    tensors = settings({"embed*": {"bits": 8}, "norm*": None}, bits=3)
    config_of = {p: tensors.for_name(name) for p, name in zip(params, names)}.get
    index = {p: i for i, p in enumerate(params)}.get
    buckets = _layout(params, 0, 1000, config_of)
    assert sorted(sorted(index(p) for p in bucket) for bucket in buckets) == \
        [[0], [1, 3], [2, 4]]
    for bucket in buckets:
        assert len({config_of(p) for p in bucket}) == 1
    # the user's groups are split by setting too
    buckets = _layout(params, [params[:3], params[3:]], 1000, config_of)
    assert sorted(sorted(index(p) for p in bucket) for bucket in buckets) == \
        [[0], [1], [2], [3], [4]]
