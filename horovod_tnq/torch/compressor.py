"""Horovod Compressor that quantizes with the core and exchanges packed codes by allgather, or
by alltoall + allgather (the reduce-scatter exchange).

See horovod_tnq/protocol for the protocol that fits it into Horovod's allreduce interface, and
the state (steps, error-feedback residuals) that this adapter keeps in ``self.state``. The
codec runs where the tensor's data is best handled (``HostCodec``: the core on the host,
``DeviceCodec``: the GPU kernels on the tensor's device); the exchange is written once for both.
"""

import copy
import dataclasses
import threading
import time
from typing import Any
import warnings

import horovod.torch as hvd
import numpy as np
import torch
from horovod.torch.compression import Compressor

from .. import core
from ..protocol import (JOINED, REDUCED, CompressorBase, DefaultInstanceMethod, Pending,
                        cached_exchange_under_join, check_settings_agree,
                        exchange_refused_by_join, gradient_owner, horovod_call_site, plan,
                        plan_code, probe_values, read_probe, second_round_config,
                        settings_buffer)

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.float64: "float64"}
_SUPPORTED_DEVICES = ("cpu", "cuda")
# Tests set this to run the GPU kernels' path on CPU tensors under Triton's interpreter, so
# that the device path is exercised with real horovodrun workers on machines without a GPU.
KERNELS_FOR_CPU_TENSORS = False


@dataclasses.dataclass(eq=False)
class _Pending(Pending):
    # this rank's payloads on the codec's device, one per (start, stop) of ``bounds``: what it
    # sums by allreduce where Horovod refuses the exchange because a rank has joined
    sent: Any = None
    joined: tuple = ()  # the ranks that the probe found joined (stock path)


# ctx.second_round of a reduce-scatter whose alltoall Horovod refused (a rank has joined)
_REFUSED_BY_JOIN = object()


def host_values(tensor):
    """The flat numpy array the core reads: float64 stays, every other float becomes float32
    (numpy has no bfloat16; float32 holds float16 and bfloat16 exactly)."""
    work = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return tensor.detach().to("cpu", work).reshape(-1).numpy()


def encode_tensor(tensor, config, key, step):
    """The payload (numpy uint8) of one whole torch tensor, without error feedback."""
    return core.encode(host_values(tensor), scheme=config.scheme, bits=config.bits,
                       bucket_size=config.bucket_size, key=key, step=step,
                       dtype_name=_DTYPE_NAMES[tensor.dtype], shape=tensor.shape,
                       options=config.scheme_options())


def sum_dtype(dtype):
    """What payloads of a ``dtype`` tensor are summed into: float32 results are rounded once,
    in the decoder; the others go through float64, on either codec, so both give equal bits."""
    return torch.float32 if dtype == torch.float32 else torch.float64


class HostCodec:
    """The core on the host (numpy views of CPU tensors), with one tensor's settings
    (``config``); error feedback in the state."""

    device = torch.device("cpu")

    def __init__(self, compressor, config):
        self.compressor = compressor
        self.config = config

    def values(self, tensor):
        """``tensor`` flat, as this codec encodes it (a CPU tensor sharing host_values)."""
        return torch.from_numpy(host_values(tensor))

    def encode(self, values, slot, step, dtype, shape, record, first_round=True):
        """The payload (uint8 tensor) of flat ``values`` (from values(), or a sum of decoded
        chunks) named ``slot``, a part of a tensor of ``dtype`` and ``shape``; ``record``,
        ``first_round``: as CompressorState.encode's (the metrics)."""
        payload = self.compressor.state.encode(values.numpy(), slot, self.compressor.key(slot),
                                               step, _DTYPE_NAMES[dtype], shape, self.config,
                                               record, first_round)
        return torch.from_numpy(payload)

    def header(self, payload, numel, dtype, shape):
        return core.read_header(payload.numpy())

    def with_config(self, config):
        """This codec with other settings (the reduce-scatter's second round)."""
        if config is self.config:
            return self
        other = copy.copy(self)
        other.config = config
        return other

    def decode_sum(self, received, expect, factor, out):
        """``factor`` times the sum of the payloads in ``received`` into ``out`` (a contiguous
        float32/float64 CPU tensor); the number of payloads."""
        _, count = core.decode_sum(received.numpy(), expect, factor, out.numpy().dtype,
                                   out=out.numpy())
        return count

    def for_horovod(self, payload):
        return payload

    def received(self, tensor):
        return tensor


class DeviceCodec(HostCodec):
    """The GPU kernels (core/gpu) on the tensor's device: the float data never leaves it. Only
    the packed payloads reach Horovod, on the device where Horovod has NCCL, else through host
    memory; headers are built on the host (a few bytes).

    If a kernel fails to compile or launch (core.gpu.KernelError), the kernels are off for the
    rest of the process, with one warning naming the error: the payload being encoded is made
    by the core on the host instead, before anything reaches Horovod, and received payloads are
    decoded there from the same bytes; so are later tensors'. Payloads still reach Horovod where
    the other ranks' do (on the device with NCCL), so every rank hands each collective tensors
    of one kind. The core makes the same bytes and sums, so results do not change and ranks
    still agree."""

    failure = None  # the first KernelError in this process, once the kernels are off
    _failure_lock = threading.Lock()

    def __init__(self, compressor, config, device):
        super().__init__(compressor, config)
        self.device = device

    @staticmethod
    def kernels_failed(error):
        """Turn the kernels off for this process after ``error`` (a core.gpu.KernelError),
        warning once, whichever thread fails first."""
        with DeviceCodec._failure_lock:
            if DeviceCodec.failure is not None:
                return
            DeviceCodec.failure = error
        warnings.warn(f"horovod_tnq: {error}. The GPU codec is off for the rest of this "
                      "process: the host codec encodes and decodes instead (the same bytes and "
                      "results, with copies between the device and the host)", RuntimeWarning,
                      stacklevel=3)

    def values(self, tensor):
        return tensor.detach().reshape(-1)

    def encode(self, values, slot, step, dtype, shape, record, first_round=True):
        if DeviceCodec.failure is None:
            config, started = self.config, time.perf_counter()
            try:
                payload = _gpu().encode(values, scheme=config.scheme, bits=config.bits,
                                        bucket_size=config.bucket_size,
                                        key=self.compressor.key(slot), step=step,
                                        dtype_name=_DTYPE_NAMES[dtype], shape=shape)
            except _gpu().KernelError as error:
                self.kernels_failed(error)
            else:
                # (no error estimate: it would read the payload's bucket parameters back to
                # the host)
                self.compressor.state.record_payload(record, step, payload.numel(),
                                                     time.perf_counter() - started,
                                                     values.numel() if first_round else 0)
                return payload
        payload = HostCodec.encode(self, HostCodec.values(self, values), slot, step, dtype,
                                   shape, record, first_round)
        return payload.to(self.device)  # where the kernels' payloads are (torch.cat of parts)

    def header(self, payload, numel, dtype, shape):
        config = self.config
        return core.PayloadHeader.describe(config.scheme, config.bits, _DTYPE_NAMES[dtype],
                                           numel, config.bucket_size, shape)

    def decode_sum(self, received, expect, factor, out):
        if DeviceCodec.failure is None:
            try:
                return _gpu().decode_sum(received, expect, factor, out_dtype=out.dtype,
                                         out=out)[1]
            except _gpu().KernelError as error:
                self.kernels_failed(error)
        total = torch.empty(out.numel(), dtype=out.dtype)
        count = HostCodec.decode_sum(self, received.cpu(), expect, factor, total)
        out.view(-1).copy_(total)
        return count

    def for_horovod(self, payload):
        return payload if payload.is_cuda and hvd.nccl_built() else payload.cpu()

    def received(self, tensor):
        return tensor.to(self.device)


class TNQCompressor(CompressorBase, Compressor):
    """Truncated Non-uniform Quantization of gradients for ``horovod.torch``.

    Args:
        bits: bits per element on the wire, 1 to 8 (for "topk" and "tnq-sparse" the budget in
            bits per element of the whole payload, for "dqsgd" the widest width, for
            "dp-binomial" the levels before noise).
        scheme: "tnq-rht" (the default: each bucket randomly rotated, then rounded to the
            levels that are optimal for the Gaussian the rotation makes of it; unbiased),
            "tnq" (the paper's closed form), "tnq-fit", "tnq-opt", "tnq-sparse" (the largest
            entries on fitted non-uniform levels, core/tnq_sparse.py), or another scheme of
            core.SCHEMES: "tnq-uniform", "qsgd", "qsgdinf", "nuqsgd", "maxmin", "orq",
            "bingrad" (1 bit), "terngrad" (2 bits), "sign" (1 bit), "topk" (adaptive Top-K),
            "dqsgd" (width chosen per step), "dp-binomial" (differential privacy); see
            get_compressor.
        bucket_size: elements sharing one scale (and, for "maxmin" and "bingrad", an offset;
            for "tnq-rht" a power of two, the block each rotation mixes);
            each costs 32 / bucket_size bits per element.
        min_numel: tensors with fewer elements, and non-float tensors, take Horovod's ordinary
            allreduce uncompressed: compression does not pay for them.
        seed: seeds stochastic rounding, together with rank, tensor name and step.
        error_feedback: decay factor in (0, 1] to add each rank's accumulated quantization error
            to its next gradient before quantizing (ECQ-SGD); 0 turns it off; the default
            (None) is 1.0 for "topk" and "tnq-sparse" and 0 otherwise. Checkpoint
            ``state_dict()`` with the model to resume exactly.
        exchange: "allgather", "reduce-scatter", or "auto" (the reduce-scatter from 3 ranks on,
            for tensors of at least one bucket per rank): see horovod_tnq/protocol/plan.py.
        part_elements: in the allgather exchange, tensors larger than this go as several
            payloads, so encoding, transfer and decoding overlap (0: one payload per tensor).
        overrides: per-tensor settings by parameter name: ``{"*embed*": {"bits": 8},
            "*norm*": None}`` gives tensors whose name matches ``*embed*`` 8 bits and sends
            those matching ``*norm*`` uncompressed (glob patterns against ``named_parameters``
            names, first match wins; a setting may be any of the above but ``seed``, or the
            scheme's options). See docs/overrides.md.
        min_bits, nmse_target: "dqsgd" only (core/dynamic.py).
        dp_clip, dp_epsilon, dp_delta, dp_sensitivity: "dp-binomial" only (core/privacy.py);
            ``privacy_spent()`` reports what a run has spent.

    CUDA gradients of "tnq-rht" and "tnq" without error feedback are encoded and decoded on
    their device by the GPU kernels (core/gpu); only packed payloads reach Horovod, on the
    device where Horovod has NCCL, else through host memory. Everything else is encoded by the
    core on the host. Both make the same bytes (a payload of either decodes on the other);
    a job whose ranks take different paths into an NCCL collective is untested.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._in_flight = []  # reduce-scatter contexts between compress() and decompress()
        self._in_flight_lock = threading.Lock()
        self._settings_check = None  # the allgather of every rank's settings digest
        self._settings_agreed = False

    def should_compress(self, tensor, config=None):
        """Whether ``tensor`` is quantized with ``config`` (its settings; the compressor's by
        default) or passed to Horovod's allreduce as it is."""
        return tensor.dtype in _DTYPE_NAMES and \
            tensor.numel() >= (config or self.config).min_numel

    @DefaultInstanceMethod
    def compress(self, tensor):
        if tensor.is_sparse:
            raise TypeError("TNQCompressor needs dense gradients; use sparse_as_dense=True")
        if tensor.device.type not in _SUPPORTED_DEVICES:
            raise TypeError(f"TNQCompressor supports CPU and CUDA tensors, got device "
                            f"{tensor.device}")
        name, process_set = horovod_call_site()
        owner, names = gradient_owner(tensor)
        config = self.config_for(owner or name, names)
        if config is None or not self.should_compress(tensor, config):
            self.state.passthrough(owner or name, tensor.numel(),
                                   tensor.numel() * tensor.element_size())
            return tensor, None

        pending = self.start(tensor, name, process_set, config, owner)
        process_set = pending.process_set
        probe = torch.tensor(probe_values(process_set.rank(),
                                          plan_code(pending.kind, pending.bounds),
                                          process_set.size()),
                             dtype=torch.float32)
        return probe, pending

    def start(self, tensor, name=None, process_set=None, config=None, label=None):
        """Encode a float tensor with ``config`` (its settings; the compressor's by default)
        and start its exchange; returns the context for finish(). ``label``: its name in
        metrics() (its collectives' base name by default).

        compress() calls it with the name of the Horovod allreduce it serves; the fused
        DistributedOptimizer (optimizer.py) calls it directly, with its buckets' names.
        """
        process_set = process_set or hvd.global_process_set
        self._start_settings_check(process_set)
        state = self.state
        base_name, collective_name = state.namer.acquire(name)
        try:
            return self._start(tensor, process_set, base_name, collective_name,
                               config or self.config, label or base_name)
        except Exception:
            state.namer.release(base_name)  # nothing of it is in flight
            raise

    def _start(self, tensor, process_set, base_name, collective_name, config, label):
        state = self.state
        step = state.next_step(base_name)
        numel = tensor.numel()
        state.note_release(base_name, numel, config)
        kind, bounds, parts = plan(config, numel, process_set.size())
        state.count(elements=numel, compressed_tensors=1, **{kind: 1})
        codec = self.codec_for(tensor, config)
        values = codec.values(tensor)
        pending = _Pending(None, None, base_name, tensor.shape, tensor.dtype, process_set,
                           tensor.device, kind, bounds, collective_name, step, codec=codec,
                           label=label)
        if kind == "allgather":
            # each part goes out as soon as it is encoded, so it travels while the next encodes
            pending.exchange, pending.header, pending.sent = [], [], []
            for (begin, stop), part in zip(bounds, parts):
                payload = codec.encode(values[begin:stop], base_name + part, step, tensor.dtype,
                                       tensor.shape, label)
                pending.sent.append(payload)
                state.count(payload_bytes=payload.numel())
                pending.exchange.append(hvd.allgather_async(
                    codec.for_horovod(payload), name=collective_name + part,
                    process_set=process_set))
                pending.header.append(codec.header(payload, stop - begin, tensor.dtype,
                                                   tensor.shape))
            return pending
        payloads = [codec.encode(values[begin:stop], base_name + part, step, tensor.dtype,
                                 tensor.shape, label) for (begin, stop), part in zip(bounds, parts)]
        pending.sent = payloads
        splits = torch.tensor([p.numel() for p in payloads], dtype=torch.int32)
        state.count(payload_bytes=int(splits.sum()))
        pending.exchange = hvd.alltoall_async(codec.for_horovod(torch.cat(payloads)),
                                              splits=splits, name=collective_name,
                                              process_set=process_set)
        begin, stop = bounds[process_set.rank()]
        pending.header = codec.header(payloads[process_set.rank()], stop - begin, tensor.dtype,
                                      tensor.shape)
        with self._in_flight_lock:
            self._in_flight.append(pending)
        return pending

    @DefaultInstanceMethod
    def reset(self):
        super().reset()
        with self._in_flight_lock:
            self._in_flight = []
            self._settings_check, self._settings_agreed = None, False

    def key(self, slot):
        """The random stream's key of payload ``slot`` on this rank."""
        return core.stream_key(self.config.seed, hvd.rank(), slot)

    def codec_for(self, tensor, config=None):
        """Where ``tensor``'s payloads are made and decoded, with ``config`` (the compressor's
        by default): on its device by the GPU kernels (core/gpu) for CUDA tensors of the schemes
        they have, without error feedback (whose residuals the state keeps on the host; after a
        kernel failed in this process, DeviceCodec runs the core on the host but keeps the
        device's place in Horovod's collectives); by the core on the host otherwise."""
        config = config or self.config
        if (tensor.is_cuda or KERNELS_FOR_CPU_TENSORS) and not config.error_feedback:
            gpu = _gpu()
            if gpu.available() and config.scheme in gpu.SCHEMES:
                return DeviceCodec(self, config, tensor.device)
        return HostCodec(self, config)

    def state_dict(self):
        """CompressorState.state_dict() with the residuals as torch tensors, so a checkpoint
        with the model loads with ``torch.load(weights_only=True)``."""
        state = super().state_dict()
        state["residuals"] = {slot: torch.from_numpy(r) for slot, r in state["residuals"].items()}
        return state

    def load_state_dict(self, state, any_rank=False):
        residuals = {slot: r.numpy() if torch.is_tensor(r) else r
                     for slot, r in state["residuals"].items()}
        super().load_state_dict(dict(state, residuals=residuals), any_rank)

    def _world(self):
        return (hvd.rank(), hvd.size()) if hvd.is_initialized() else (None, None)

    def _start_settings_check(self, process_set):
        """At the first start() (and the first after a reset): every rank's settings digest
        goes out in one allgather, which finish() reads before it waits on any exchange. Ranks
        configured differently would otherwise wait forever in collectives that do not pair
        (an alltoall here, allgathers of other parts there), on tensors whose probes no rank
        has read yet; the probe checks each tensor again."""
        with self._in_flight_lock:
            if self._settings_agreed or self._settings_check is not None:
                return
            mine = torch.from_numpy(settings_buffer(self.config, self.settings.describe()))
            self._settings_check = hvd.allgather_async(
                mine, name=f"horovod_tnq.settings.{self._instance}", process_set=process_set)

    def _check_settings(self):
        with self._in_flight_lock:
            if self._settings_agreed or self._settings_check is None:
                return
            handle, self._settings_check = self._settings_check, None
        gathered = wait_exchange(handle)
        if gathered is None:  # a rank has joined: the check goes out again at the next start()
            return
        check_settings_agree(self.config, gathered.numpy(), self.settings.describe())
        self._settings_agreed = True

    @DefaultInstanceMethod
    def decompress(self, tensor, ctx):
        if ctx is None:
            return tensor
        try:
            self._check_settings()
            size = ctx.process_set.size()
            reading = read_probe(tensor.tolist(), size, plan_code(ctx.kind, ctx.bounds))
            ctx.joined = tuple(sorted(set(range(size)) - set(reading.ranks)))
        except Exception:
            self._abandon(ctx)
            raise
        return self.finish(ctx, reading.scale)

    def finish(self, ctx, scale, out=None):
        """Wait for the exchange of ``ctx`` (from start()), decode and sum every rank's
        contribution, multiply by ``scale``: the reduced tensor, in the original dtype, shape
        and device.

        ``out``: a tensor to decode into where it can be (a contiguous tensor of the result's
        dtype and size on the codec's device, float32 or float64; otherwise it is ignored); then
        the result is a view of it. The fused optimizer passes the flat gradient it sent:
        start() is done with it, and a fresh result of that size would cost page faults on
        every step. If decoding fails (a PayloadError), ``out`` may hold part of the result.
        """
        try:
            self._check_settings()  # (decompress() checked them already; the fused optimizer)
            total = _decode_target(out, ctx)
            if ctx.kind == "allgather":
                if not _decode_parts(ctx, scale, total):
                    _sum_joined(ctx, scale, total)
            else:
                self._start_second_rounds()
                if ctx.second_round is _REFUSED_BY_JOIN:
                    _sum_joined(ctx, scale, total)
                elif ctx.joined:
                    raise RuntimeError(cached_exchange_under_join(ctx.joined, "alltoall"))
                else:
                    self._decode_reduced_chunks(ctx, scale, total)
        finally:
            self._abandon(ctx)
        return total.to(ctx.dtype).reshape(ctx.shape).to(ctx.device)

    def _abandon(self, ctx):
        """ctx is done, or failed: release its name, and never wait on its collectives."""
        self.state.namer.release(ctx.base_name)
        with self._in_flight_lock:
            if ctx in self._in_flight:
                self._in_flight.remove(ctx)

    def _start_second_rounds(self):
        """Second round of the reduce-scatter for every tensor in flight, not just the one being
        decompressed: sum the chunk this rank owns, quantize the sum, start its allgather.

        Every rank finishes all its compress() calls before its first decompress(), so each
        alltoall waited on here completes; and since every rank starts all second rounds before
        waiting on any, ranks that decompress tensors in different orders (Horovod fills in
        missing gradients in set order) cannot wait on each other forever. The allgathers also
        go out together, where Horovod can fuse them. An alltoall that Horovod refused because a
        rank has joined is refused on every rank that started it, so they all sum that tensor
        by allreduce instead (_sum_joined).
        """
        with self._in_flight_lock:
            waiting = [ctx for ctx in self._in_flight if ctx.second_round is None]
        for ctx in waiting:
            codec = ctx.codec
            answer = wait_exchange(ctx.exchange)
            if answer is None:
                ctx.second_round = _REFUSED_BY_JOIN
                continue
            received = codec.received(answer[0])
            chunk_sum = _empty(ctx.header.numel,
                               torch.float64 if ctx.dtype == torch.float64 else torch.float32,
                               codec.device)
            _decode_sum(ctx, received, ctx.header, 1.0, chunk_sum, ctx.process_set.size())
            # the owner's sum, at the second round's wider codes (plan.second_bits)
            wide = codec.with_config(second_round_config(codec.config, ctx.process_set.size()))
            reduced = wide.encode(chunk_sum, ctx.base_name + REDUCED, ctx.step, ctx.dtype,
                                  ctx.shape, ctx.label, first_round=False)
            ctx.second_header = wide.header(reduced, chunk_sum.numel(), ctx.dtype, ctx.shape)
            self.state.count(payload_bytes=reduced.numel())
            ctx.second_round = hvd.allgather_async(codec.for_horovod(reduced),
                                                   name=ctx.collective_name + REDUCED,
                                                   process_set=ctx.process_set)

    def _decode_reduced_chunks(self, ctx, scale, total):
        """Wait for the reduced chunks of ``ctx`` and decode them into place in ``total``,
        times ``scale``. Their lengths are read from their headers (on the host: a few bytes)."""
        gathered = ctx.codec.received(wait(ctx.second_round))
        heads = gathered.cpu().numpy()  # (a view of it on the host codec)
        offset = 0
        for owner, (start, stop) in enumerate(ctx.bounds):
            if offset >= heads.size:
                raise core.PayloadError(f"received {owner} reduced chunks from "
                                        f"{len(ctx.bounds)} ranks")
            end = core.codec.split(heads, offset).end
            # (this rank's own chunk's header: nothing of its data is expected of the others)
            expect = dataclasses.replace(ctx.second_header, numel=stop - start,
                                         num_exceptions=0, zero_runs=0, zeros=0, amax=0.0)
            _decode_sum(ctx, gathered[offset:end], expect, scale, total[start:stop], 1)
            offset = end
        if offset != heads.size:
            raise core.PayloadError(f"received {heads.size} bytes of reduced chunks, "
                                    f"expected {offset}")


# Horovod's synchronize() polls without pause, so a waiting training thread keeps its core busy
# (measured: 100% of a core for the whole wait), a core that the kernel's network stack and the
# other processes need exactly then; a short sleep between polls costs at most that much latency.
POLL_INTERVAL_S = 2e-4


def _gpu():
    """core.gpu, imported when the first tensor that may use it comes: it imports Triton."""
    from ..core import gpu
    return gpu


def wait(handle):
    """hvd.synchronize(handle), sleeping between polls instead of spinning."""
    while not hvd.poll(handle):
        time.sleep(POLL_INTERVAL_S)
    return hvd.synchronize(handle)


def wait_exchange(handle):
    """wait(handle) for a collective of the exchange (an allgather or alltoall), or None where
    Horovod refused it because a rank has called hvd.join() (probe.exchange_refused_by_join)."""
    try:
        return wait(handle)
    except Exception as error:  # Horovod's HorovodInternalError, or its RuntimeError
        if exchange_refused_by_join(error):
            return None
        raise


def _decode_target(out, ctx):
    """The flat tensor to sum into: ``out`` where it can take the result (see finish()), else a
    new one on the codec's device."""
    work, numel = sum_dtype(ctx.dtype), ctx.bounds[-1][1]
    if out is None or out.dtype != work or out.dtype != ctx.dtype or \
            out.device != ctx.codec.device or out.is_sparse or out.requires_grad or \
            not out.is_contiguous() or out.numel() != numel:
        return _empty(numel, work, ctx.codec.device)
    return out.detach().reshape(-1)


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _empty(numel, dtype, device):
    """torch.empty(numel), allocated by numpy on the host: numpy asks the kernel for huge pages
    for large arrays and torch's CPU allocator does not, and a fresh decode target is written
    once, page by page (measured, a 16M-element float32 decode: 76 ms into torch.empty, 26 ms
    into numpy's memory)."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(numel, _NUMPY_DTYPES[dtype]))


def _decode_parts(ctx, scale, total):
    """Each part of an allgathered tensor decoded as soon as it arrives (while later parts are
    still on the wire), into its place in ``total``; False, with nothing decoded, where Horovod
    refused the allgathers because a rank has joined (it refuses all of a tensor's parts: a
    rank that joins has started all of them or none)."""
    size = ctx.process_set.size()
    for index, ((start, stop), handle, header) in enumerate(zip(ctx.bounds, ctx.exchange,
                                                                 ctx.header)):
        received = wait_exchange(handle)
        if received is None:
            later = [wait_exchange(other) for other in ctx.exchange[index + 1:]]
            if index or any(answer is not None for answer in later):
                raise RuntimeError(f"Horovod refused some of the allgathers of {ctx.base_name!r} "
                                   "because a rank has joined (hvd.join()), and ran others: "
                                   "its parts cannot be summed")
            return False
        if ctx.joined:
            raise RuntimeError(cached_exchange_under_join(ctx.joined, "allgather"))
        _decode_sum(ctx, ctx.codec.received(received), header, scale, total[start:stop], size)
    return True


def _sum_joined(ctx, scale, total):
    """``scale`` times the sum of the contributing ranks' payloads of ``ctx`` into ``total``,
    where Horovod refused the exchange because a rank has called hvd.join(). Horovod runs
    allreduces then, the joined ranks contributing zeros, so each contributing rank decodes its
    own payloads and one allreduce sums them: the sum the exchange would have decoded (in
    another order; the reduce-scatter's sums are not quantized again), with the error-feedback
    residuals and the privacy noise as encoded. It moves the tensor uncompressed, in the
    decoder's dtype, and only while a rank has joined."""
    codec = ctx.codec
    for (start, stop), payload in zip(ctx.bounds, ctx.sent):
        header = codec.header(payload, stop - start, ctx.dtype, ctx.shape)
        _decode_sum(ctx, payload, header, 1.0, total[start:stop], 1)
    summed = wait(hvd.allreduce_async(codec.for_horovod(total), op=hvd.Sum,
                                      name=ctx.collective_name + JOINED,
                                      process_set=ctx.process_set))
    total.copy_(codec.received(summed)).mul_(scale)


def _decode_sum(ctx, received, expect, factor, out, expected_count):
    """ctx.codec.decode_sum(...), checking it found ``expected_count`` payloads; its time goes to
    the tensor's metrics."""
    started = time.perf_counter()
    count = ctx.codec.decode_sum(received, expect, factor, out)
    ctx.codec.compressor.state.metrics.add_to_last(
        ctx.label, decode_seconds=time.perf_counter() - started)
    if count != expected_count:
        raise core.PayloadError(f"received {count} payloads, expected {expected_count}")
