"""TNQHookState (horovod_tnq.torch.ddp) on its own, without a process group: settings checked
as TNQCompressor's, picklable like PyTorch's PowerSGDState, checkpoints, and residuals dropped
where DDP lays a bucket out anew. tests/horovodrun/test_ddp_hook.py runs the hook itself."""

import pickle
import warnings

import numpy as np
import pytest
import torch

from horovod_tnq.torch.ddp import TNQHookState, _when_all, average_scale


class Bucket:
    """What the hook's layout check reads of a DDP GradBucket."""

    def __init__(self, index, parameters):
        self._index, self._parameters = index, parameters

    def index(self):
        return self._index

    def parameters(self):
        return self._parameters


def test_settings_are_the_compressors():
    state = TNQHookState(bits=3, exchange="reduce-scatter", error_feedback=0.5)
    assert (state.config.bits, state.config.exchange, state.config.error_feedback) == \
        (3, "reduce-scatter", 0.5)
    assert state.process_group is None and state.overlap
    with pytest.raises(ValueError, match="bits"):
        TNQHookState(bits=0)
    with pytest.raises(TypeError, match="unknown compressor option"):
        TNQHookState(no_such_option=1)


def test_overrides_cut_buckets_into_segments_of_one_setting():
    embed, w1, norm, w2 = (torch.nn.Parameter(torch.zeros(shape))
                           for shape in ((10, 4), (4, 4), (4,), (4, 2)))
    named = [("embed.weight", embed), ("layer1.weight", w1), ("norm.weight", norm),
             ("layer2.weight", w2)]
    overrides = {"embed.*": {"bits": 8}, "norm.*": None}
    state = TNQHookState(bits=2, overrides=overrides, named_parameters=named)
    segments = state._segments(Bucket(3, [embed, w1, norm, w2]), "ddp.bucket3")
    assert [(start, stop, None if config is None else config.bits, name)
            for start, stop, config, name in segments] == [
        (0, 40, 8, "ddp.bucket3.0"), (40, 56, 2, "ddp.bucket3.1"),
        (56, 60, None, "ddp.bucket3.2"), (60, 68, 2, "ddp.bucket3.3")]
    # neighbours of one setting are one segment; a bucket of one setting keeps the bucket's name
    segments = state._segments(Bucket(4, [w1, w2]), "ddp.bucket4")
    assert [(start, stop, config.bits, name) for start, stop, config, name in segments] == [
        (0, 24, 2, "ddp.bucket4")]
    # DDP's buckets carry no names: overrides without them are refused, naming the fix
    nameless = TNQHookState(bits=2, overrides=overrides)
    with pytest.raises(ValueError, match="named_parameters=model.named_parameters()"):
        nameless._segments(Bucket(0, [embed]), "ddp.bucket0")
    nameless.name_parameters(named)
    assert nameless._segments(Bucket(0, [embed]), "ddp.bucket0")[0][2].bits == 8
    # a pattern that matches no parameter warns once (a typo would silently change nothing)
    with pytest.warns(UserWarning, match="match no tensor name"):
        TNQHookState(bits=2, overrides={"encoder.*": None}, named_parameters=named)._segments(
            Bucket(0, [w1]), "ddp.bucket0")


def test_residuals_of_segments_are_dropped_with_their_layout():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    state = TNQHookState(bits=2, error_feedback=1.0, overrides={"b": {"bits": 4}},
                         named_parameters=[("a", a), ("b", b)])
    for slot in ("ddp.bucket1.0", "ddp.bucket1.1#reduced", "ddp.bucket0"):
        state.state.residuals[slot] = np.zeros(3, np.float32)
    state._segments(Bucket(1, [a, b]), "ddp.bucket1")
    assert len(state.state.residuals) == 3
    state._segments(Bucket(1, [b, a]), "ddp.bucket1")
    assert sorted(state.state.residuals) == ["ddp.bucket0"]


def test_average_scale_is_the_horovod_probes():
    assert average_scale(2) == 0.5 and average_scale(4) == 0.25
    assert average_scale(3) == float(np.float32(1 / 3)) != 1 / 3


def test_pickles_without_its_process_group():
    state = TNQHookState(object(), bits=2, error_feedback=1.0, overlap=False)
    state.state.next_step("ddp.bucket0")
    state.state.residuals["ddp.bucket0"] = np.ones(5, np.float32)
    weight = torch.nn.Parameter(torch.zeros(5))
    state._segments(Bucket(0, [weight]), "ddp.bucket0")
    copy = pickle.loads(pickle.dumps(state))
    assert copy.process_group is None and not copy.overlap
    assert copy.config == state.config and copy.state.steps == {"ddp.bucket0": 1}
    assert np.array_equal(copy.state.residuals["ddp.bucket0"], np.ones(5, np.float32))
    assert copy._saved_layouts == {0: ((5,),)} and copy._layouts == {}


def test_state_dict_round_trip():
    state = TNQHookState(bits=2, error_feedback=1.0)
    state.state.next_step("ddp.bucket0")
    state.state.residuals["ddp.bucket0"] = np.arange(4, dtype=np.float32)
    state._segments(Bucket(0, [torch.nn.Parameter(torch.zeros(2, 2))]), "ddp.bucket0")
    saved = state.state_dict()
    assert torch.is_tensor(saved["residuals"]["ddp.bucket0"])
    assert saved["ddp_layouts"] == {0: [[2, 2]]}
    restored = TNQHookState(bits=2, error_feedback=1.0)
    restored.load_state_dict(saved)
    assert restored.state.steps == {"ddp.bucket0": 1}
    assert np.array_equal(restored.state.residuals["ddp.bucket0"], np.arange(4))
    with pytest.raises(ValueError, match="settings"):
        TNQHookState(bits=3, error_feedback=1.0).load_state_dict(saved)


def test_residuals_of_a_bucket_laid_out_anew_are_dropped():
    state = TNQHookState(bits=2, error_feedback=1.0)
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    for slot in ("ddp.bucket1", "ddp.bucket1#reduced", "ddp.bucket10", "ddp.bucket0"):
        state.state.residuals[slot] = np.zeros(6, np.float32)
    state._segments(Bucket(1, [a, b]), "ddp.bucket1")
    state._segments(Bucket(1, [a, b]), "ddp.bucket1")  # the same layout: kept
    assert len(state.state.residuals) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DDP's own rebuild is expected: no warning
        state._segments(Bucket(1, [b, a]), "ddp.bucket1")
    assert sorted(state.state.residuals) == ["ddp.bucket0", "ddp.bucket10"]


def test_residuals_saved_with_another_layout_are_dropped_with_a_warning():
    state = TNQHookState(bits=2, error_feedback=1.0)
    state.state.residuals["ddp.bucket0"] = np.zeros(6, np.float32)
    state._segments(Bucket(0, [torch.nn.Parameter(torch.zeros(2, 3))]), "ddp.bucket0")
    saved = state.state_dict()
    same, other = TNQHookState(bits=2, error_feedback=1.0), TNQHookState(bits=2,
                                                                         error_feedback=1.0)
    same.load_state_dict(saved)
    same._segments(Bucket(0, [torch.nn.Parameter(torch.zeros(2, 3))]), "ddp.bucket0")
    assert list(same.state.residuals) == ["ddp.bucket0"]
    other.load_state_dict(saved)
    with pytest.warns(UserWarning, match="start afresh"):
        other._segments(Bucket(0, [torch.nn.Parameter(torch.zeros(3, 2))]), "ddp.bucket0")
    assert other.state.residuals == {}


def test_a_failed_segment_fails_its_bucket():
    # collect_all completes whether its futures failed or not: the bucket's future must fail
    done, failed = torch.futures.Future(), torch.futures.Future()
    done.set_result(torch.zeros(2))
    failed.set_exception(ValueError("segment 1 failed"))
    bucket = torch.ones(4)
    with pytest.raises(RuntimeError, match="segment 1 failed"):
        _when_all(bucket, [done, failed], lambda: bucket).wait()
    assert _when_all(bucket, [done, done], lambda: bucket).wait() is bucket
