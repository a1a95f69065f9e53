"""TNQHookState (horovod_tnq.torch.ddp) on its own, without a process group: settings checked
as TNQCompressor's, picklable like PyTorch's PowerSGDState, checkpoints, and residuals moved
by parameter where DDP lays its buckets out anew. tests/horovodrun/test_ddp_hook.py runs the
hook itself."""

import pickle
import warnings

import numpy as np
import pytest
import torch

from horovod_tnq.torch.ddp import TNQHookState, _when_all, average_scale


class OneRank:
    """What the hook's layout check reads of a process group."""

    @staticmethod
    def rank():
        return 0

    @staticmethod
    def size():
        return 1


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
    segments = state._segments(Bucket(3, [embed, w1, norm, w2]), "ddp.bucket3", OneRank)
    assert [(start, stop, None if config is None else config.bits, name)
            for start, stop, config, name in segments] == [
        (0, 40, 8, "ddp.bucket3.0"), (40, 56, 2, "ddp.bucket3.1"),
        (56, 60, None, "ddp.bucket3.2"), (60, 68, 2, "ddp.bucket3.3")]
    # neighbours of one setting are one segment; a bucket of one setting keeps the bucket's name
    segments = state._segments(Bucket(4, [w1, w2]), "ddp.bucket4", OneRank)
    assert [(start, stop, config.bits, name) for start, stop, config, name in segments] == [
        (0, 24, 2, "ddp.bucket4")]
    # DDP's buckets carry no names: overrides without them are refused, naming the fix
    nameless = TNQHookState(bits=2, overrides=overrides)
    with pytest.raises(ValueError, match="named_parameters=model.named_parameters()"):
        nameless._segments(Bucket(0, [embed]), "ddp.bucket0", OneRank)
    nameless.name_parameters(named)
    assert nameless._segments(Bucket(0, [embed]), "ddp.bucket0", OneRank)[0][2].bits == 8
    # a pattern that matches no parameter warns once (a typo would silently change nothing)
    with pytest.warns(UserWarning, match="match no tensor name"):
        TNQHookState(bits=2, overrides={"encoder.*": None}, named_parameters=named)._segments(
            Bucket(0, [w1]), "ddp.bucket0", OneRank)


def test_residuals_move_with_their_parameters_to_a_new_layout():
    """DDP's rebuilt buckets: residuals cut by parameter into the new layout's segments
    (tests/unit/test_ddp_residual_move.py runs it under DDP)."""
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    c = torch.nn.Parameter(torch.zeros(4))
    state = TNQHookState(bits=2, error_feedback=1.0, min_numel=1, overrides={"b": {"bits": 4}},
                         named_parameters=[("a", a), ("b", b), ("c", c)])
    old = {"ddp.bucket1.0": np.arange(3, dtype=np.float32),  # a
           "ddp.bucket1.1#reduced": np.ones(2, np.float32),  # no slot of one rank's plan
           "ddp.bucket0": np.arange(10, 14, dtype=np.float32),  # c
           "ddp.bucket10": np.ones(5, np.float32)}  # a bucket not seen: not "ddp.bucket1"'s
    state.state.residuals.update(old)
    state._segments(Bucket(0, [c]), "ddp.bucket0", OneRank)
    state._segments(Bucket(1, [a, b]), "ddp.bucket1", OneRank)
    assert len(state.state.residuals) == 4  # the same layout: nothing moves
    # the new layout: bucket 0 holds b and a (two settings), bucket 1 holds c
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DDP's own rebuild is expected: no warning
        segments = state._segments(Bucket(0, [b, a]), "ddp.bucket0", OneRank)
    assert [name for *_, name in segments] == ["ddp.bucket0.0", "ddp.bucket0.1"]
    assert sorted(state.state.residuals) == ["ddp.bucket0.1", "ddp.bucket10"]  # b had none
    assert np.array_equal(state.state.residuals["ddp.bucket0.1"], old["ddp.bucket1.0"])
    state._segments(Bucket(1, [c]), "ddp.bucket1", OneRank)
    assert np.array_equal(state.state.residuals["ddp.bucket1"], old["ddp.bucket0"])
    assert state._moved == {}  # every piece found its slot


def test_average_scale_is_the_horovod_probes():
    assert average_scale(2) == 0.5 and average_scale(4) == 0.25
    assert average_scale(3) == float(np.float32(1 / 3)) != 1 / 3


def test_pickles_without_its_process_group():
    state = TNQHookState(object(), bits=2, error_feedback=1.0, overlap=False, min_numel=1)
    state.state.next_step("ddp.bucket0")
    state._segments(Bucket(0, [torch.nn.Parameter(torch.zeros(5))]), "ddp.bucket0", OneRank)
    state.state.residuals["ddp.bucket0"] = np.ones(5, np.float32)
    copy = pickle.loads(pickle.dumps(state))
    assert copy.process_group is None and not copy.overlap
    assert copy.config == state.config and copy.state.steps == {"ddp.bucket0": 1}
    assert copy._layouts == {} and copy.state.residuals == {}  # by parameter until a bucket
    copy._segments(Bucket(0, [torch.nn.Parameter(torch.zeros(5))]), "ddp.bucket0", OneRank)
    assert np.array_equal(copy.state.residuals["ddp.bucket0"], np.ones(5, np.float32))
    assert "ddp.bucket0" in state.state.residuals  # pickling left the original as it was


def test_state_dict_round_trip():
    state = TNQHookState(bits=2, error_feedback=1.0, min_numel=1)
    state.state.next_step("ddp.bucket0")
    state._segments(Bucket(0, [torch.nn.Parameter(torch.zeros(2, 2))]), "ddp.bucket0", OneRank)
    state.state.residuals["ddp.bucket0"] = np.arange(4, dtype=np.float32)
    state.state.residuals["other"] = np.ones(3, np.float32)  # not a bucket's: as it is
    saved = state.state_dict()
    assert sorted(saved["residuals"]) == ["ddp.parameter0", "other"]
    assert torch.is_tensor(saved["residuals"]["ddp.parameter0"])
    assert saved["residuals"]["ddp.parameter0"].shape == (2, 2)  # the parameter's shape
    restored = TNQHookState(bits=2, error_feedback=1.0, min_numel=1)
    restored.load_state_dict(saved)
    assert restored.state.steps == {"ddp.bucket0": 1}
    restored._segments(Bucket(0, [torch.nn.Parameter(torch.zeros(2, 2))]), "ddp.bucket0",
                       OneRank)
    assert np.array_equal(restored.state.residuals["ddp.bucket0"], np.arange(4))
    assert np.array_equal(restored.state.residuals["other"], np.ones(3))
    with pytest.raises(ValueError, match="settings"):
        TNQHookState(bits=3, error_feedback=1.0, min_numel=1).load_state_dict(saved)


def test_a_checkpoint_of_ddps_rebuilt_buckets_resumes_in_its_first_ones():
    """Saved after DDP's rebuild ([b, a]), resumed where DDP starts again from its first
    layout ([a, b]): each parameter's residual finds it by its position (the order the hook
    first saw the parameters, the same in both runs)."""
    def parameters():
        return torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))

    a, b = parameters()
    state = TNQHookState(bits=2, error_feedback=1.0, min_numel=1)
    state._segments(Bucket(0, [a, b]), "ddp.bucket0", OneRank)
    state._segments(Bucket(0, [b, a]), "ddp.bucket0", OneRank)  # DDP's rebuild
    state.state.residuals["ddp.bucket0"] = np.arange(7, dtype=np.float32)  # b's 4, then a's 3
    resumed = TNQHookState(bits=2, error_feedback=1.0, min_numel=1)
    resumed.load_state_dict(state.state_dict())
    a, b = parameters()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed._segments(Bucket(0, [a, b]), "ddp.bucket0", OneRank)
    assert np.array_equal(resumed.state.residuals["ddp.bucket0"], [4, 5, 6, 0, 1, 2, 3])


def assert_kept_for_a_parameter_of_its_shape_only(saved, **settings):
    """``saved`` (a residual for one (2, 3) parameter in bucket 0) loaded: kept where bucket 0
    holds a (2, 3) parameter, dropped with a warning where it holds a (3, 2) one."""
    same, other = (TNQHookState(bits=2, error_feedback=1.0, **settings) for _ in range(2))
    same.load_state_dict(saved)
    same._segments(Bucket(0, [torch.nn.Parameter(torch.zeros(2, 3))]), "ddp.bucket0", OneRank)
    assert list(same.state.residuals) == ["ddp.bucket0"]
    other.load_state_dict(saved)
    with pytest.warns(UserWarning, match="start afresh"):
        other._segments(Bucket(0, [torch.nn.Parameter(torch.zeros(3, 2))]), "ddp.bucket0",
                        OneRank)
    assert other.state.residuals == {}


def test_residuals_saved_for_parameters_of_other_shapes_are_dropped_with_a_warning():
    state = TNQHookState(bits=2, error_feedback=1.0, min_numel=1)
    state._segments(Bucket(0, [torch.nn.Parameter(torch.zeros(2, 3))]), "ddp.bucket0", OneRank)
    state.state.residuals["ddp.bucket0"] = np.zeros(6, np.float32)
    assert_kept_for_a_parameter_of_its_shape_only(state.state_dict(), min_numel=1)


def test_a_checkpoint_of_an_earlier_version_keeps_its_residuals_where_the_layout_is_saved():
    """Earlier versions saved residuals by bucket with each bucket's parameter shapes."""
    saved = TNQHookState(bits=2, error_feedback=1.0).state_dict()
    saved["residuals"] = {"ddp.bucket0": torch.ones(6)}
    saved["ddp_layouts"] = {0: [[2, 3]]}
    assert_kept_for_a_parameter_of_its_shape_only(saved)


def test_a_failed_segment_fails_its_bucket():
    # collect_all completes whether its futures failed or not: the bucket's future must fail
    done, failed = torch.futures.Future(), torch.futures.Future()
    done.set_result(torch.zeros(2))
    failed.set_exception(ValueError("segment 1 failed"))
    bucket = torch.ones(4)
    with pytest.raises(RuntimeError, match="segment 1 failed"):
        _when_all(bucket, [done, failed], lambda: bucket).wait()
    assert _when_all(bucket, [done, done], lambda: bucket).wait() is bucket


def test_positions_survive_a_reset_so_later_checkpoints_still_resume_by_parameter():
    shapes = [(2,), (3,), (4,)]  # a, b, c
    parameters = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
    a, b, c = parameters
    state = TNQHookState(bits=2, error_feedback=1.0, min_numel=1)
    for index, bucket in enumerate([[c], [a, b]]):  # DDP's first layout
        state._segments(Bucket(index, bucket), f"ddp.bucket{index}", OneRank)
    state.reset()
    for index, bucket in enumerate([[a], [b, c]]):  # its rebuilt one, after the reset
        state._segments(Bucket(index, bucket), f"ddp.bucket{index}", OneRank)
    state.state.residuals.update({"ddp.bucket0": np.full(2, 1.0, np.float32),
                                  "ddp.bucket1": np.array([2, 2, 2, 3, 3, 3, 3], np.float32)})
    resumed = TNQHookState(bits=2, error_feedback=1.0, min_numel=1)
    resumed.load_state_dict(state.state_dict())
    a, b, c = (torch.nn.Parameter(torch.zeros(shape)) for shape in shapes)
    for index, bucket in enumerate([[c], [a, b]]):  # the resumed run starts in the first one
        resumed._segments(Bucket(index, bucket), f"ddp.bucket{index}", OneRank)
    assert np.array_equal(resumed.state.residuals["ddp.bucket0"], [3, 3, 3, 3])  # c's
    assert np.array_equal(resumed.state.residuals["ddp.bucket1"], [1, 1, 2, 2, 2])  # a's, b's


def test_a_checkpoint_numbering_other_shapes_starts_afresh_with_a_warning():
    """Positions follow DDP's first buckets: where the resumed run's hold parameters of other
    shapes in that order (another model, DDP's first buckets in another order), positions
    would name other parameters, so none of the checkpoint's residuals are taken."""
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2))
    state = TNQHookState(bits=2, error_feedback=1.0, min_numel=1)
    state._segments(Bucket(0, [a, b]), "ddp.bucket0", OneRank)
    state.state.residuals["ddp.bucket0"] = np.arange(6, dtype=np.float32)
    saved = state.state_dict()
    assert saved["ddp_parameter_shapes"] == [[4], [2]]
    resumed = TNQHookState(bits=2, error_feedback=1.0, min_numel=1)
    resumed.load_state_dict(saved)
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2))
    with pytest.warns(UserWarning, match="start afresh"):
        resumed._segments(Bucket(0, [b]), "ddp.bucket0", OneRank)  # b first this time
    resumed._segments(Bucket(1, [a]), "ddp.bucket1", OneRank)
    assert resumed.state.residuals == {} and resumed._moved == {}


def test_a_checkpoint_resumes_whatever_ddps_rebuilt_buckets_are():
    """Only the first layout numbers the parameters: the resumed run may rebuild its buckets
    otherwise (another bucket_cap_mb) and keep every residual."""
    a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (3, 4, 5))
    state = TNQHookState(bits=2, error_feedback=1.0, min_numel=1)
    for layout in ([[a, b, c]], [[c], [b, a]]):
        for index, bucket in enumerate(layout):
            state._segments(Bucket(index, bucket), f"ddp.bucket{index}", OneRank)
    state.state.residuals.update({"ddp.bucket0": np.full(5, 3, np.float32),
                                  "ddp.bucket1": np.array([2] * 4 + [1] * 3, np.float32)})
    resumed = TNQHookState(bits=2, error_feedback=1.0, min_numel=1)
    resumed.load_state_dict(state.state_dict())
    a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (3, 4, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed._segments(Bucket(0, [a, b, c]), "ddp.bucket0", OneRank)
        for index, bucket in enumerate([[c, b], [a]]):  # rebuilt otherwise
            resumed._segments(Bucket(index, bucket), f"ddp.bucket{index}", OneRank)
    assert np.array_equal(resumed.state.residuals["ddp.bucket0"], [3] * 5 + [2] * 4)
    assert np.array_equal(resumed.state.residuals["ddp.bucket1"], [1] * 3)


def test_a_state_used_for_another_model_numbers_its_parameters_afresh():
    state = TNQHookState(bits=2, error_feedback=1.0, min_numel=1)
    for model in range(2):
        a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
        for layout in ([[a, b]], [[b, a]]):
            state._segments(Bucket(0, layout[0]), "ddp.bucket0", OneRank)
            state.state.residuals["ddp.bucket0"] = np.arange(5, dtype=np.float32) + 10 * model
        state.reset() if model == 0 else None
    assert state._shapes == [(3,), (2,)]  # numbered from 0 again: a, b
    assert sorted(state.state_dict()["residuals"]) == ["ddp.parameter0", "ddp.parameter1"]


def test_pieces_without_a_slot_in_the_first_layout_wait_for_ddps_rebuild():
    """A parameter too small to compress alone in DDP's first buckets (min_numel) keeps its
    saved residual until the rebuilt bucket that compresses it."""
    a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (8, 4, 4))
    state = TNQHookState(bits=2, error_feedback=1.0, min_numel=6)
    for layout in ([[a], [b], [c]], [[a], [b, c]]):
        for index, bucket in enumerate(layout):
            state._segments(Bucket(index, bucket), f"ddp.bucket{index}", OneRank)
    state.state.residuals["ddp.bucket1"] = np.arange(8, dtype=np.float32)  # b's, c's
    resumed = TNQHookState(bits=2, error_feedback=1.0, min_numel=6)
    resumed.load_state_dict(state.state_dict())
    a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (8, 4, 4))
    for layout in ([[a], [b], [c]], [[a], [b, c]]):  # b and c passed through, then compressed
        for index, bucket in enumerate(layout):
            resumed._segments(Bucket(index, bucket), f"ddp.bucket{index}", OneRank)
    assert np.array_equal(resumed.state.residuals["ddp.bucket1"], np.arange(8))
    assert resumed._moved == {}  # every piece found its slot


def test_pieces_wait_for_a_rebuild_that_comes_a_step_later_with_static_graph():
    """With static_graph DDP rebuilds after its second step: pieces without a slot survive one
    step without a new layout, and are dropped after two."""
    a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (8, 4, 4))
    state = TNQHookState(bits=2, error_feedback=1.0, min_numel=6)
    state._moved = {(1, ""): np.ones(4, np.float32)}  # b's, whose bucket passes through
    for layout in ([[a], [b], [c]], [[a], [b], [c]], [[a], [b, c]]):
        for index, bucket in enumerate(layout):
            state._segments(Bucket(index, bucket), f"ddp.bucket{index}", OneRank)
        state._end_step()
    assert np.array_equal(state.state.residuals["ddp.bucket1"], [1] * 4 + [0] * 4)
    state._moved = {(2, ""): np.ones(4, np.float32)}  # a piece no slot will take
    # (bucket 0 kept its parameters at the rebuild, but its layout was cut with the others:
    # it is laid out anew in the step after, then two steps without a new layout)
    for _ in range(3):
        for index, bucket in enumerate([[a], [b, c]]):
            state._segments(Bucket(index, bucket), f"ddp.bucket{index}", OneRank)
        state._end_step()
    assert state._moved == {}


def test_an_earlier_versions_checkpoint_saved_again_unused_keeps_its_layouts():
    saved = TNQHookState(bits=2, error_feedback=1.0).state_dict()
    saved["residuals"] = {"ddp.bucket0": torch.ones(6)}
    saved["ddp_layouts"] = {0: [[2, 3]]}
    state = TNQHookState(bits=2, error_feedback=1.0)
    state.load_state_dict(saved)
    again = TNQHookState(bits=2, error_feedback=1.0)
    again.load_state_dict(state.state_dict())
    with pytest.warns(UserWarning, match="start afresh"):
        again._segments(Bucket(0, [torch.nn.Parameter(torch.zeros(4))]), "ddp.bucket0", OneRank)
    assert again.state.residuals == {}


class FailingExchange:
    """What _issue_pending reads of an exchange, failing at its next round."""

    round, rounds, done, error = 0, 2, False, None

    @property
    def issued_all(self):
        return self.done

    def advance(self):
        self.done, self.error = True, RuntimeError("forced: the second round failed")


def test_an_exchange_failing_between_hooks_fails_the_hook_at_once():
    """Going on would pair this rank's next collectives with the others' of that exchange."""
    from horovod_tnq.torch.ddp import _issue_pending

    state = TNQHookState(bits=2)
    entry = type("Entry", (), {"exchange": FailingExchange(),
                               "future": torch.futures.Future()})()
    state._pending = [entry]
    with pytest.raises(RuntimeError, match="forced"):
        _issue_pending(state, every_round=False)
    with pytest.raises(RuntimeError, match="forced"):  # DDP's wait on it fails too
        entry.future.wait()
