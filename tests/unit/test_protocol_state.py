"""CompressorState: the one object holding what a compressor carries between steps."""

import pickle

import numpy as np
import pytest

from horovod_tnq import CompressorConfig, core
from horovod_tnq.core.codec import SCHEMES, SCHEMES_BY_ID, Scheme, register_scheme
from horovod_tnq.core.levels import qsgd_levels
from horovod_tnq.protocol import CompressorState


def chunk(seed, n=4096):
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def test_steps_count_per_tensor():
    state = CompressorState(CompressorConfig())
    assert [state.next_step("a"), state.next_step("a"), state.next_step("b")] == [0, 1, 0]
    assert state.steps == {"a": 2, "b": 1}


def test_error_feedback_keeps_what_quantization_left_out_and_adds_it_back():
    state = CompressorState(CompressorConfig(bits=2, error_feedback=0.5))
    first = chunk(0)
    payload = state.encode(first, "w", key=7, step=0, dtype_name="float32", shape=first.shape)
    residual = state.residuals["w"]
    np.testing.assert_array_equal(residual, first - core.decode(payload)[0].astype(np.float32))
    second = chunk(1)
    payload = state.encode(second, "w", key=7, step=1, dtype_name="float32", shape=second.shape)
    expected = core.encode(second + np.float32(0.5) * residual, scheme="tnq-rht", bits=2,
                           bucket_size=512, key=7, step=1)
    np.testing.assert_array_equal(payload, expected)


def test_without_error_feedback_nothing_is_kept():
    state = CompressorState(CompressorConfig(bits=2))
    state.encode(chunk(0), "w", key=7, step=0, dtype_name="float32", shape=(4096,))
    assert state.residuals == {}


def test_a_non_finite_gradient_leaves_a_finite_residual():
    state = CompressorState(CompressorConfig(bits=3, error_feedback=1.0))
    values = chunk(2)
    values[[3, 100]] = [np.nan, np.inf]
    state.encode(values, "w", key=1, step=0, dtype_name="float32", shape=values.shape)
    assert np.all(np.isfinite(state.residuals["w"]))


def test_residual_of_another_shape_is_a_clear_error():
    state = CompressorState(CompressorConfig(error_feedback=1.0))
    state.encode(chunk(0), "w", key=1, step=0, dtype_name="float32", shape=(4096,))
    with pytest.raises(ValueError, match="residual for 'w' has shape"):
        state.encode(chunk(0, 2048), "w", key=1, step=1, dtype_name="float32", shape=(2048,))


def test_state_dict_round_trip_and_pickle_resume_the_same_bytes():
    config = CompressorConfig(bits=3, error_feedback=1.0)
    state = CompressorState(config)
    for step in range(3):
        state.encode(chunk(step), "w", key=5, step=state.next_step("w"), dtype_name="float32",
                     shape=(4096,))
    state.namer.acquire(None)
    loaded = CompressorState(config)
    loaded.load_state_dict(state.state_dict())
    unpickled = pickle.loads(pickle.dumps(state))
    payloads = []
    for resumed in (state, loaded, unpickled):
        assert resumed.namer.anonymous == 1
        step = resumed.next_step("w")
        assert step == 3
        payloads.append(resumed.encode(chunk(9), "w", key=5, step=step, dtype_name="float32",
                                       shape=(4096,)))
    assert all(np.array_equal(payloads[0], p) for p in payloads[1:])


def test_a_checkpoint_of_other_settings_is_refused():
    saved = CompressorState(CompressorConfig(bits=3)).state_dict()
    with pytest.raises(ValueError, match="checkpoint was saved with compressor settings"):
        CompressorState(CompressorConfig(bits=4)).load_state_dict(saved)


def test_reset_forgets_everything():
    state = CompressorState(CompressorConfig(error_feedback=1.0))
    state.encode(chunk(0), "w", key=1, step=state.next_step("w"), dtype_name="float32",
                 shape=(4096,))
    state.count(payload_bytes=10)
    state.reset()
    assert (state.steps, state.residuals, state.stats["payload_bytes"]) == ({}, {}, 0)


@pytest.fixture
def toy_scheme():
    """A scheme with an option of its own, registered for one test."""
    def check(bits, toy_knob):
        if toy_knob < 1:
            raise ValueError(f"toy_knob must be >= 1, got {toy_knob}")

    scheme = Scheme("toy-qsgd", 250, qsgd_levels, "l2", "a test scheme",
                    options={"toy_knob": 1}, check_options=check, error_feedback_default=0.5)
    register_scheme(scheme)
    yield scheme
    del SCHEMES[scheme.name], SCHEMES_BY_ID[scheme.scheme_id]


def test_a_scheme_with_options_is_one_registry_entry(toy_scheme):
    config = CompressorConfig(scheme="toy-qsgd", toy_knob=3)
    assert config.scheme_options() == {"toy_knob": 3}
    assert config.error_feedback == 0.5
    assert CompressorConfig(scheme="toy-qsgd").scheme_options() == {"toy_knob": 1}
    with pytest.raises(ValueError, match="toy_knob must be >= 1"):
        CompressorConfig(scheme="toy-qsgd", toy_knob=0)
    with pytest.raises(ValueError, match="toy_knob applies to scheme toy-qsgd only"):
        CompressorConfig(scheme="qsgd", toy_knob=2)
    payload = CompressorState(config).encode(chunk(0), "w", key=1, step=0,
                                             dtype_name="float32", shape=(4096,))
    assert core.read_header(payload).scheme_id == 250


def feedback_state(rank):
    state = CompressorState(CompressorConfig(error_feedback=1.0))
    state.encode(chunk(rank), "w", key=rank, step=state.next_step("w"), dtype_name="float32",
                 shape=(4096,))
    return state.state_dict(rank=rank)


def test_another_ranks_state_is_refused_unless_asked_for_explicitly():
    with pytest.raises(ValueError, match="state of rank 0 loaded on rank 1.*any_rank=True"):
        CompressorState(CompressorConfig(error_feedback=1.0)).load_state_dict(
            feedback_state(0), rank=1)
    plain = CompressorState(CompressorConfig())
    plain.next_step("w")
    with pytest.raises(ValueError, match="state of rank 0 loaded on rank 1"):
        CompressorState(CompressorConfig()).load_state_dict(plain.state_dict(rank=0), rank=1)
    restored = CompressorState(CompressorConfig())
    restored.load_state_dict(plain.state_dict(rank=0), rank=1, any_rank=True)
    assert restored.steps == {"w": 1}
    # asked for explicitly, another rank's residuals are not taken: this rank's start afresh
    with_feedback = CompressorState(CompressorConfig(error_feedback=1.0))
    with_feedback.load_state_dict(feedback_state(0), rank=1, any_rank=True)
    assert with_feedback.steps == {"w": 1} and with_feedback.residuals == {}
    # its own rank's state, or a state saved before hvd.init(), loads without asking
    own = CompressorState(CompressorConfig(error_feedback=1.0))
    own.load_state_dict(feedback_state(1), rank=1)
    assert set(own.residuals) == {"w"}


def test_non_finite_residuals_in_a_checkpoint_are_refused():
    saved = feedback_state(0)
    saved["residuals"]["w"][7] = np.nan
    with pytest.raises(ValueError, match="residual for 'w' is not finite"):
        CompressorState(CompressorConfig(error_feedback=1.0)).load_state_dict(saved, rank=0)


def test_a_checkpoint_of_version_0_1_0_loads():
    config = CompressorConfig(scheme="dqsgd", bits=6, min_bits=3, error_feedback=1.0)
    old = {  # what 0.1.0's PyTorch state_dict() held: options as fields, steps in the namer
        "config": {**{k: v for k, v in config.__dict__.items() if k != "options"},
                   "min_bits": 3, "nmse_target": 0.1, "dp_clip": None, "dp_epsilon": 1.0,
                   "dp_delta": 1e-5, "dp_sensitivity": None},
        "namer": {"uses": {"w": 4}, "anonymous": 2},
        "residuals": {"w": np.ones(8, np.float32)}, "released": {}}
    state = CompressorState(config)
    state.load_state_dict(old, rank=0)
    assert state.steps == {"w": 4} and state.namer.anonymous == 2
    assert np.array_equal(state.residuals["w"], np.ones(8, np.float32))


def test_error_feedback_decodes_its_own_payload_whatever_its_size(monkeypatch):
    monkeypatch.setattr(core.codec, "MAX_DECODE_NUMEL", 100)  # a large tensor, in miniature
    monkeypatch.setattr(core.codec.decode, "__defaults__", (0, 100))
    state = CompressorState(CompressorConfig(error_feedback=1.0))
    state.encode(chunk(0), "w", key=1, step=0, dtype_name="float32", shape=(4096,))
    assert state.residuals["w"].shape == (4096,)


def test_stats_are_read_only_and_reset_works_on_the_class():
    from horovod_tnq.torch import TNQCompressor
    with pytest.raises(AttributeError, match="read-only"):
        TNQCompressor(bits=3).stats = {}
    TNQCompressor.default_instance().state.next_step("w")
    TNQCompressor.reset()  # as a reset callback when compression=TNQCompressor
    assert TNQCompressor.default_instance().state.steps == {}


def test_residuals_of_a_job_of_another_size_are_refused():
    state = CompressorState(CompressorConfig(error_feedback=1.0))
    state.encode(chunk(0), "w#0", key=1, step=0, dtype_name="float32", shape=(4096,))
    with pytest.raises(ValueError, match="of a 4-rank job loaded in a 2-rank one"):
        CompressorState(CompressorConfig(error_feedback=1.0)).load_state_dict(
            state.state_dict(rank=0, size=4), rank=0, size=2)
