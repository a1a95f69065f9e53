"""Horovod Compressor that quantizes with the core and exchanges packed codes by allgather, or
by alltoall + allgather (the reduce-scatter exchange).

See horovod_tnq/protocol for the protocol that fits it into Horovod's allreduce interface, and
the state (steps, error-feedback residuals) that this adapter keeps in ``self.state``.
"""

import dataclasses
import threading
import time

import horovod.torch as hvd
import numpy as np
import torch
from horovod.torch.compression import Compressor

from .. import core
from ..protocol import (REDUCED, CompressorBase, DefaultInstanceMethod, Pending,
                        horovod_call_site, plan, probe_values, reduction_scale)

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.float64: "float64"}
_SUPPORTED_DEVICES = ("cpu", "cuda")


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
        min_bits, nmse_target: "dqsgd" only (core/dynamic.py).
        dp_clip, dp_epsilon, dp_delta, dp_sensitivity: "dp-binomial" only (core/privacy.py);
            ``privacy_spent()`` reports what a run has spent.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._in_flight = []  # reduce-scatter contexts between compress() and decompress()
        self._in_flight_lock = threading.Lock()

    def should_compress(self, tensor):
        return tensor.dtype in _DTYPE_NAMES and tensor.numel() >= self.config.min_numel

    @DefaultInstanceMethod
    def compress(self, tensor):
        if tensor.is_sparse:
            raise TypeError("TNQCompressor needs dense gradients; use sparse_as_dense=True")
        if tensor.device.type not in _SUPPORTED_DEVICES:
            raise TypeError(f"TNQCompressor supports CPU and CUDA tensors, got device "
                            f"{tensor.device}")
        if not self.should_compress(tensor):
            self.state.count(elements=tensor.numel(), passthrough_tensors=1,
                             passthrough_bytes=tensor.numel() * tensor.element_size())
            return tensor, None

        name, process_set = horovod_call_site()
        pending = self.start(tensor, name, process_set)
        probe = torch.tensor(probe_values(pending.process_set.rank(), pending.kind),
                             dtype=torch.float32)
        return probe, pending

    def start(self, tensor, name=None, process_set=None):
        """Encode a float tensor and start its exchange; returns the context for finish().

        compress() calls it with the name of the Horovod allreduce it serves; the fused
        DistributedOptimizer (optimizer.py) calls it directly, with its buckets' names.
        """
        process_set = process_set or hvd.global_process_set
        state = self.state
        base_name, collective_name = state.namer.acquire(name)
        step = state.next_step(base_name)
        numel = tensor.numel()
        state.note_release(base_name, numel)
        kind, bounds, parts = plan(self.config, numel, process_set.size())
        values = host_values(tensor)
        state.count(elements=numel, compressed_tensors=1, **{kind: 1})
        if kind == "allgather":
            # each part goes out as soon as it is encoded, so it travels while the next encodes
            handles, headers = [], []
            for payload, part in zip(self._encode(values, bounds, parts, base_name, step,
                                                  tensor), parts):
                state.count(payload_bytes=payload.size)
                handles.append(hvd.allgather_async(torch.from_numpy(payload),
                                                   name=collective_name + part,
                                                   process_set=process_set))
                headers.append(core.read_header(payload))
            return Pending(handles, headers, base_name, tensor.shape, tensor.dtype, process_set,
                           tensor.device, kind, bounds, collective_name, step)
        payloads = list(self._encode(values, bounds, parts, base_name, step, tensor))
        state.count(payload_bytes=sum(p.size for p in payloads))
        splits = torch.tensor([p.size for p in payloads], dtype=torch.int32)
        handle = hvd.alltoall_async(torch.from_numpy(np.concatenate(payloads)), splits=splits,
                                    name=collective_name, process_set=process_set)
        pending = Pending(handle, core.read_header(payloads[process_set.rank()]), base_name,
                          tensor.shape, tensor.dtype, process_set, tensor.device, kind, bounds,
                          collective_name, step)
        with self._in_flight_lock:
            self._in_flight.append(pending)
        return pending

    def _encode(self, values, bounds, parts, base_name, step, tensor):
        """One payload per (start, stop) chunk of the flat host ``values``, each made when it is
        asked for (a generator), so its exchange can start before the next (error feedback, if
        on, in CompressorState.encode)."""
        for (start, stop), part in zip(bounds, parts):
            slot = base_name + part
            yield self.state.encode(values[start:stop], slot, self._key(slot), step,
                                    _DTYPE_NAMES[tensor.dtype], tensor.shape)

    def _key(self, slot):
        return core.stream_key(self.config.seed, hvd.rank(), slot)

    def state_dict(self):
        """CompressorState.state_dict() with the residuals as torch tensors, so a checkpoint
        with the model loads with ``torch.load(weights_only=True)``."""
        state = self.state.state_dict()
        state["residuals"] = {slot: torch.from_numpy(r) for slot, r in state["residuals"].items()}
        return state

    def load_state_dict(self, state):
        residuals = {slot: r.numpy() if torch.is_tensor(r) else r
                     for slot, r in state["residuals"].items()}
        self.state.load_state_dict(dict(state, residuals=residuals))

    @DefaultInstanceMethod
    def decompress(self, tensor, ctx):
        if ctx is None:
            return tensor
        try:
            scale = reduction_scale(tensor.tolist(), ctx.process_set.size(), ctx.kind)
        except Exception:
            self._abandon(ctx)
            raise
        return self.finish(ctx, scale)

    def finish(self, ctx, scale, out=None):
        """Wait for the exchange of ``ctx`` (from start()), decode and sum every rank's
        contribution, multiply by ``scale``: the reduced tensor, in the original dtype, shape
        and device.

        ``out``: a tensor to decode into where it can be (a contiguous float32 or float64 CPU
        tensor of the result's dtype and size; otherwise it is ignored); then the result is a
        view of it. The fused optimizer passes the flat gradient it sent: start() is done with
        it, and a fresh result of that size would cost page faults on every step. If decoding
        fails (a PayloadError), ``out`` may hold part of the result.
        """
        try:
            # float32 results are rounded once, in the decoder; others go through float64
            out_dtype = np.float32 if ctx.dtype == torch.float32 else np.float64
            total = _decode_target(out, ctx)
            if ctx.kind == "allgather":
                total = _decode_parts(ctx, scale, out_dtype, total)
            else:
                self._start_second_rounds()
                total = self._decode_reduced_chunks(ctx, scale, out_dtype, total)
        finally:
            self._abandon(ctx)
        result = torch.from_numpy(total).to(ctx.dtype).reshape(ctx.shape)
        return result.to(ctx.device)

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
        go out together, where Horovod can fuse them.
        """
        with self._in_flight_lock:
            waiting = [ctx for ctx in self._in_flight if ctx.second_round is None]
        for ctx in waiting:
            received = wait(ctx.exchange)[0].numpy()
            work = np.float64 if ctx.dtype == torch.float64 else np.float32
            chunk_sum = _decode_sum(received, ctx.header, 1.0, work, ctx.process_set.size())
            slot = ctx.base_name + REDUCED
            reduced = self.state.encode(chunk_sum, slot, self._key(slot), ctx.step,
                                        _DTYPE_NAMES[ctx.dtype], ctx.shape)
            self.state.count(payload_bytes=reduced.size)
            ctx.second_round = hvd.allgather_async(torch.from_numpy(reduced),
                                                   name=ctx.collective_name + REDUCED,
                                                   process_set=ctx.process_set)

    def _decode_reduced_chunks(self, ctx, scale, out_dtype, total):
        """Wait for the reduced chunks of ``ctx`` and decode them into place in ``total`` (None:
        a new array), times ``scale``."""
        gathered = wait(ctx.second_round).numpy()
        if total is None:
            total = np.empty(ctx.bounds[-1][1], dtype=out_dtype)
        offset = 0
        for owner, (start, stop) in enumerate(ctx.bounds):
            if offset >= gathered.size:
                raise core.PayloadError(f"received {owner} reduced chunks from "
                                        f"{len(ctx.bounds)} ranks")
            end = core.codec.split(gathered, offset).end
            expect = dataclasses.replace(ctx.header, numel=stop - start, num_exceptions=0)
            _decode_sum(gathered[offset:end], expect, scale, out_dtype, 1, out=total[start:stop])
            offset = end
        if offset != gathered.size:
            raise core.PayloadError(f"received {gathered.size} bytes of reduced chunks, "
                                    f"expected {offset}")
        return total


# Horovod's synchronize() polls without pause, so a waiting training thread keeps its core busy
# (measured: 100% of a core for the whole wait), a core that the kernel's network stack and the
# other processes need exactly then; a short sleep between polls costs at most that much latency.
POLL_INTERVAL_S = 2e-4


def wait(handle):
    """hvd.synchronize(handle), sleeping between polls instead of spinning."""
    while not hvd.poll(handle):
        time.sleep(POLL_INTERVAL_S)
    return hvd.synchronize(handle)


def _decode_target(out, ctx):
    """``out`` as the numpy array to decode into, or None where it cannot take the result
    (numpy has no bfloat16, so only float32 and float64 tensors can)."""
    if out is None or out.dtype != ctx.dtype or out.dtype not in (torch.float32, torch.float64) \
            or out.device.type != "cpu" or out.is_sparse or out.requires_grad or \
            not out.is_contiguous() or out.numel() != ctx.bounds[-1][1]:
        return None
    return out.detach().numpy().reshape(-1)  # finish() decodes float32 and float64 as such


def _decode_parts(ctx, scale, out_dtype, total):
    """Each part of an allgathered tensor decoded as soon as it arrives (while later parts are
    still on the wire), into its place in ``total`` (None: a new array)."""
    size = ctx.process_set.size()
    if total is None:
        total = np.empty(ctx.bounds[-1][1], dtype=out_dtype)
    for (start, stop), handle, header in zip(ctx.bounds, ctx.exchange, ctx.header):
        _decode_sum(wait(handle).numpy(), header, scale, out_dtype, size,
                    out=total[start:stop])
    return total


def _decode_sum(buffer, header, scale, out_dtype, expected_count, out=None):
    total, count = core.decode_sum(buffer, header, scale, out_dtype, out=out)
    if count != expected_count:
        raise core.PayloadError(f"received {count} payloads, expected {expected_count}")
    return total
