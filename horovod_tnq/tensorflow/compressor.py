"""Horovod Compressor for ``horovod.tensorflow`` (and ``horovod.tensorflow.keras``).

Same protocol as the PyTorch compressor (horovod_tnq/protocol) and the same codec: the numpy
core encodes and decodes, called directly on the tensors' buffers when eager and through
``tf.numpy_function`` inside graphs (tf.function, DistributedGradientTape, Keras), where it runs
each time the graph runs. So both frameworks send the same bytes for the same input, seed,
name and step. What advances with every exchange (each tensor's step, which seeds its random
stream, and the error-feedback residuals) lives in the compressor's ``state``
(protocol/state.py), as in PyTorch, and is updated when the graph runs, not when it is traced.
"""

import re
import warnings
from dataclasses import dataclass
from typing import Any

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf
from horovod.tensorflow.compression import Compressor

from .. import core
from ..core import native
from ..protocol import (CompressorBase, DefaultInstanceMethod, Hosts, check_settings_agree,
                        exchange_refused_by_join, plan_code, probe_values, read_probe,
                        reduction_scale, settings_buffer)
from ..protocol.exchange import Exchange, Job, NumpyCodec
from ..protocol.hosts import hosts_of_job
from ..protocol.naming import NamedCompression, TensorName, record_name
from . import horovod_frames

# What the core reads: float64 stays, every other float goes as float32, which holds float16 and
# bfloat16 exactly (numpy has no bfloat16), as in the PyTorch adapter.
_WORK = {tf.float16: tf.float32, tf.bfloat16: tf.float32, tf.float32: tf.float32,
         tf.float64: tf.float64}
# TF shares a numpy buffer only if it is 64-byte aligned (tf.numpy_function copies others, and
# dlpack hands them over as they are, which TF's kernels abort on); numpy aligns large arrays
# to 16 bytes.
_ALIGN = 64


def host_values(tensor):
    """``tensor`` as the core reads it (see _WORK)."""
    return tf.cast(tensor, _WORK[tensor.dtype])


def aligned(array):
    """``array``, or a copy where TF could not take its buffer (eagerly, numpy copies 0.6 MB
    into an aligned buffer in 0.02 ms, tf.convert_to_tensor in 0.14 ms)."""
    if array.ctypes.data % _ALIGN == 0 and array.flags.c_contiguous and array.flags.writeable:
        return array  # (dlpack refuses read-only arrays: views of TF's own tensors)
    copy = aligned_empty(array.size, array.dtype).reshape(array.shape)
    copy[...] = array
    return copy


def aligned_empty(numel, dtype):
    """np.empty(numel, dtype) that TF can take without a copy."""
    dtype = np.dtype(dtype)
    raw = np.empty(numel * dtype.itemsize + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start: start + numel * dtype.itemsize].view(dtype)


def numpy_call(function, inputs, dtype):
    """``function`` on the numpy views of ``inputs``: called at once when eager (errors, e.g.
    core.PayloadError, reach the caller as they are); in a graph, a tf.numpy_function that runs
    each time the graph runs (errors surface as InvalidArgumentError with the same message).
    ``dtype``: of its result, or a list, one per array of a tuple it returns. Results reach TF
    without a copy (see aligned).

    Eagerly tf.numpy_function would copy the inputs and outputs (measured: 1.9 ms for a 4 MB
    input and output, more than decoding them takes), and an eager tf.reshape costs 0.07 ms:
    results come from numpy in their final shape.
    In graphs the op is marked stateless. TF's automatic control dependencies run stateful ops
    without resource inputs in program order, so a decode marked stateful would hold back every
    later tensor's encode until this tensor's collectives completed. Only the step counter,
    whose effect other ops read, is stateful; these ops are functions of run-time inputs
    (collective results, the step), which grappler cannot fold, and their one side effect, an
    error-feedback residual, belongs to one payload name, which one op per graph run touches.
    """
    several = isinstance(dtype, list)

    def run(*arrays):
        with native.keep_denormals():  # TF's threads flush subnormals; the core keeps them
            result = function(*arrays)
        return [aligned(r) for r in result] if several else aligned(result)

    if not tf.executing_eagerly():
        return tf.numpy_function(run, inputs, dtype, stateful=False)
    result = run(*(np.asarray(x) if tf.is_tensor(x) else x for x in inputs))
    # dlpack hands TF the buffer itself (the array lives as long as the tensor)
    return [_from_numpy(r) for r in result] if several else _from_numpy(result)


def _from_numpy(array):
    return tf.experimental.dlpack.from_dlpack(array.__dlpack__()) if array.size else \
        tf.zeros(array.shape, array.dtype)


@dataclass(eq=False)
class _Pending:
    """compress()'s context for decompress(): the tensor's Exchange (protocol/exchange.py) and
    what the result is made into; ``source``: the tensor compress() was given (see
    _without_gradient)."""

    exchange: Any
    base_name: str
    shape: Any
    dtype: Any
    process_set: Any
    source: Any


class TNQCompressor(CompressorBase, Compressor):
    """Truncated Non-uniform Quantization of gradients for ``horovod.tensorflow``.

    Arguments as for ``horovod_tnq.torch.TNQCompressor``: bits, scheme, bucket_size, min_numel,
    seed, error_feedback, exchange, part_elements and the scheme options (min_bits,
    nmse_target; dp_clip, dp_epsilon, dp_delta, dp_sensitivity), and ``overrides`` (per-tensor
    settings by variable name, e.g. ``{"*embed*": {"bits": 8}, "*norm*": None}``: see
    docs/overrides.md; DistributedGradientTape and the DistributedOptimizers give the variables'
    names, as ``var.name`` without ":0", or a Keras 3 variable's ``path``:
    naming.variable_name). A tensor whose size is known only when the graph runs is compressed
    whatever its size (min_numel needs the size when the graph is built), through the
    allgather in one payload.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # bytes handed to Horovod for each named tensor (compressed or not) at its last call,
        # without non-finite exceptions: in graphs this is known when the graph is traced
        # (metrics()' "planned_bytes")
        self._planned_bytes = {}
        self._plans_checked = set()  # tensors whose exchange plan all ranks share (eager)
        self._settings_agreed = False
        self._generation = 0  # reset() count: a graph traced before a reset must not run
        self._hosts = _UNKNOWN  # plan.Hosts of the hierarchical exchange, or None (flat)

    def should_compress(self, tensor, config=None):
        """Whether ``tensor`` is quantized with ``config`` (its settings; the compressor's by
        default) or passed to Horovod's allreduce as it is."""
        numel = tensor.shape.num_elements()
        return tensor.dtype in _WORK and \
            (numel is None or numel >= (config or self.config).min_numel)

    @DefaultInstanceMethod
    def metrics(self):
        """CompressorBase.metrics(), and ``"planned_bytes"``: {tensor: the bytes it hands to
        Horovod per call}, for every named tensor at its last call (compressed: its payloads'
        size, at most this for schemes whose size depends on the data, without non-finite
        exceptions; passed through: its size). In graphs it is known when the graph is traced,
        before it runs, whereas the other records fill as the graph runs."""
        summary = super().metrics()
        summary["planned_bytes"] = dict(self._planned_bytes)
        return summary

    @property
    def bytes_by_tensor(self):
        """Deprecated: ``metrics()["planned_bytes"]`` (this is the live dict, as before)."""
        warnings.warn('compressor.bytes_by_tensor is deprecated and will be removed in the next '
                      'release: use compressor.metrics()["planned_bytes"]', DeprecationWarning,
                      stacklevel=2)
        return self._planned_bytes

    def _key(self, slot):
        return core.stream_key(self.config.seed, hvd.rank(), slot)

    @DefaultInstanceMethod
    def reset(self):
        super().reset()
        self._plans_checked = set()
        self._settings_agreed = False
        self._generation += 1
        self._hosts = _UNKNOWN

    def _check_settings(self, process_set):
        """At the first compress() (and the first after a reset), eagerly even while a graph is
        traced: every rank's settings go out in one allgather and a difference raises on every
        rank. In graphs, ranks configured differently (another exchange, other parts) would
        otherwise build collectives that never pair and wait forever when the graph runs;
        every rank traces its first gradient before any graph runs."""
        if self._settings_agreed:
            return
        with tf.init_scope():
            if not tf.executing_eagerly():  # TF1-style graphs: the probe checks each tensor
                return
            gathered = _eager_exchange(lambda: hvd.allgather(
                tf.constant(settings_buffer(self.config, self.settings.describe())),
                name=f"horovod_tnq.settings.tf.{self._instance}", process_set=process_set))
            if gathered is None:  # a rank has joined: checked again at the next compress()
                return
            check_settings_agree(self.config, gathered.numpy(), self.settings.describe())
        self._settings_agreed = True

    def _check_plan(self, kind, bounds, collective_name, process_set):
        """Eager collectives block until every rank has started them, so ranks that would send
        a tensor differently would wait forever in the exchange, before the probe could tell
        them. So, the first time each tensor is sent eagerly, its probe goes first, alone
        (one small allreduce per tensor and process; graphs check the probe after the
        exchange, whose ops do not block the Python thread)."""
        code = plan_code(kind, bounds)
        probe = hvd.allreduce(tf.constant(probe_values(process_set.rank(), code,
                                                       process_set.size()), tf.float32),
                              op=hvd.Sum, name=_op_name(collective_name + ".plan"),
                              process_set=process_set)
        reduction_scale(probe.numpy().tolist(), process_set.size(), code)

    def _world(self):
        return (hvd.rank(), hvd.size()) if hvd.is_initialized() else (None, None)

    def _count_passthrough(self, tensor, name):
        """Count ``tensor`` in the counters and metrics as sent uncompressed: eagerly at each call;
        in graphs once, when traced (its size is fixed there), so metrics()' last step holds it
        and its total counts it once. Counting each graph run would take a stateful op inside
        Horovod's tf.cond, which TF then runs in program order with every other stateful cond:
        measured, 300 small tensors went from 9.5 to 35 ms per step."""
        numel = tensor.shape.num_elements()
        if numel is not None:
            self.state.passthrough(name, numel, numel * tensor.dtype.size)

    @DefaultInstanceMethod
    @tf.autograph.experimental.do_not_convert  # plain Python control flow, traced as written
    def compress(self, tensor):
        """Horovod's Compressor interface, for the stock path (DistributedGradientTape, the
        DistributedOptimizers, ``hvd.allreduce(..., compression=...)``), which does not pass
        the tensor's names: they are read from Horovod's frames (horovod_frames.py). Callers
        that know them pass them: ``compression=compressor.named(...)`` (compress_named), as
        the Keras 3 optimizer (keras.py) does."""
        return self.compress_named(tensor, horovod_frames.tensor_name(tensor))

    @DefaultInstanceMethod
    def named(self, collective=None, parameter=None, names=(), process_set=None):
        """``compression=`` for one Horovod collective whose tensor its caller names:
        ``hvd.allreduce(grad, name=n, compression=compressor.named(n, "dense/kernel"))``
        compresses ``grad`` as ``compress()`` would for the tape's variable "dense/kernel",
        without reading Horovod's frames. Arguments: naming.TensorName's."""
        return NamedCompression(self, TensorName(collective, parameter, tuple(names),
                                                 process_set))

    @DefaultInstanceMethod
    @tf.autograph.experimental.do_not_convert
    def compress_named(self, tensor, tensor_name):
        """compress() of ``tensor``, named by ``tensor_name`` (a naming.TensorName): the probe
        Horovod allreduces, and the context for decompress()."""
        if isinstance(tensor, tf.IndexedSlices):
            raise TypeError("TNQCompressor needs dense gradients; use sparse_as_dense=True")
        owner, names = tensor_name.parameter, tensor_name.names
        tensor = tf.convert_to_tensor(tensor)
        name = tensor_name.collective
        process_set = tensor_name.process_set or hvd.global_process_set
        self._check_settings(process_set)
        eager = tf.executing_eagerly()
        if name is None and not eager:
            name = tensor.name  # unique in the graph and the same on every rank
        numel = tensor.shape.num_elements()
        config = self.config_for(owner or name, names)
        if config is None or not self.should_compress(tensor, config):
            if name is not None and numel is not None:
                self._planned_bytes[name] = numel * tensor.dtype.size
            self._count_passthrough(tensor, owner or name)
            return tensor, None
        base_name, collective_name = self.state.namer.acquire(name)
        label = owner or base_name
        collective_name = _op_name(collective_name)
        state = self.state
        try:
            hosts = self._hosts_for(process_set)
            if eager:
                step = state.next_step(base_name)
            else:  # drawn each time the graph runs; every payload of this tensor shares it
                step = self._step_op(base_name)
            shape = tuple(tensor.shape) if tensor.shape.is_fully_defined() else None
            job = Job(host_values(tensor), numel, shape, tensor.dtype.name, config, base_name,
                      collective_name, label, step, process_set, process_set.size(), hosts,
                      runtime_shape=None if shape else tf.shape(tensor, tf.int64))
            codec = NumpyCodec(state, self._key, tensor.dtype.name, empty=aligned_empty)
            exchange = Exchange(job, codec, _Collectives())
            if numel is not None:
                # at most this for schemes whose payload size depends on the data
                sent_config, bounds = exchange.payload_plan()
                self._planned_bytes[record_name(base_name)] = sum(
                    core.encoded_size(stop - start, sent_config.bits, sent_config.bucket_size,
                                      tensor.dtype.name, scheme=sent_config.scheme,
                                      options=sent_config.scheme_options())
                    for start, stop in bounds)
            if eager and base_name not in self._plans_checked:
                self._check_plan(exchange.kind, exchange.bounds, collective_name, process_set)
                self._plans_checked.add(record_name(base_name))
            exchange.start()
        except Exception:
            state.namer.release(base_name)
            raise
        pending = _Pending(exchange, base_name, tensor.shape, tensor.dtype, process_set,
                           tensor)
        probe = probe_values(process_set.rank(), plan_code(exchange.kind, exchange.bounds),
                             process_set.size())
        return tf.constant(probe, tf.float32), pending

    def _step_op(self, base_name):
        """The tensor's step, drawn each time the graph runs; refuses graphs traced before a
        reset()."""
        state, traced_in = self.state, self._generation

        def next_step():
            if self._generation != traced_in:
                raise ValueError(STALE_GRAPH)
            return np.int64(state.next_step(base_name))

        step = tf.numpy_function(next_step, [], tf.int64, stateful=True)
        step.set_shape([])
        return step

    def _hosts_for(self, process_set):
        """plan.Hosts where the hierarchical exchange may run, else None: as the PyTorch
        adapter's, found eagerly at the first compress() (TF1-style graphs: never)."""
        if process_set.process_set_id != hvd.global_process_set.process_set_id:
            return None
        if self._hosts is _UNKNOWN:
            with tf.init_scope():
                if not tf.executing_eagerly() or not self.settings.may_use("hierarchical"):
                    self._hosts = None
                else:
                    self._hosts = hosts_of_job(hvd, self._gather_places, Hosts)
        return self._hosts

    def _gather_places(self):
        place = tf.constant([[hvd.cross_rank(), hvd.local_rank()]], tf.int64)
        return hvd.allgather(place, name=f"horovod_tnq.hosts.tf.{self._instance}").numpy() \
            .tolist()

    @DefaultInstanceMethod
    @tf.autograph.experimental.do_not_convert
    def decompress(self, tensor, ctx):
        if ctx is None:
            return tensor
        self.state.namer.release(ctx.base_name)
        exchange = ctx.exchange
        size = ctx.process_set.size()
        code = plan_code(exchange.kind, exchange.bounds)
        if tf.executing_eagerly():
            reading = read_probe(np.asarray(tensor).tolist(), size, code)
            exchange.joined = tuple(sorted(set(range(size)) - set(reading.ranks)))
            total = exchange.finish(reading.scale)
        else:
            # No check may fail before the first collectives have completed on this rank: a
            # rank that aborted its graph early would leave the others waiting in Horovod
            # forever.
            with tf.control_dependencies([*exchange.waiting, tensor]):
                scale = numpy_call(lambda probe: np.array(reduction_scale(probe.tolist(), size,
                                                                          code)),
                                   [tensor], tf.float64)
                scale.set_shape([])
                total = exchange.finish(scale)
        job = exchange.job
        total = tf.reshape(total, job.shape if job.shape is not None else job.runtime_shape)
        if not tf.executing_eagerly():
            total.set_shape(ctx.shape)
        return _without_gradient(tf.cast(total, ctx.dtype), ctx.source)


class _Collectives:
    """Horovod's collectives for the exchange driver: TF ops (eagerly they run at once, and
    return None where Horovod refused them because a rank has joined); array work through
    numpy_call."""

    pipelined = False  # a graph's decode is one op over every part

    @staticmethod
    def compute(function, inputs, dtypes, shapes):
        outputs = numpy_call(lambda *arrays: list(function(*arrays)), inputs,
                             [_TF[np.dtype(dtype).type] for dtype in dtypes])
        if not tf.executing_eagerly():
            for output, shape in zip(outputs, shapes):
                output.set_shape(shape)
        return outputs

    @staticmethod
    def allgather(tensor, name, process_set):
        return _eager_exchange(lambda: hvd.allgather(tensor, name=_op_name(name),
                                                     process_set=process_set))

    @staticmethod
    def alltoall(tensor, splits, name, process_set):
        answer = _eager_exchange(lambda: hvd.alltoall(tensor, splits=splits, name=_op_name(name),
                                                      process_set=process_set))
        return None if answer is None else answer[0]

    @staticmethod
    def allreduce_sum(tensor, name, process_set):
        return hvd.allreduce(tensor, op=hvd.Sum, name=_op_name(name), process_set=process_set)

    @staticmethod
    def reducescatter_sum(tensor, name, process_set):
        return _eager_exchange(lambda: hvd.reducescatter(tensor, op=hvd.Sum,
                                                         name=_op_name(name),
                                                         process_set=process_set))

    @staticmethod
    def wait(handle):
        return handle


_TF = {np.float32: tf.float32, np.float64: tf.float64, np.uint8: tf.uint8, np.int32: tf.int32}
_UNKNOWN = object()  # the hosts of a compressor before its first compress() (or reset)


def _eager_exchange(start):
    """start(), a collective of the exchange (an allgather or alltoall); eagerly, None where
    Horovod refused it because a rank has called hvd.join() (it refuses it on every rank that
    started it). In a graph the refusal fails the graph's run (docs/limits.md)."""
    if not tf.executing_eagerly():
        return start()
    try:
        return start()
    except Exception as error:  # tf.errors.*, with Horovod's message
        if exchange_refused_by_join(error):
            return None
        raise


def _op_name(name):
    """TF op names allow a restricted alphabet; the name is also Horovod's collective name."""
    return re.sub(r"[^A-Za-z0-9_.\-/]", "_", name)


STALE_GRAPH = ("this graph was traced before the compressor's reset() (an elastic reset): it "
               "holds the old world's size, ranks and exchanges, and its collectives would not "
               "pair with the new world's; create the tf.function anew after a reset (register "
               "a reset callback that does, beside compressor.reset)")

NO_GRADIENT = ("gradients do not flow through an allreduce compressed by TNQCompressor (the "
               "reduced tensor comes from decoded payloads): compress gradients, not tensors "
               "you differentiate through")


def _without_gradient(result, source):
    """``result``, tied to ``source`` by a gradient that raises: a tape that differentiates
    through a compressed allreduce gets a clear error, where TF would silently return None
    (there is no path through the decoder), and PyTorch raises as well."""
    @tf.custom_gradient
    def reduced(tensor):
        def gradient(upstream):
            raise ValueError(NO_GRADIENT)
        return tf.identity(result), gradient

    return reduced(source)
