"""Both framework adapters feed the one core identically.

The PyTorch and TensorFlow compressors call the same codec (horovod_tnq.core), so equal bytes
for equal input are a matter of what each adapter hands it: the tensor's values, dtype and
shape, the name and step that key its random stream, the split into parts or chunks, and the
error-feedback residual. Here both run their real compress() and decompress() against a stand-in
for Horovod (a process set of one rank, whose collectives hand back what they are given and
record it), one case per exchange and scheme family: they must hand Horovod the same bytes
and return the same tensor, eagerly and inside tf.function.
"""

import numpy as np
import pytest
import tensorflow as tf
import torch

import horovod_tnq.tensorflow.compressor as tf_adapter
from horovod_tnq.protocol import plan_code, probe_values
import horovod_tnq.torch.compressor as torch_adapter

WORLD_RANK = 5  # keys the random stream; the process set's own rank is 0
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "float64": torch.float64}


class FakeHorovod:
    """What the compressors call of horovod.torch and horovod.tensorflow."""

    class ProcessSet:
        process_set_id = 0  # the global process set

        def size(self):
            return 1

        def rank(self):
            return 0

    def __init__(self):
        self.global_process_set = self.ProcessSet()
        self.sent = []  # (collective name, payload bytes)

    def rank(self):
        return WORLD_RANK

    def size(self):  # one host of one rank: no hierarchical exchange
        return 1

    local_size = cross_size = size

    # horovod.torch: handles are what synchronize() returns
    def allgather_async(self, tensor, name, process_set):
        if not name.startswith("horovod_tnq.settings"):  # (PyTorch's first-step check)
            self.sent.append((name, tensor.numpy().copy()))
        return tensor

    def alltoall_async(self, tensor, splits, name, process_set):
        self.sent.append((name, tensor.numpy().copy()))
        return tensor, splits

    def poll(self, handle):
        return True

    def synchronize(self, handle):
        return handle

    # horovod.tensorflow: recorded when the op runs, so inside graphs too
    def _record(self, tensor, name):
        def record(payload):
            self.sent.append((name, payload.copy()))
            return payload
        return tf.numpy_function(record, [tensor], tf.uint8)

    def allgather(self, tensor, name, process_set):
        if name.startswith("horovod_tnq.settings"):  # the first-use check of the settings
            return tensor
        return self._record(tensor, name)

    def alltoall(self, tensor, splits, name, process_set):
        return self._record(tensor, name), splits

    Sum = "Sum"

    def allreduce(self, tensor, op, name, process_set):  # the eager first-use plan check
        return tensor  # the sum over one rank

    def is_initialized(self):
        return True


@pytest.fixture
def fakes(monkeypatch):
    fakes = {"torch": FakeHorovod(), "tf": FakeHorovod()}
    monkeypatch.setattr(torch_adapter, "hvd", fakes["torch"])
    monkeypatch.setattr(tf_adapter, "hvd", fakes["tf"])
    return fakes


def run_torch(values, dtype, settings, name, steps):
    compressor = torch_adapter.TNQCompressor(**settings)
    results = []
    for _ in range(steps):
        tensor = torch.from_numpy(values).to(TORCH_DTYPES[dtype])
        if name is None:  # eager TF: compress() names it as Horovod would an unnamed call
            probe, ctx = compressor.compress(tensor)
        else:  # what compress() does for the allreduce named ``name``
            ctx = compressor.start(tensor, name)
            probe = torch.tensor(probe_values(0, plan_code(ctx.kind, ctx.bounds)))
        results.append(compressor.decompress(probe, ctx).to(torch.float64).numpy())
    return results, compressor.metrics()["counters"]


def run_tf(values, dtype, settings, graph, steps):
    compressor = tf_adapter.TNQCompressor(**settings)

    def reduce(x):
        return compressor.decompress(*compressor.compress(x))

    if graph == "dynamic":  # the size is known only when the graph runs
        spec = tf.TensorSpec([None, values.shape[1]], getattr(tf, dtype))
        reduce = tf.function(reduce, input_signature=[spec])
        assert reduce.get_concrete_function().structured_outputs.shape.as_list() == \
            [None, values.shape[1]]
    elif graph:  # named after its input, "x:0", on every trace: its step advances per run
        reduce = tf.function(reduce)
    tensor = tf.cast(tf.constant(values), getattr(tf, dtype))
    results = [reduce(tensor) for _ in range(steps)]
    assert all(r.dtype == tensor.dtype and r.shape == tensor.shape for r in results)
    return [tf.cast(r, tf.float64).numpy() for r in results], compressor.metrics()["counters"]


def check_same(fakes, values, dtype, settings, graph):
    """Two steps through each adapter (one eagerly, where each unnamed call is a new tensor)."""
    steps = 2 if graph else 1
    # the values both frameworks see (bfloat16 and float16 rounded once, by torch)
    values = torch.from_numpy(values).to(TORCH_DTYPES[dtype]).to(torch.float64).numpy()
    ours, our_stats = run_tf(values, dtype, settings, graph, steps)
    theirs, their_stats = run_torch(values, dtype, settings, "x:0" if graph else None, steps)
    assert our_stats == their_stats and our_stats["payload_bytes"] > 0
    sent = [fakes[f].sent for f in ("tf", "torch")]
    assert len(sent[0]) == len(sent[1]) >= steps
    for (tf_name, tf_bytes), (torch_name, torch_bytes) in zip(*sent):
        assert tf_name == tf_adapter._op_name(torch_name)
        np.testing.assert_array_equal(tf_bytes, torch_bytes)
    if steps > 1:  # the step advanced: fresh draws (and a residual, with feedback)
        per_step = len(sent[0]) // steps
        assert not np.array_equal(sent[0][0][1], sent[0][per_step][1])
    for mine, other in zip(ours, theirs):
        np.testing.assert_array_equal(mine, other)


def gradient(shape=(40, 77), seed=0):
    values = np.random.default_rng(seed).standard_t(3, size=shape) * 1e-2
    values.reshape(-1)[[3, 101]] = np.inf, np.nan  # exceptions travel beside the codes
    return values


# one case per family: payload layout, exchange, error feedback
CASES = {
    "default (tnq-rht: rotation section)": dict(bits=3),
    "tnq (closed form)": dict(scheme="tnq", bits=3),
    "tnq-opt (fitted table sent)": dict(scheme="tnq-opt", bits=3),
    "maxmin (scale and offset)": dict(scheme="maxmin", bits=4),
    "topk (own body, feedback on)": dict(scheme="topk", bits=2),
    "tnq-sparse (own body)": dict(scheme="tnq-sparse", bits=2, error_feedback=0.0),
    "dqsgd (width per payload)": dict(scheme="dqsgd", bits=8, nmse_target=0.05),
    "dp-binomial (noise)": dict(scheme="dp-binomial", bits=4, dp_clip=0.05, dp_epsilon=4.0,
                                dp_sensitivity=1e-3),
    "allgather in parts": dict(bits=4, part_elements=1024),
    "reduce-scatter with feedback": dict(bits=2, exchange="reduce-scatter", error_feedback=0.5),
}


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("case", CASES)
def test_same_bytes_and_result_in_both_frameworks(fakes, case, graph):
    check_same(fakes, gradient(), "float32", dict(min_numel=1, seed=3, **CASES[case]), graph)


def test_a_tensor_sized_only_at_run_time_is_compressed_alike(fakes):
    check_same(fakes, gradient(), "float32", dict(bits=3, error_feedback=0.5), "dynamic")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
def test_every_dtype_reaches_the_core_alike(fakes, dtype, graph):
    check_same(fakes, gradient((33, 61), seed=1), dtype, dict(bits=4, bucket_size=128), graph)


def test_metrics_is_the_one_accounting_api_and_the_old_names_warn(fakes):
    """metrics() holds what ``stats`` (its "counters") and TF's ``bytes_by_tensor`` (its
    "planned_bytes") gave; the old names still answer, with a DeprecationWarning."""
    values = np.random.default_rng(3).standard_normal((64, 64)).astype(np.float32)
    _, counters = run_torch(values, "float32", {"bits": 3}, "w", 1)
    assert counters["compressed_tensors"] == 1 and counters["allgather"] == 1
    torch_compressor = torch_adapter.TNQCompressor(bits=3)
    ctx = torch_compressor.start(torch.from_numpy(values), "w")
    torch_compressor.decompress(torch.tensor(probe_values(0, plan_code(ctx.kind, ctx.bounds))),
                                ctx)
    metrics = torch_compressor.metrics()
    assert set(metrics) == {"last_step", "total", "tensors", "counters"}
    assert metrics["counters"] == counters
    with pytest.warns(DeprecationWarning, match=r'metrics\(\)\["counters"\]'):
        assert torch_compressor.stats == counters

    tf_compressor = tf_adapter.TNQCompressor(bits=3)
    tf_compressor.decompress(*tf_compressor.compress(tf.constant(values)))
    metrics = tf_compressor.metrics()
    assert set(metrics) == {"last_step", "total", "tensors", "counters", "planned_bytes"}
    assert metrics["counters"] == counters
    assert metrics["planned_bytes"] == {"unnamed": counters["payload_bytes"]}
    with pytest.warns(DeprecationWarning, match=r'metrics\(\)\["planned_bytes"\]'):
        assert tf_compressor.bytes_by_tensor == metrics["planned_bytes"]
