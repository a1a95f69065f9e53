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
import time
from dataclasses import dataclass
from typing import Any

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf
from horovod.tensorflow.compression import Compressor

from .. import core
from ..core import native
from ..protocol.naming import record_name
from ..protocol import (JOINED, REDUCED, CompressorBase, DefaultInstanceMethod, Pending,
                        cached_exchange_under_join, check_settings_agree,
                        exchange_refused_by_join, gradient_owner, horovod_call_site, plan,
                        plan_code, probe_values, read_probe, reduction_scale, second_round_config,
                        settings_buffer)

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
    if array.ctypes.data % _ALIGN == 0 and array.flags.c_contiguous:
        return array
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
class _Pending(Pending):
    runtime_shape: Any = None  # the tensor's shape as a tensor, where its static shape is partial
    source: Any = None  # the tensor compress() was given (see _without_gradient)
    config: Any = None  # the tensor's settings (the compressor's overrides)
    # eager: this rank's payloads (allgather: one per part; reduce-scatter: (payload, splits)),
    # summed by allreduce where Horovod refused the exchange because a rank has joined
    sent: Any = None


class TNQCompressor(CompressorBase, Compressor):
    """Truncated Non-uniform Quantization of gradients for ``horovod.tensorflow``.

    Arguments as for ``horovod_tnq.torch.TNQCompressor``: bits, scheme, bucket_size, min_numel,
    seed, error_feedback, exchange, part_elements and the scheme options (min_bits,
    nmse_target; dp_clip, dp_epsilon, dp_delta, dp_sensitivity), and ``overrides`` (per-tensor
    settings by variable name, e.g. ``{"*embed*": {"bits": 8}, "*norm*": None}``: see
    docs/overrides.md; DistributedGradientTape and the DistributedOptimizers give the variables'
    names, as ``var.name`` without ":0", or a Keras 3 variable's ``path``). A tensor whose size
    is known only when the graph runs is compressed whatever its size (min_numel needs the size
    when the graph is built), through the allgather in one payload.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # bytes handed to Horovod for each named tensor (compressed or not) at its last call,
        # without non-finite exceptions: in graphs this is known when the graph is traced
        self.bytes_by_tensor = {}
        self._plans_checked = set()  # tensors whose exchange plan all ranks share (eager)
        self._settings_agreed = False
        self._generation = 0  # reset() count: a graph traced before a reset must not run

    def should_compress(self, tensor, config=None):
        """Whether ``tensor`` is quantized with ``config`` (its settings; the compressor's by
        default) or passed to Horovod's allreduce as it is."""
        numel = tensor.shape.num_elements()
        return tensor.dtype in _WORK and \
            (numel is None or numel >= (config or self.config).min_numel)

    @staticmethod
    def _expect(config, numel, dtype_name, shape):
        """The header this rank expects of every payload of ``numel`` elements of a tensor of
        ``dtype_name`` and ``shape`` sent with ``config``."""
        return core.PayloadHeader.describe(config.scheme, config.bits, dtype_name, numel,
                                           config.bucket_size, shape)

    def _key(self, slot):
        return core.stream_key(self.config.seed, hvd.rank(), slot)

    @DefaultInstanceMethod
    def reset(self):
        super().reset()
        self._plans_checked = set()
        self._settings_agreed = False
        self._generation += 1

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
        """Count ``tensor`` in the stats and metrics as sent uncompressed: eagerly at each call;
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
        if isinstance(tensor, tf.IndexedSlices):
            raise TypeError("TNQCompressor needs dense gradients; use sparse_as_dense=True")
        owner, names = gradient_owner(tensor)
        tensor = tf.convert_to_tensor(tensor)
        name, process_set = horovod_call_site()
        process_set = process_set or hvd.global_process_set
        self._check_settings(process_set)
        eager = tf.executing_eagerly()
        if name is None and not eager:
            name = tensor.name  # unique in the graph and the same on every rank
        numel = tensor.shape.num_elements()
        config = self.config_for(owner or name, names)
        if config is None or not self.should_compress(tensor, config):
            if name is not None and numel is not None:
                self.bytes_by_tensor[name] = numel * tensor.dtype.size
            self._count_passthrough(tensor, owner or name)
            return tensor, None
        base_name, collective_name = self.state.namer.acquire(name)
        label = owner or base_name
        collective_name = _op_name(collective_name)
        dtype_name = tensor.dtype.name
        if numel is None:  # the parts and chunks need the size: one payload, allgathered
            kind, bounds, parts = "allgather", [(0, None)], [""]
        else:
            kind, bounds, parts = plan(config, numel, process_set.size())
            # at most this for schemes whose payload size depends on the data
            self.bytes_by_tensor[record_name(base_name)] = sum(
                core.encoded_size(stop - start, config.bits, config.bucket_size, dtype_name,
                                  scheme=config.scheme, options=config.scheme_options())
                for start, stop in bounds)
        state = self.state
        if eager:
            if base_name not in self._plans_checked:
                try:
                    self._check_plan(kind, bounds, collective_name, process_set)
                except Exception:
                    state.namer.release(base_name)
                    raise
                self._plans_checked.add(record_name(base_name))
            step = state.next_step(base_name)
        else:  # drawn each time the graph runs; every payload of this tensor shares it
            traced_in = self._generation

            def next_step():
                if self._generation != traced_in:
                    raise ValueError(STALE_GRAPH)
                return np.int64(state.next_step(base_name))

            step = tf.numpy_function(next_step, [], tf.int64, stateful=True)
            step.set_shape([])
        values = host_values(tensor)
        jobs = [(start, stop, base_name + part, self._key(base_name + part))
                for (start, stop), part in zip(bounds, parts)]

        def encode(values, step, jobs):
            state.note_release(base_name, values.size, config)
            flat = values.reshape(-1)
            payloads = [state.encode(flat[start:stop], slot, key, step, dtype_name, values.shape,
                                     config, label)
                        for start, stop, slot, key in jobs]
            # counted when the graph runs (a tensor's first part counts the tensor)
            counts = dict(compressed_tensors=1, elements=values.size, **{kind: 1}) \
                if jobs[0][0] == 0 else {}
            state.count(payload_bytes=sum(p.size for p in payloads), **counts)
            return payloads

        if kind == "allgather":  # one allgather per part: each goes once it is encoded
            exchange, sent = [], []
            for job, part in zip(jobs, parts):
                payload = numpy_call(lambda v, s, job=job: encode(v, s, [job])[0],
                                     [values, step], tf.uint8)
                payload.set_shape([None])  # non-finite elements and some schemes add bytes
                sent.append(payload)
                exchange.append(_eager_exchange(lambda payload=payload, part=part: hvd.allgather(
                    payload, name=_op_name(collective_name + part), process_set=process_set)))
        else:  # one alltoall: the chunk for each owner rank, in rank order
            def encode_chunks(values, step):
                payloads = encode(values, step, jobs)
                return np.concatenate(payloads), np.array([p.size for p in payloads], np.int32)

            payload, splits = numpy_call(encode_chunks, [values, step], [tf.uint8, tf.int32])
            payload.set_shape([None])
            splits.set_shape([len(jobs)])
            sent = (payload, splits)
            exchange = _eager_exchange(lambda: hvd.alltoall(payload, splits=splits,
                                                            name=collective_name,
                                                            process_set=process_set))
            exchange = None if exchange is None else exchange[0]
        runtime_shape = None if tensor.shape.is_fully_defined() else tf.shape(tensor,
                                                                              tf.int64)
        pending = _Pending(exchange, None, base_name, tensor.shape, tensor.dtype, process_set,
                           None, kind, bounds, collective_name, step, runtime_shape=runtime_shape,
                           source=tensor, config=config, label=label,
                           sent=sent if eager else None)
        probe = probe_values(process_set.rank(), plan_code(kind, bounds), process_set.size())
        return tf.constant(probe, tf.float32), pending

    @DefaultInstanceMethod
    @tf.autograph.experimental.do_not_convert
    def decompress(self, tensor, ctx):
        if ctx is None:
            return tensor
        self.state.namer.release(ctx.base_name)
        size = ctx.process_set.size()
        code = plan_code(ctx.kind, ctx.bounds)
        if tf.executing_eagerly():
            reading = read_probe(np.asarray(tensor).tolist(), size, code)
            joined = sorted(set(range(size)) - set(reading.ranks))
            if _refused_by_join(ctx):
                total = self._sum_joined(ctx, reading.scale)
            elif joined:
                exchange = "allgather" if ctx.kind == "allgather" else "alltoall"
                raise RuntimeError(cached_exchange_under_join(joined, exchange))
            else:
                total = self._reduce(ctx, reading.scale)
        else:
            # No check may fail before both collectives have completed on this rank: a rank
            # that aborted its graph early would leave the others waiting in Horovod forever.
            received = ctx.exchange if ctx.kind == "allgather" else [ctx.exchange]
            with tf.control_dependencies([*received, tensor]):
                scale = numpy_call(lambda probe: np.array(reduction_scale(probe.tolist(), size,
                                                                          code)),
                                   [tensor], tf.float64)
                scale.set_shape([])
                total = self._reduce(ctx, scale)
            total.set_shape(ctx.shape)
        return _without_gradient(tf.cast(total, ctx.dtype), ctx.source)

    def _decode_sum(self, ctx, buffer, expect, scale, out_dtype, expected_count, out=None):
        """core.decode_sum(...), checking the number of payloads; its time goes to the tensor's
        metrics."""
        started = time.perf_counter()
        total, count = core.decode_sum(buffer, expect, scale, out_dtype, out=out)
        self.state.metrics.add_to_last(ctx.label, decode_seconds=time.perf_counter() - started)
        if count != expected_count:
            raise core.PayloadError(f"received {count} payloads, expected {expected_count}")
        return total

    def _sum_joined(self, ctx, scale):
        """Eagerly, ``scale`` times the sum of the contributing ranks' payloads of ``ctx``, where
        Horovod refused the exchange because a rank has called hvd.join(): each contributing
        rank decodes its own payloads and one allreduce, to which the joined ranks contribute
        zeros, sums them (as the PyTorch adapter's _sum_joined, which says why)."""
        shape = tuple(ctx.shape) if ctx.runtime_shape is None else \
            tuple(int(d) for d in ctx.runtime_shape)
        numel = int(np.prod(shape))
        bounds = [(start, numel if stop is None else stop) for start, stop in ctx.bounds]
        out_dtype = np.float32 if ctx.dtype == tf.float32 else np.float64
        if ctx.kind == "allgather":
            payloads = list(ctx.sent)
        else:
            payload, splits = (np.asarray(x) for x in ctx.sent)
            payloads = np.split(payload, np.cumsum(splits)[:-1])

        def decode_own(*payloads):
            own = aligned_empty(numel, out_dtype)
            for (start, stop), payload in zip(bounds, payloads):
                self._decode_sum(ctx, payload, self._expect(ctx.config, stop - start,
                                                            ctx.dtype.name, shape),
                                 1.0, out_dtype, 1, out=own[start:stop])
            return own.reshape(shape)

        own = numpy_call(decode_own, payloads, _TF[out_dtype])
        summed = hvd.allreduce(own, op=hvd.Sum, name=_op_name(ctx.collective_name + JOINED),
                               process_set=ctx.process_set)
        return summed * tf.constant(scale, summed.dtype)

    def _reduce(self, ctx, scale):
        """``scale`` times the sum over ranks of the tensor of ``ctx``, in its shape, float32
        for float32 tensors and float64 for others (rounded once, as in PyTorch), from what its
        exchange received; for the reduce-scatter, after the second round: this rank's chunk
        sum quantized again and the reduced chunks allgathered."""
        size, dtype_name = ctx.process_set.size(), ctx.dtype.name
        out_dtype = np.float32 if ctx.dtype == tf.float32 else np.float64
        static_shape = tuple(ctx.shape) if ctx.runtime_shape is None else None

        def layout(runtime_shape=None):
            """(shape, numel, the (start, stop) of each payload) of the tensor."""
            shape = static_shape if runtime_shape is None else tuple(int(d) for d in
                                                                     runtime_shape)
            numel = int(np.prod(shape))
            return shape, numel, [(start, numel if stop is None else stop)
                                  for start, stop in ctx.bounds]

        if ctx.kind == "allgather":
            def decode_parts(scale, *inputs):  # every part's buffer, then the run-time shape
                shape, numel, bounds = layout(*inputs[len(ctx.bounds):])
                total = aligned_empty(numel, out_dtype)
                for (start, stop), buffer in zip(bounds, inputs):
                    self._decode_sum(ctx, buffer, self._expect(ctx.config, stop - start,
                                                               dtype_name, shape),
                                     float(scale), out_dtype, size, out=total[start:stop])
                return total.reshape(shape)

            runtime_shape = [] if ctx.runtime_shape is None else [ctx.runtime_shape]
            return numpy_call(decode_parts, [scale, *ctx.exchange, *runtime_shape],
                              _TF[out_dtype])

        rank, slot = ctx.process_set.rank(), ctx.base_name + REDUCED
        key = self._key(slot)
        work = np.float64 if ctx.dtype == tf.float64 else np.float32
        wide = second_round_config(ctx.config, size)  # the owners' sums: plan.second_bits

        def reduce_own_chunk(received, step):
            shape, _, bounds = layout()
            start, stop = bounds[rank]
            chunk_sum = self._decode_sum(ctx, received, self._expect(ctx.config, stop - start,
                                                                     dtype_name, shape),
                                         1.0, work, size)
            payload = self.state.encode(chunk_sum, slot, key, step, dtype_name, shape, wide,
                                        ctx.label, first_round=False)
            self.state.count(payload_bytes=payload.size)
            return payload

        reduced = numpy_call(reduce_own_chunk, [ctx.exchange, ctx.step], tf.uint8)
        reduced.set_shape([None])
        gathered = hvd.allgather(reduced, name=_op_name(ctx.collective_name + REDUCED),
                                 process_set=ctx.process_set)

        def decode_chunks(scale, gathered):
            shape, numel, bounds = layout()
            total = aligned_empty(numel, out_dtype)
            offset = 0
            for owner, (start, stop) in enumerate(bounds):
                if offset >= gathered.size:
                    raise core.PayloadError(f"received {owner} reduced chunks from "
                                            f"{len(bounds)} ranks")
                end = core.codec.split(gathered, offset).end
                self._decode_sum(ctx, gathered[offset:end],
                                 self._expect(wide, stop - start, dtype_name, shape),
                            float(scale), out_dtype, 1, out=total[start:stop])
                offset = end
            if offset != gathered.size:
                raise core.PayloadError(f"received {gathered.size} bytes of reduced chunks, "
                                        f"expected {offset}")
            return total.reshape(shape)

        return numpy_call(decode_chunks, [scale, gathered], _TF[out_dtype])


_TF = {np.float32: tf.float32, np.float64: tf.float64}


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


def _refused_by_join(ctx):
    """Whether Horovod refused the eager exchange of ``ctx`` (all of it, or none: a rank that
    joins has started all of a tensor's collectives or none)."""
    answers = ctx.exchange if ctx.kind == "allgather" else [ctx.exchange]
    refused = [answer is None for answer in answers]
    if any(refused) and not all(refused):
        raise RuntimeError(f"Horovod refused some of the allgathers of {ctx.base_name!r} "
                           "because a rank has joined (hvd.join()), and ran others: its parts "
                           "cannot be summed")
    return all(refused)


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
