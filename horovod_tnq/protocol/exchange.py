"""The exchange driver: the steps of every exchange of a compressed tensor, written once for both
frameworks (issue 23).

An Exchange runs one tensor's exchange as protocol/plan.py lays it out:

* allgather: each part encoded, allgathered, and every rank's payloads decoded and summed;
* reduce-scatter: every chunk encoded and sent to its owner (one alltoall); each owner decodes
  and sums its chunk, quantizes the sum again at plan.second_widths (past 8 bits in two
  stages) and allgathers it (the second round); every rank decodes the owners' chunks;
* hierarchical: the ranks of a host sum the tensor in full precision (Horovod's reducescatter
  over the host's process set), each rank then exchanges its slice of the host's sum with the
  ranks of the same local index on the other hosts, by the allgather or the reduce-scatter
  above at plan.host_bits, and the host allgathers the decoded slices in full precision.

The adapters supply two small objects. A *codec* does the array work on the arrays it uses
(numpy on the host: NumpyCodec here; torch tensors on a GPU: the PyTorch adapter's
DeviceCodec): encode, decode_sum, empty, concatenate, the full-precision view of a gradient,
and the byte offsets of packed payloads. The *collectives* start Horovod's collectives on
those arrays and run the array work: ``compute(function, inputs, dtypes, shapes)`` calls it
at once in PyTorch and eager TensorFlow, and makes a tf.numpy_function of it in graphs, where
the whole driver runs once, when the graph is traced. Functions given to compute() get their
inputs as the codec's arrays and touch nothing else but the state's counters and metrics.

The driver is a generator: it yields ``(round, handles)`` where it waits for collectives and
is sent what they received (None where Horovod refused them because a rank has called
hvd.join()). PyTorch starts exchanges in compress() and finishes them in decompress(); before
waiting on a collective of round k it takes every other exchange in flight past its round-k
waits (Exchange.ready_for), so that ranks that finish tensors in different orders never wait
on a collective another rank has not started.
"""

import time

import numpy as np

from .. import core
from .host_core import HOST_CORE
from .plan import REDUCED, STAGE, cross_config, plan, second_round_configs
from .probe import JOINED, cached_exchange_under_join

LOCAL = "#local"  # the hierarchical exchange's full-precision reducescatter inside a host
HOST = "#host"  # ... and its allgather of the decoded slices inside the host
_PAYLOAD, _SIZES = np.uint8, np.int32


class Job:
    """What the driver needs of one tensor: ``values`` (the codec's flat array, or a TF tensor
    in graphs; TF may pass it in its shape, see ``shape``), its ``numel`` (None: known only when
    the graph runs; then one payload by allgather), ``shape`` (the tensor's, which payloads
    carry a tag of; None: the runtime shape, ``runtime_shape``), ``dtype_name``, its settings
    ``config``, names (``base_name`` keys its payloads' streams and residuals,
    ``collective_name`` names its collectives, ``label`` its metrics), ``step`` (an int, or a
    tensor in graphs), the ``process_set`` it is reduced over, of ``size`` ranks, and ``hosts``
    (plan.Hosts where the hierarchical exchange is available)."""

    def __init__(self, values, numel, shape, dtype_name, config, base_name, collective_name,
                 label, step, process_set, size, hosts=None, runtime_shape=None):
        self.values, self.numel, self.shape = values, numel, shape
        self.dtype_name, self.config, self.step = dtype_name, config, step
        self.base_name, self.collective_name, self.label = base_name, collective_name, label
        self.process_set, self.size, self.hosts = process_set, size, hosts
        self.runtime_shape = runtime_shape


class Exchange:
    """One tensor's exchange (see the module docstring). ``kind``, ``bounds`` and ``parts`` are
    its plan (plan.plan); ``rounds`` the number of collectives it waits on one after another.

    start() encodes and starts the first collectives; ``finish(scale)`` (after every
    other exchange in flight is ``ready_for`` this one's round) decodes what arrives, times
    ``scale``, into ``target`` where given (a codec array of the result's dtype and size).
    ``joined``: the ranks the probe found joined; then Horovod must have refused the
    collectives (else its response cache ran them: an error)."""

    def __init__(self, job, codec, collectives):
        self.job, self.codec, self.collectives = job, codec, collectives
        numel = job.numel
        if numel is None:  # TF graphs, a tensor of a size known only when the graph runs
            self.kind, self.bounds, self.parts = "allgather", [(0, None)], [""]
        else:
            self.kind, self.bounds, self.parts = plan(job.config, numel, job.size, job.hosts)
        self.rounds = {"allgather": 1, "reduce-scatter": 2}.get(self.kind)
        if self.kind == "hierarchical":
            cross = self._cross_plan()[1]
            self.rounds = 2 + (2 if cross == "reduce-scatter" else 1)
        self.scale = None  # set by finish()
        self.target = None
        self.joined = ()
        self.result = None
        self.error = None  # what ended the exchange, raised by its own finish()
        self.done = False
        self.round = 0
        self._steps = self._waiting = None

    def start(self):
        """Encode and start the first collectives; returns the exchange."""
        self._steps = self._run()
        self._waiting = next(self._steps)
        return self

    def payload_plan(self):
        """(settings, (start, stop) of each payload) of the compressed payloads this rank
        sends first: the tensor's, or for the hierarchical exchange its slice's between
        hosts (offsets within the slice)."""
        if self.kind != "hierarchical":
            return self.job.config, self.bounds
        config, _, bounds, _ = self._cross_plan()
        return config, bounds

    @property
    def issued_all(self):
        """Whether every collective of the started exchange has been issued: it waits on its
        last round's (or has ended), and what is left is to wait and decode."""
        return self.done or self.round >= self.rounds - 1

    @property
    def waiting(self):
        """The collectives (handles, or TF tensors) the exchange waits on next."""
        return self._waiting[1]

    def advance(self):
        """Wait for the collectives the exchange waits on and go on to its next wait (or its
        end, which needs the scale). An error ends the exchange and is kept for its own
        finish(): advanced for another tensor's sake, it must not fail that tensor."""
        try:
            received = [self.collectives.wait(handle) for handle in self._waiting[1]]
            self._waiting = self._steps.send(received)
            self.round = self._waiting[0]
        except StopIteration as stop:
            self.result, self.done = stop.value, True
        except Exception as error:  # noqa: BLE001 (any error: raised by its own finish())
            self.error, self.done = error, True

    def ready_for(self, round_):
        """Go on until every collective of this exchange up to ``round_`` (or its last, if it
        has fewer) has started: what another exchange's wait at ``round_`` needs. Never goes
        past its last round's waits, after which it needs its scale."""
        while not self.done and self.round < min(round_, self.rounds - 1):
            self.advance()

    def finish(self, scale, target=None):
        """Decode the exchange: ``scale`` times the sum over ranks, flat, in ``target`` where
        given. Callers with collectives that block (PyTorch) first make every other exchange
        in flight ready_for this one's rounds (see run_to_end)."""
        self.scale, self.target = scale, target
        while not self.done:
            self.advance()
        return self.outcome()

    def outcome(self):
        """The result of a done exchange, or the error that ended it."""
        if self.error is not None:
            raise self.error
        return self.result

    # -- the exchanges -----------------------------------------------------------------------

    def _run(self):
        job = self.job
        counts = dict(compressed_tensors=1, elements=job.numel or 0, **{self.kind: 1})
        if self.kind == "hierarchical":
            return (yield from self._hierarchical(counts))
        layout = _Layout(self.bounds, self.parts, job.config, job.process_set, job.size,
                         job.collective_name, job.base_name)
        if self.kind == "allgather":
            return (yield from self._allgather(job.values, layout, 0, counts, scaled=True))
        return (yield from self._reduce_scatter(job.values, layout, 0, counts, scaled=True))

    def _encode(self, slot_base, layout, counts):
        """The function that encodes the payloads ``which`` of ``layout`` of a flat array; the
        tensor's counters (``counts``, where given) go with its first payload."""
        job, codec = self.job, self.codec

        def encode(values, step, which):
            shape = self._shape(values)
            flat = values.reshape(-1)
            payloads = [codec.encode(flat[layout.bounds[i][0]:layout.bounds[i][1]],
                                     slot_base + layout.parts[i], int(step), shape,
                                     layout.config, job.label)
                        for i in which]
            extra = {}
            if counts and which[0] == 0:
                elements = job.numel if job.numel is not None else int(values.size)
                extra = dict(counts, elements=elements)
                codec.state.note_release(job.base_name, elements, job.config)
            codec.state.count(payload_bytes=sum(codec.nbytes(p) for p in payloads), **extra)
            return payloads

        return encode

    def _allgather(self, values, layout, round_, counts, scaled):
        """Each payload encoded and allgathered as soon as it is encoded; decoded as each
        arrives (where the collectives block: ``pipelined``) or all at once (TF)."""
        encode, ops = self._encode(layout.base_name + layout.suffix, layout, counts), \
            self.collectives
        sent, handles = [], []
        for index, part in enumerate(layout.parts):
            payload, = ops.compute(lambda v, s, index=index: tuple(encode(v, s, [index])),
                                   [values, self.job.step], [_PAYLOAD], [[None]])
            sent.append(payload)
            handles.append(ops.allgather(payload, layout.name + part, layout.process_set))
        total = None
        if ops.pipelined:
            for index, handle in enumerate(handles):
                received, = yield (round_, [handle])
                if received is None:
                    self._check_refused_all(handles[index + 1:], index)
                    return (yield from self._sum_joined(sent, layout, round_, scaled))
                self._check_joined("allgather")
                total = self._decode_parts(total, [index], [received], layout, scaled)
            return total
        received = yield (round_, handles)
        if any(r is None for r in received):
            if not all(r is None for r in received):
                raise RuntimeError(_PARTLY_REFUSED.format(self.job.base_name))
            return (yield from self._sum_joined(sent, layout, round_, scaled))
        self._check_joined("allgather")
        return self._decode_parts(None, range(len(handles)), received, layout, scaled)

    def _decode_parts(self, total, which, received, layout, scaled):
        """Decode each rank's payloads of parts ``which`` (their buffers ``received``) into
        their places in ``total`` (a new array if None)."""
        which = list(which)
        inputs = ([self.scale] if scaled else []) + [total] * (total is not None) + \
            list(received) + self._runtime_inputs()

        def decode(*inputs):
            inputs = list(inputs)
            scale = float(inputs.pop(0)) if scaled else 1.0
            out = inputs.pop(0) if total is not None else None
            buffers, runtime = inputs[:len(which)], inputs[len(which):]
            shape, numel, bounds = self._layout(layout.bounds, *runtime)
            if out is None:
                out = self._decode_target(numel, scaled)
            for index, buffer in zip(which, buffers):
                start, stop = bounds[index]
                self._decode_sum(buffer, self._expect(layout.config, stop - start, shape),
                                 scale, out[start:stop], layout.size)
            return (out,)

        out, = self.collectives.compute(decode, inputs, [self.codec.out_dtype],
                                        [self._out_shape(scaled)])
        return out

    def _reduce_scatter(self, values, layout, round_, counts, scaled):
        """The chunks to their owners in one alltoall; each owner's sum quantized again at the
        second round's widths (plan.second_widths) and allgathered; decoded by every rank."""
        job, codec, ops = self.job, self.codec, self.collectives
        slot_base = layout.base_name + layout.suffix
        encode = self._encode(slot_base, layout, counts)

        def encode_chunks(values, step):
            payloads = encode(values, step, list(range(len(layout.bounds))))
            return codec.concatenate(payloads), codec.sizes(payloads)

        payload, splits = ops.compute(encode_chunks, [values, job.step], [_PAYLOAD, _SIZES],
                                      [[None], [len(layout.bounds)]])
        received, = yield (round_, [ops.alltoall(payload, splits, layout.name,
                                                 layout.process_set)])
        if received is None:
            sent = ops.compute(lambda p, s: tuple(codec.split_sizes(p, s)), [payload, splits],
                               [_PAYLOAD] * len(layout.bounds), [[None]] * len(layout.bounds))
            return (yield from self._sum_joined(sent, layout, round_, scaled))
        self._check_joined("alltoall")
        stages = second_round_configs(layout.config, layout.size)
        rank = layout.process_set.rank()
        slot = slot_base + REDUCED

        def reduce_own_chunk(received, step):
            shape = self._shape()
            start, stop = layout.bounds[rank]
            chunk_sum = codec.empty(stop - start, codec.chunk_dtype)
            self._decode_sum(received, self._expect(layout.config, stop - start, shape), 1.0,
                             chunk_sum, layout.size)

            def encode(values, stage, config):
                return codec.encode(values, slot + (f"{STAGE}{stage}" if stage else ""),
                                    int(step), shape, config, job.label, first_round=False)

            def decode(payload, config):
                decoded = codec.empty(stop - start, codec.chunk_dtype)
                codec.decode_sum(payload, self._expect(config, stop - start, shape), 1.0,
                                 decoded)
                return decoded

            payloads = encode_in_stages(encode, decode, chunk_sum, stages)
            reduced = payloads[0] if len(payloads) == 1 else codec.concatenate(payloads)
            codec.state.count(payload_bytes=codec.nbytes(reduced))
            return (reduced,)

        reduced, = ops.compute(reduce_own_chunk, [received, job.step], [_PAYLOAD], [[None]])
        gathered, = yield (round_ + 1, [ops.allgather(reduced, layout.name + REDUCED,
                                                      layout.process_set)])
        if gathered is None:
            raise RuntimeError(f"Horovod refused the second round of {job.base_name!r} because "
                               "a rank has joined (hvd.join()) after its first")
        inputs = ([self.scale] if scaled else []) + [gathered]

        def decode_chunks(*inputs):
            scale = float(inputs[0]) if scaled else 1.0
            gathered = inputs[-1]
            shape, numel, bounds = self._layout(layout.bounds)
            out = self._decode_target(numel, scaled)
            ends = iter(codec.payload_ends(gathered, len(bounds) * len(stages)))
            begin = 0
            for start, stop in bounds:
                for stage, config in enumerate(stages):  # a residual stage adds to the first
                    into = out[start:stop] if stage == 0 else \
                        codec.empty(stop - start, codec.out_dtype)
                    end = next(ends)
                    self._decode_sum(gathered[begin:end], self._expect(config, stop - start,
                                                                       shape),
                                     scale, into, 1)
                    if stage:
                        out[start:stop] += into
                    begin = end
            return (out,)

        out, = ops.compute(decode_chunks, inputs, [codec.out_dtype], [self._out_shape(scaled)])
        return out

    def _cross_plan(self):
        """(settings, kind, bounds, parts) of this rank's slice's exchange between hosts."""
        hosts = self.job.hosts
        start, stop = self.bounds[hosts.local_index]
        config = cross_config(self.job.config, hosts)
        return (config, *plan(config, stop - start, hosts.cross_size))

    def _hierarchical(self, counts):
        job, codec, ops, hosts = self.job, self.codec, self.collectives, self.job.hosts
        # (the step goes in, unused, so that in TF graphs the step op, which refuses graphs
        # traced before a reset, runs before the first collective)
        full, = ops.compute(lambda v, step: (codec.full_precision(v),), [job.values, job.step],
                            [codec.chunk_dtype], [[job.numel]])
        host_sum, = yield (0, [ops.reducescatter_sum(full, job.collective_name + LOCAL,
                                                     hosts.local)])
        if host_sum is None:
            raise RuntimeError(f"Horovod refused the hierarchical exchange of "
                               f"{job.base_name!r} because a rank has joined (hvd.join()): "
                               "use exchange='allgather' or 'reduce-scatter' with hvd.join()")
        self._check_joined("reducescatter")
        config, kind, bounds, parts = self._cross_plan()
        layout = _Layout(bounds, parts, config, hosts.cross, hosts.cross_size,
                         job.collective_name + self.parts[0], job.base_name,
                         suffix=self.parts[0])
        run = self._allgather if kind == "allgather" else self._reduce_scatter
        host_total = yield from run(host_sum, layout, 1, counts, scaled=False)
        gathered, = yield (self.rounds - 1, [ops.allgather(host_total, job.collective_name + HOST,
                                                           hosts.local)])
        if gathered is None:
            raise RuntimeError(f"Horovod refused the hierarchical exchange of "
                               f"{job.base_name!r} because a rank has joined (hvd.join())")

        def scaled(scale, gathered):
            out = self.target if self.target is not None else codec.empty(job.numel,
                                                                           codec.out_dtype)
            return (codec.scale_into(out, gathered, float(scale)),)

        out, = ops.compute(scaled, [self.scale, gathered], [codec.out_dtype], [[job.numel]])
        return out

    def _sum_joined(self, sent, layout, round_, scaled):
        """``scale`` times the sum of the contributing ranks' payloads, where Horovod refused
        the exchange because a rank has called hvd.join(). Horovod runs allreduces then, the
        joined ranks contributing zeros, so each contributing rank decodes its own payloads and
        one allreduce sums them: the sum the exchange would have decoded (in another order; the
        reduce-scatter's sums are not quantized again), with the error-feedback residuals and
        the privacy noise as encoded. It moves the tensor uncompressed, in the decoder's dtype,
        and only while a rank has joined."""
        def decode_own(*sent):
            shape, numel, bounds = self._layout(layout.bounds)
            own = self.codec.empty(numel, self.codec.out_dtype)
            for (start, stop), payload in zip(bounds, sent):
                self._decode_sum(payload, self._expect(layout.config, stop - start, shape), 1.0,
                                 own[start:stop], 1)
            return (own,)

        own, = self.collectives.compute(decode_own, list(sent), [self.codec.out_dtype],
                                        [[None]])
        # the exchange's last round now: ready_for() stops before it, as the scale comes after
        self.rounds = round_ + 2
        summed, = yield (round_ + 1, [self.collectives.allreduce_sum(
            own, layout.name + JOINED, layout.process_set)])
        inputs = [self.scale if scaled else 1.0, summed]

        def scale_sum(scale, summed):
            numel = self._layout(layout.bounds)[1]
            out = self._decode_target(numel, scaled)
            return (self.codec.scale_into(out, summed, float(scale)),)

        out, = self.collectives.compute(scale_sum, inputs, [self.codec.out_dtype],
                                        [self._out_shape(scaled)])
        return out

    # -- helpers -----------------------------------------------------------------------------

    def _check_joined(self, exchange):
        if self.joined:
            raise RuntimeError(cached_exchange_under_join(self.joined, exchange))

    def _check_refused_all(self, later, index):
        """A rank that joins has started all of a tensor's collectives or none: Horovod refuses
        all of its parts, or none."""
        answers = [self.collectives.wait(handle) for handle in later]
        if index or any(answer is not None for answer in answers):
            raise RuntimeError(_PARTLY_REFUSED.format(self.job.base_name))

    def _runtime_inputs(self):
        return [] if self.job.runtime_shape is None else [self.job.runtime_shape]

    def _shape(self, values=None):
        """The tensor's shape (what payloads carry a tag of)."""
        if self.job.shape is not None:
            return tuple(self.job.shape)
        return tuple(values.shape)

    def _layout(self, bounds, runtime_shape=None):
        """(shape, numel, the (start, stop) of each payload): static, or from the tensor's
        runtime shape (a tensor of a size known only when the graph runs)."""
        if runtime_shape is None:  # (the hierarchical exchange's slice ends before numel)
            shape, numel = self._shape(), bounds[-1][1]
        else:
            shape = tuple(int(d) for d in runtime_shape)
            numel = int(np.prod(shape))
        return shape, numel, [(start, numel if stop is None else stop) for start, stop in bounds]

    def _out_shape(self, scaled):
        return [self.job.numel] if scaled or self.job.numel is None else [None]

    def _decode_target(self, numel, scaled):
        """Where the tensor's result goes: the caller's ``target`` for the final result where
        given, else a new array; partial sums (unscaled) always a new one."""
        if scaled and self.target is not None:
            return self.target
        return self.codec.empty(numel, self.codec.out_dtype)

    def _expect(self, config, numel, shape):
        """The header every payload of ``numel`` elements sent with ``config`` must have."""
        return core.PayloadHeader.describe(config.scheme, config.bits, self.job.dtype_name,
                                           numel, config.bucket_size, shape)

    def _decode_sum(self, received, expect, factor, out, expected_count):
        """codec.decode_sum(...), checking it found ``expected_count`` payloads; its time goes
        to the tensor's metrics."""
        started = time.perf_counter()
        count = self.codec.decode_sum(received, expect, factor, out)
        self.codec.state.metrics.add_to_last(self.job.label,
                                             decode_seconds=time.perf_counter() - started)
        if count != expected_count:
            raise core.PayloadError(f"received {count} payloads, expected {expected_count}")


_PARTLY_REFUSED = ("Horovod refused some of the allgathers of {!r} because a rank has joined "
                   "(hvd.join()), and ran others: its parts cannot be summed")


def residual_slots(config, numel, size, rank, hosts, base_name):
    """Where in a tensor of ``numel`` elements each error-feedback residual slot of its
    exchange (named as the driver names its payloads, under ``base_name``) lies on this rank
    (``rank`` of ``size``; ``hosts`` as plan.plan's): [(slot, role, start, stop)]. ``role``
    tells what the residual is of: "" this rank's own gradient (a part or chunk), REDUCED (and
    its stages) the sum of the chunk this rank owns in a reduce-scatter. A layout that changes
    (DDP's rebuilt buckets) moves residuals from one slot to another of the same role."""
    kind, bounds, parts = plan(config, numel, size, hosts)
    if kind == "hierarchical":  # the slice this rank exchanges between hosts
        start, stop = bounds[hosts.local_index]
        inner = residual_slots(cross_config(config, hosts), stop - start, hosts.cross_size,
                               hosts.cross.rank(), None, base_name + parts[0])
        return [(slot, role, start + a, start + b) for slot, role, a, b in inner]
    slots = [(base_name + part, "", a, b) for part, (a, b) in zip(parts, bounds)]
    if kind == "reduce-scatter":
        start, stop = bounds[rank]
        for stage in range(len(second_round_configs(config, size))):
            role = REDUCED + (f"{STAGE}{stage}" if stage else "")
            slots.append((base_name + role, role, start, stop))
    return slots


class _Layout:
    """One flat exchange's payloads: ``bounds`` and name ``parts`` (plan.plan), its settings,
    process set and its ``size``, its collectives' base ``name``; ``suffix`` goes between the
    tensor's base name and the parts' in payload slots (the hierarchical exchange's slice)."""

    def __init__(self, bounds, parts, config, process_set, size, name, base_name, suffix=""):
        self.bounds, self.parts, self.config = bounds, parts, config
        self.process_set, self.size, self.name = process_set, size, name
        self.base_name, self.suffix = base_name, suffix


def encode_in_stages(encode, decode, values, stages):
    """The payloads of ``values`` at each of the settings ``stages`` (plan.second_widths): the
    first quantizes ``values``, each next one what the ones before left of it (``values`` minus
    the decoded payloads), so their decoded sum errs by the product of their errors.
    ``encode(values, stage, config)`` makes a payload; ``decode(payload, config)`` reads one
    back as every receiver will."""
    payloads, rest = [], values
    for stage, config in enumerate(stages):
        payloads.append(encode(rest, stage, config))
        if stage + 1 < len(stages):
            rest = rest - decode(payloads[-1], config)
    return payloads


def run_to_end(exchange, in_flight):
    """Finish-side scheduling where collectives block (PyTorch): before ``exchange`` waits on a
    collective of round k, every exchange in ``in_flight`` (this rank's, all started before any
    finishes: Horovod runs every compress() before the first decompress()) has started its
    collectives up to round k. Any rank waiting at round k has then started every collective
    of round k or less, so the rank waiting at the lowest round waits on collectives every rank
    has started: ranks that finish tensors in different orders cannot wait on each other
    forever. Exchanges of one round (the allgather) are never waited on for another's sake."""
    while not exchange.done:
        for other in list(in_flight):
            if other is not exchange:
                other.ready_for(exchange.round)
        exchange.advance()
    return exchange.outcome()


class NumpyCodec:
    """The core on the host, on numpy arrays: the codec of the TensorFlow adapter and of
    PyTorch's CPU tensors. ``state``: the compressor's CompressorState (error feedback,
    counters, metrics); ``key(slot)``: the random stream's key of a payload; ``dtype_name``: the
    tensor's; ``out_dtype``: what sums are decoded into (float32 results are rounded once, in
    the decoder; others go through float64); ``chunk_dtype``: the full-precision work dtype
    (float64 for float64 tensors, else float32)."""

    def __init__(self, state, key, dtype_name, empty=None):
        self.state, self.key, self.dtype_name = state, key, dtype_name
        self.out_dtype = np.float32 if dtype_name == "float32" else np.float64
        self.chunk_dtype = np.float64 if dtype_name == "float64" else np.float32
        self._empty = empty or np.empty

    def encode(self, values, slot, step, shape, config, record, first_round=True):
        return self.state.encode(np.ascontiguousarray(values), slot, self.key(slot), step,
                                 self.dtype_name, shape, config, record, first_round)

    def decode_sum(self, received, expect, factor, out):
        return HOST_CORE.decode_sum(np.asarray(received), expect, factor, out.dtype, out=out)[1]

    def empty(self, numel, dtype):
        return self._empty(numel, dtype)

    def full_precision(self, values):
        return np.ascontiguousarray(values.reshape(-1), self.chunk_dtype)

    def scale_into(self, out, values, scale):
        np.multiply(np.asarray(values).reshape(-1), scale, out=out, casting="unsafe")
        return out

    @staticmethod
    def concatenate(payloads):
        return np.concatenate(payloads)

    @staticmethod
    def sizes(payloads):
        return np.array([p.size for p in payloads], _SIZES)

    @staticmethod
    def split_sizes(payload, sizes):
        return np.split(np.asarray(payload), np.cumsum(sizes)[:-1])

    @staticmethod
    def nbytes(payload):
        return payload.size

    @staticmethod
    def payload_ends(gathered, count):
        return payload_ends(np.asarray(gathered), count)


def payload_ends(buffer, count):
    """The end offset of each of the ``count`` payloads packed one after another in ``buffer``
    (a numpy uint8 array), read from their headers; a PayloadError where they do not fill it."""
    ends, offset = [], 0
    for index in range(count):
        if offset >= buffer.size:
            raise core.PayloadError(f"received {index} reduced chunks from {count} ranks")
        offset = core.codec.split(buffer, offset).end
        ends.append(offset)
    if offset != buffer.size:
        raise core.PayloadError(f"received {buffer.size} bytes of reduced chunks, expected "
                                f"{offset}")
    return ends
