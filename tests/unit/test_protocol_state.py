"""CompressorState: the one object holding what a compressor carries between steps."""

import gc
import pickle

import numpy as np
import pytest

from horovod_tnq import CompressorConfig, core
from horovod_tnq.core.codec import SCHEMES, SCHEMES_BY_ID, Scheme, register_scheme
from horovod_tnq.core.levels import qsgd_levels
from horovod_tnq.protocol import CollectiveNamer, CompressorState
from horovod_tnq.protocol.naming import CallSiteName


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


@pytest.mark.parametrize("scheme,dtype", [("tnq-rht", np.float32), ("tnq-rht", np.float16),
                                          ("maxmin", np.float32), ("qsgd", np.float64)])
def test_the_residual_is_the_gradient_less_what_the_reference_decoder_reads(scheme, dtype):
    """The residual comes from the compiled decoder (decode_sum): the numpy reference's values,
    bit for bit, with exact zeros (zero runs) in the gradient."""
    state = CompressorState(CompressorConfig(scheme=scheme, bits=2, error_feedback=1.0))
    values = chunk(3, 50_000).astype(dtype)
    values[::3] = 0
    payload = state.encode(values, "w", key=7, step=0, dtype_name=np.dtype(dtype).name,
                           shape=values.shape)
    reference = core.decode(payload, max_numel=None)[0].astype(dtype)
    assert np.array_equal(state.residuals["w"], values - reference)


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
    # a large tensor, in miniature (decode's max_numel default is bound at its definition)
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


def unnamed_exchange(state, values, encode=True):
    """What an adapter does for a tensor Horovod did not name: a fresh base name, its step, its
    payload (or, where ``encode`` is False, just its metrics), its decoding, its release."""
    base, collective = state.namer.acquire(None)
    step = state.next_step(base)
    state.note_release(base, values.size)
    if encode:
        state.encode(values, base, key=1, step=step, dtype_name="float32", shape=values.shape,
                     record=base)
    else:
        state.record_payload(base, step, 40, 0.0, values.size)
    state.metrics.add_to_last(base, decode_seconds=0.0)
    state.namer.release(base)
    return base, collective


def entries(state):
    """Every per-name entry the state holds."""
    return (len(state.steps) + len(state.residuals) + len(state.released) +
            len(state.unnamed_releases) + len(state.metrics.last) +
            len(state.namer._in_flight) + len(state.namer._owners))


def test_unnamed_tensors_keep_no_entries_over_100k_calls():
    state = CompressorState(CompressorConfig(error_feedback=1.0, bucket_size=16))
    values = chunk(3, 16)
    with pytest.warns(UserWarning, match="error feedback needs named tensors") as caught:
        for call in range(100_000):  # every 100th through the encoder (the residual's path)
            base, collective = unnamed_exchange(state, values, encode=call % 100 == 0)
    assert len([w for w in caught if "named tensors" in str(w.message)]) == 1  # once
    assert (base, collective) == ("noname.99999", "tnq.noname.99999.0")  # names still unique
    assert state.namer.anonymous == 100_000
    assert entries(state) == 1  # metrics' "unnamed" record, nothing else
    summary = state.metrics.summary()
    assert list(summary["tensors"]) == ["unnamed"]
    assert summary["tensors"]["unnamed"]["step"] == 99_999  # the latest unnamed exchange
    assert summary["total"]["exchanges"] == 100_000
    assert summary["total"]["compressed_elements"] == 100_000 * 16
    # a named tensor beside them keeps its step and residual as before
    state.encode(chunk(4), "w", key=1, step=state.next_step("w"), dtype_name="float32",
                 shape=(4096,))
    assert state.steps == {"w": 1} and set(state.residuals) == {"w"}


def test_an_unnamed_tensor_is_encoded_without_error_feedback():
    config = CompressorConfig(bits=2, error_feedback=1.0)
    values = chunk(5)
    with pytest.warns(UserWarning, match="error feedback needs named tensors"):
        payload = CompressorState(config).encode(values, "noname.7#p1", key=3, step=0,
                                                 dtype_name="float32", shape=values.shape)
    plain = CompressorState(CompressorConfig(bits=2)).encode(
        values, "noname.7#p1", key=3, step=0, dtype_name="float32", shape=values.shape)
    assert np.array_equal(payload, plain)


def test_unnamed_dp_releases_are_counted_by_size_and_composed():
    config = CompressorConfig(scheme="dp-binomial", bits=4, dp_clip=1.0, dp_sensitivity=0.05)
    state = CompressorState(config)
    for _ in range(3):
        state.note_release("w", 4096)
        state.next_step("w")
    for numel in (2048, 2048, 512):
        unnamed_exchange(state, chunk(0, numel), encode=False)
    assert state.unnamed_releases == {2048: 2, 512: 1} and state.released == {"w": 4096}
    options = config.scheme_options()
    parts = [core.privacy.account([4096], 3, 4, **options),
             core.privacy.account([2048], 2, 4, **options),
             core.privacy.account([512], 1, 4, **options)]
    spent = state.privacy_spent()
    assert spent["epsilon"] == pytest.approx(sum(p["epsilon"] for p in parts))
    assert spent["delta"] == pytest.approx(sum(p["delta"] for p in parts))
    restored = CompressorState(config)
    restored.load_state_dict(state.state_dict())
    assert restored.privacy_spent() == spent


def test_a_checkpoint_with_unnamed_entries_of_earlier_versions_loads_without_them():
    state = CompressorState(CompressorConfig(error_feedback=1.0))
    saved = state.state_dict()
    saved.update(steps={"w": 2, "noname.0": 1, "noname.1": 1},
                 residuals={"w": np.ones(8, np.float32), "noname.1#p0": np.ones(8, np.float32)})
    state.load_state_dict(saved)
    assert state.steps == {"w": 2} and set(state.residuals) == {"w"}


class Parameter:
    """Stands for a framework's parameter: weakly referenceable, compared by identity."""


def test_parameters_of_two_models_with_one_name_get_their_own_base_names():
    namer = CollectiveNamer()
    generator, discriminator = Parameter(), Parameter()
    # the first parameter keeps Horovod's name; the collective names stay Horovod's
    assert namer.acquire(CallSiteName("0.weight", generator)) == ("0.weight", "tnq.0.weight.0")
    assert namer.acquire(CallSiteName("0.weight", discriminator)) == \
        ("0.weight@1", "tnq.0.weight.1")
    namer.release("0.weight@1")
    namer.release("0.weight")
    assert namer._in_flight == {}
    for _ in range(2):  # later steps: the same base names
        assert namer.acquire(CallSiteName("0.weight", discriminator))[0] == "0.weight@1"
        namer.release("0.weight@1")
        assert namer.acquire(CallSiteName("0.weight", generator))[0] == "0.weight"
        namer.release("0.weight")
    # no parameter: the name as it is; a parameter that is gone gives its number up
    assert namer.acquire("0.weight")[0] == "0.weight"
    del discriminator
    gc.collect()
    rebuilt, another = Parameter(), Parameter()
    assert namer.acquire(CallSiteName("0.weight", rebuilt))[0] == "0.weight@1"
    assert namer.acquire(CallSiteName("0.weight", another))[0] == "0.weight@2"
    assert namer.acquire(CallSiteName("0.weight", generator))[0] == "0.weight"


def test_a_shared_compressor_keeps_each_models_residuals_and_streams_apart():
    state = CompressorState(CompressorConfig(bits=2, error_feedback=1.0))
    models = [Parameter(), Parameter()]
    for step in range(2):
        for index, model in enumerate(models):
            base, _ = state.namer.acquire(CallSiteName("w", model))
            state.encode(chunk(10 * index + step), base, key=core.stream_key(0, 0, base),
                         step=state.next_step(base), dtype_name="float32", shape=(4096,))
            state.namer.release(base)
    assert state.steps == {"w": 2, "w@1": 2}
    alone = CompressorState(CompressorConfig(bits=2, error_feedback=1.0))
    for step in range(2):
        alone.encode(chunk(10 + step), "w", key=core.stream_key(0, 0, "w@1"),
                     step=alone.next_step("w"), dtype_name="float32", shape=(4096,))
    assert np.array_equal(state.residuals["w@1"], alone.residuals["w"])


def test_a_call_site_name_is_its_name_and_pickles_as_one():
    parameter = Parameter()
    name = CallSiteName("0.weight", parameter)
    assert name == "0.weight" and hash(name) == hash("0.weight")
    assert name.owner() is parameter
    copy = pickle.loads(pickle.dumps({name: 1}))
    assert copy == {"0.weight": 1} and type(next(iter(copy))) is str
