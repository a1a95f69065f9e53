"""Horovod Compressor that quantizes with the core and exchanges packed codes through Horovod's
collectives: the allgather, the reduce-scatter (alltoall + allgather) or the hierarchical
exchange, all run by the exchange driver (protocol/exchange.py) over this module's
_Collectives.

See horovod_tnq/protocol for the protocol that fits it into Horovod's allreduce interface, and
the state (steps, error-feedback residuals) that this adapter keeps in ``self.state``. The
codec runs where the tensor's data is best handled (codecs.py: ``HostCodec``, the core on the
host, or ``DeviceCodec``, the GPU kernels on the tensor's device).
"""

import dataclasses
import threading
import time
from typing import Any

import horovod.torch as hvd
import torch
from horovod.torch.compression import Compressor

from .. import core
from ..protocol import (CompressorBase, DefaultInstanceMethod, Hosts, check_settings_agree,
                        exchange_refused_by_join, plan_code, probe_values, read_probe,
                        settings_buffer)
from ..protocol.exchange import Exchange, Job, run_to_end
from ..protocol.hosts import hosts_of_job
from ..protocol.naming import NamedCompression, TensorName
from . import horovod_frames
from .codecs import DTYPE_NAMES, codec_for, sum_dtype

_SUPPORTED_DEVICES = ("cpu", "cuda")


@dataclasses.dataclass(eq=False)  # compared by identity: contexts in flight are in a list
class _Pending:
    """start()'s context for finish(): the tensor's Exchange (protocol/exchange.py), what the
    result is made into, and the ranks the probe found joined (stock path)."""

    exchange: Exchange
    base_name: str
    shape: Any
    dtype: Any
    device: Any
    process_set: Any
    codec: Any
    label: str = ""
    joined: tuple = ()

    @property
    def kind(self):
        return self.exchange.kind

    @property
    def bounds(self):
        return self.exchange.bounds


class _Collectives:
    """Horovod's collectives on a codec's arrays, for the exchange driver: async, waited on
    with wait_exchange; array work runs at once."""

    pipelined = True  # parts are decoded as they arrive

    def __init__(self, codec):
        self.codec = codec

    @staticmethod
    def compute(function, inputs, dtypes, shapes):
        return list(function(*inputs))

    def allgather(self, array, name, process_set):
        return hvd.allgather_async(self._tensor(array), name=name,
                                   process_set=process_set)

    def alltoall(self, array, splits, name, process_set):
        return hvd.alltoall_async(self._tensor(array),
                                  splits=torch.as_tensor(splits, dtype=torch.int32), name=name,
                                  process_set=process_set)

    def allreduce_sum(self, array, name, process_set):
        return hvd.allreduce_async(self._tensor(array), op=hvd.Sum, name=name,
                                   process_set=process_set)

    def reducescatter_sum(self, array, name, process_set):
        return hvd.reducescatter_async(self._tensor(array), op=hvd.Sum, name=name,
                                       process_set=process_set)

    def _tensor(self, array):
        """``array`` as Horovod takes it: a CUDA tensor where Horovod has NCCL, else on the
        host."""
        tensor = self.codec.to_tensor(array)
        return tensor if not tensor.is_cuda or hvd.nccl_built() else tensor.cpu()

    def wait(self, handle):
        """What the collective received, as the codec's array; None where Horovod refused it
        because a rank has joined."""
        answer = wait_exchange(handle)
        if answer is None:
            return None
        if isinstance(answer, tuple):  # alltoall: (received, received splits)
            answer = answer[0]
        return self.codec.from_tensor(answer)


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
        exchange: "allgather", "reduce-scatter", "hierarchical" or "auto" (the hierarchical
            exchange on several hosts of several ranks with dynamic process sets, else the
            reduce-scatter where it sends fewer bits, else the allgather): see
            horovod_tnq/protocol/plan.py.
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
    their device by the GPU kernels (gpu/); only packed payloads reach Horovod, on the
    device where Horovod has NCCL, else through host memory. Everything else is encoded by the
    core on the host. Both make the same bytes (a payload of either decodes on the other);
    a job whose ranks take different paths into an NCCL collective is untested.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._in_flight = []  # contexts between start() and finish(): their exchanges advance
        # together (exchange.run_to_end)
        self._in_flight_lock = threading.Lock()
        self._settings_check = None  # the allgather of every rank's settings digest
        self._settings_agreed = False
        self._hosts = _UNKNOWN  # plan.Hosts of the hierarchical exchange, or None (flat)
        self._hosts_lock = threading.Lock()

    def should_compress(self, tensor, config=None):
        """Whether ``tensor`` is quantized with ``config`` (its settings; the compressor's by
        default) or passed to Horovod's allreduce as it is."""
        return tensor.dtype in DTYPE_NAMES and \
            tensor.numel() >= (config or self.config).min_numel

    @DefaultInstanceMethod
    def compress(self, tensor):
        """Horovod's Compressor interface, for the stock path (``hvd.DistributedOptimizer``,
        ``hvd.allreduce(..., compression=...)``), which does not pass the tensor's names: they
        are read from Horovod's frames (horovod_frames.py). Callers that know them pass them:
        ``compression=compressor.named(...)`` (compress_named)."""
        return self.compress_named(tensor, horovod_frames.tensor_name(tensor))

    @DefaultInstanceMethod
    def named(self, collective=None, parameter=None, names=(), process_set=None):
        """``compression=`` for one Horovod collective whose tensor its caller names:
        ``hvd.allreduce(grad, name=n, compression=compressor.named(n, "fc.weight"))`` compresses
        ``grad`` as ``compress()`` would for the stock optimizer's parameter "fc.weight",
        without reading Horovod's frames. Arguments: naming.TensorName's."""
        return NamedCompression(self, TensorName(collective, parameter, tuple(names),
                                                 process_set))

    @DefaultInstanceMethod
    def compress_named(self, tensor, name):
        """compress() of ``tensor``, named by ``name`` (a naming.TensorName): the probe Horovod
        allreduces, and the context for decompress()."""
        if tensor.is_sparse:
            raise TypeError("TNQCompressor needs dense gradients; use sparse_as_dense=True")
        if tensor.device.type not in _SUPPORTED_DEVICES:
            raise TypeError(f"TNQCompressor supports CPU and CUDA tensors, got device "
                            f"{tensor.device}")
        config = self.config_for(name.setting_name, name.names)
        if config is None or not self.should_compress(tensor, config):
            self.state.passthrough(name.setting_name, tensor.numel(),
                                   tensor.numel() * tensor.element_size())
            return tensor, None

        pending = self.start(tensor, name.collective, name.process_set, config, name.parameter)
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
        DistributedOptimizer (optimizer.py) calls it directly, with its buckets' names and
        settings.
        """
        process_set = process_set or hvd.global_process_set
        self._start_settings_check(process_set)
        hosts = self._hosts_for(process_set)
        state = self.state
        base_name, collective_name = state.namer.acquire(name)
        try:
            config = config or self.config
            codec = self.codec_for(tensor, config)
            job = Job(codec.values(tensor), tensor.numel(), tuple(tensor.shape),
                      DTYPE_NAMES[tensor.dtype], config, base_name, collective_name,
                      label or base_name, state.next_step(base_name), process_set,
                      process_set.size(), hosts)
            pending = _Pending(Exchange(job, codec, _Collectives(codec)).start(), base_name,
                               tensor.shape, tensor.dtype, tensor.device, process_set, codec,
                               label or base_name)
        except Exception:
            state.namer.release(base_name)  # nothing of it is in flight
            raise
        with self._in_flight_lock:
            self._in_flight.append(pending)
        return pending

    @DefaultInstanceMethod
    def reset(self):
        super().reset()
        with self._in_flight_lock:
            self._in_flight = []
            self._settings_check, self._settings_agreed = None, False
            self._hosts = _UNKNOWN

    def key(self, slot):
        """The random stream's key of payload ``slot`` on this rank."""
        return core.stream_key(self.config.seed, hvd.rank(), slot)

    def codec_for(self, tensor, config=None):
        """Where ``tensor``'s payloads are made and decoded, with ``config`` (the compressor's
        by default): codecs.codec_for."""
        return codec_for(self, tensor, config or self.config)

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

    def _hosts_for(self, process_set):
        """plan.Hosts for tensors reduced over ``process_set`` where the hierarchical exchange
        may run (the global process set, several hosts of several ranks, dynamic process
        sets), else None. Found at the first start(), on every rank (protocol/hosts.py)."""
        if process_set is not hvd.global_process_set and \
                process_set.process_set_id != hvd.global_process_set.process_set_id:
            return None
        with self._hosts_lock:  # (compress() may run on several autograd threads at once)
            if self._hosts is _UNKNOWN:
                if self.settings.may_use("hierarchical") and hvd.size() >= 4:
                    # The settings first: ranks configured apart must all raise, not wait in
                    # a gather that only some of them start.
                    self._check_settings()
                    self._hosts = hosts_of_job(hvd, self._gather_places, Hosts)
                else:
                    self._hosts = None
            return self._hosts

    def _gather_places(self):
        place = torch.tensor([[hvd.cross_rank(), hvd.local_rank()]], dtype=torch.int64)
        return hvd.allgather(place, name=f"horovod_tnq.hosts.{self._instance}").tolist()

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
            exchange = ctx.exchange
            exchange.joined = ctx.joined
            exchange.scale = scale
            target = _decode_target(out, ctx)
            exchange.target = None if target is None else ctx.codec.from_tensor(target)
            with self._in_flight_lock:
                in_flight = [pending.exchange for pending in self._in_flight]
            total = ctx.codec.to_tensor(run_to_end(exchange, in_flight))
        finally:
            self._abandon(ctx)
        return total.to(ctx.dtype).reshape(ctx.shape).to(ctx.device)

    def _abandon(self, ctx):
        """ctx is done, or failed: release its name, and never wait on its collectives."""
        self.state.namer.release(ctx.base_name)
        with self._in_flight_lock:
            if ctx in self._in_flight:
                self._in_flight.remove(ctx)


_UNKNOWN = object()  # the hosts of a compressor before its first exchange (or reset)


# Horovod's synchronize() polls without pause, so a waiting training thread keeps its core busy
# (measured: 100% of a core for the whole wait), a core that the kernel's network stack and the
# other processes need exactly then; a short sleep between polls costs at most that much latency.
POLL_INTERVAL_S = 2e-4


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
    """``out`` where it can take the result (see finish()), else None (a new array)."""
    work, numel = sum_dtype(ctx.dtype), ctx.exchange.job.numel
    if out is None or out.dtype != work or out.dtype != ctx.dtype or \
            out.device != ctx.codec.device or out.is_sparse or out.requires_grad or \
            not out.is_contiguous() or out.numel() != numel:
        return None
    return out.detach().reshape(-1)

