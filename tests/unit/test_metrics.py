"""The compressor's live metrics (protocol/metrics.py) as the state records them; real workers
and TensorBoard in tests/horovodrun/test_overrides_metrics.py."""

import pickle

import numpy as np
import pytest

from horovod_tnq import core
from horovod_tnq.protocol import CompressorConfig, CompressorState
from horovod_tnq.protocol.metrics import CompressionMetrics, scalars


def test_last_step_holds_each_tensor_latest_exchange_and_total_every_one():
    metrics = CompressionMetrics()
    for step in range(3):
        metrics.add("a", step, payload_bytes=100, compressed_elements=400, encode_seconds=0.5)
        metrics.add("a", step, payload_bytes=50, compressed_elements=200)  # a second part
        metrics.add_to_last("a", decode_seconds=0.25)
        metrics.add("b", None, passthrough_bytes=40, passthrough_elements=10)
    summary = metrics.summary()
    last, total = summary["last_step"], summary["total"]
    assert (last["payload_bytes"], last["compressed_elements"], last["passthrough_bytes"]) == \
        (150, 600, 40)
    assert (total["payload_bytes"], total["passthrough_elements"], total["exchanges"]) == \
        (450, 30, 6)
    assert last["bits_per_element"] == pytest.approx(8 * 150 / 600)
    assert last["wire_bits_per_element"] == pytest.approx(8 * 190 / 610)
    assert last["decode_seconds"] == 0.25 and total["encode_seconds"] == 1.5
    assert summary["tensors"]["b"]["bits_per_element"] is None
    assert last["relative_error"] is None  # no estimate recorded


def test_summary_is_a_copy():
    metrics = CompressionMetrics()
    metrics.add("a", 0, payload_bytes=1, compressed_elements=8)
    summary = metrics.summary()
    summary["tensors"]["a"]["payload_bytes"] = 99
    assert metrics.summary()["tensors"]["a"]["payload_bytes"] == 1
    assert pickle.loads(pickle.dumps(metrics)).summary() == metrics.summary()


def test_state_records_bytes_elements_and_an_error_estimate_close_to_the_truth():
    state = CompressorState(CompressorConfig(bits=3))
    x = np.random.default_rng(1).standard_t(3, 1 << 15).astype(np.float32)
    payload = state.encode(x, "w", 1, 0, "float32", x.shape, record="w")
    record = state.metrics.summary()["tensors"]["w"]
    assert record["payload_bytes"] == payload.size and record["compressed_elements"] == x.size
    true = float(np.sum((core.decode(payload)[0] - x) ** 2.0) / np.sum(x.astype(float) ** 2))
    assert record["relative_error"] == pytest.approx(true, rel=0.2)
    # the reduce-scatter's second quantization: bytes and time, not this rank's error
    state.encode(x, "w#reduced", 1, 0, "float32", x.shape, record="w", first_round=False)
    again = state.metrics.summary()["tensors"]["w"]
    assert again["payload_bytes"] == 2 * payload.size
    assert again["compressed_elements"] == x.size
    assert again["squared_error"] == record["squared_error"]


def test_passthrough_counts_in_stats_and_metrics_and_reset_clears_them():
    state = CompressorState(CompressorConfig())
    state.passthrough("bias", 10, 40)
    assert state.stats["passthrough_bytes"] == 40
    assert state.metrics.summary()["tensors"]["bias"]["passthrough_elements"] == 10
    state.reset()
    assert state.metrics.summary()["tensors"] == {}


def test_scalars_name_every_number_for_tensorboard():
    metrics = CompressionMetrics()
    metrics.add("fc.weight", 0, payload_bytes=10, compressed_elements=40, squared_error=1.0,
                squared_norm=10.0)
    metrics.add("norm", None, passthrough_bytes=4, passthrough_elements=1)
    tags = dict(scalars(metrics.summary()))
    assert tags["horovod_tnq/step/relative_error"] == pytest.approx(0.1)
    assert tags["horovod_tnq/total/payload_bytes"] == 10
    assert tags["horovod_tnq/tensors/fc.weight/bits_per_element"] == 2.0
    assert "horovod_tnq/tensors/norm/bits_per_element" not in tags  # None: left out
    assert not any(tag.startswith("horovod_tnq/tensors/")
                   for tag, _ in scalars(metrics.summary(), per_tensor=False))


def test_both_frameworks_log_metrics_with_one_signature(tmp_path):
    """log_metrics(writer, compressor, step) in PyTorch and TensorFlow alike; TensorFlow's
    order before (compressor, step, writer) still writes, with a DeprecationWarning."""
    import inspect
    import warnings

    import pytest
    import tensorflow as tf

    from horovod_tnq import tensorflow as tnq_tf
    from horovod_tnq import torch as tnq_torch
    assert list(inspect.signature(tnq_torch.log_metrics).parameters)[:3] == \
        list(inspect.signature(tnq_tf.log_metrics).parameters)[:3] == \
        ["writer", "compressor", "step"]
    compressor = tnq_tf.TNQCompressor(bits=3)
    compressor.state.passthrough("layer", 10, 40)  # one number to write
    for index, call in enumerate([lambda w: tnq_tf.log_metrics(w, compressor, 1),
                                  lambda w: tnq_tf.log_metrics(compressor, 1, w)]):
        directory = tmp_path / str(index)
        writer = tf.summary.create_file_writer(str(directory))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call(writer)
        writer.flush()
        deprecated = [w for w in caught if issubclass(w.category, DeprecationWarning)
                      and "log_metrics" in str(w.message)]
        assert len(deprecated) == index  # the old order warns
        assert any(directory.iterdir())  # an event file was written
    with pytest.raises(TypeError, match="needs the step"):
        tnq_tf.log_metrics(None, compressor)
