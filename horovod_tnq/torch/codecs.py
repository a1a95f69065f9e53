"""Where a PyTorch gradient's payloads are made and decoded: the core on the host
(``HostCodec``, numpy views of CPU tensors) or the GPU kernels on the tensor's device
(``DeviceCodec``), the two codecs of the exchange driver (protocol/exchange.py). No Horovod here:
the Horovod adapter (compressor.py) and the DDP hook (ddp.py) both use them.
"""

import os
import threading
import time
import warnings

import numpy as np
import torch

from .. import core
from ..protocol.exchange import NumpyCodec

DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
               torch.float64: "float64"}
# Set to 1, the GPU kernels' path runs on CPU tensors under Triton's interpreter (tests: the
# device path with real workers on machines without a GPU).
KERNELS_FOR_CPU_TENSORS = "HOROVOD_TNQ_KERNELS_FOR_CPU_TENSORS"


def host_values(tensor):
    """The flat numpy array the core reads: float64 stays, every other float becomes float32
    (numpy has no bfloat16; float32 holds float16 and bfloat16 exactly)."""
    work = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return tensor.detach().to("cpu", work).reshape(-1).numpy()


def encode_tensor(tensor, config, key, step):
    """The payload (numpy uint8) of one whole torch tensor, without error feedback."""
    return core.encode(host_values(tensor), scheme=config.scheme, bits=config.bits,
                       bucket_size=config.bucket_size, key=key, step=step,
                       dtype_name=DTYPE_NAMES[tensor.dtype], shape=tensor.shape,
                       options=config.scheme_options())


def sum_dtype(dtype):
    """What payloads of a ``dtype`` tensor are summed into: float32 results are rounded once,
    in the decoder; the others go through float64, on either codec, so both give equal bits."""
    return torch.float32 if dtype == torch.float32 else torch.float64


_TORCH = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


class HostCodec(NumpyCodec):
    """The core on the host (numpy views of CPU tensors) for a tensor of ``dtype``; error
    feedback in the compressor's state."""

    device = torch.device("cpu")

    def __init__(self, compressor, dtype):
        super().__init__(compressor.state, compressor.key, DTYPE_NAMES[dtype])

    def values(self, tensor):
        """``tensor`` flat, as this codec encodes it (host_values)."""
        return host_values(tensor)

    def to_tensor(self, array):
        """An array of this codec (a payload, a decoded sum) as a tensor, without a copy."""
        return torch.from_numpy(array)

    def from_tensor(self, tensor):
        """A tensor (one a collective received, or a result to decode into) as this codec's
        array, without a copy where it is already where the codec works."""
        return tensor.numpy()


class DeviceCodec(HostCodec):
    """The GPU kernels (gpu/) on the tensor's device: the float data never leaves it. Only
    the packed payloads reach the collectives (Horovod's, on the device where it has NCCL, else
    through host memory; or torch.distributed's); headers are built on the host (a few bytes).

    If a kernel fails to compile or launch (gpu.KernelError), the kernels are off for the
    rest of the process, with one warning naming the error: the payload being encoded is made
    by the core on the host instead, before anything reaches Horovod, and received payloads are
    decoded there from the same bytes; so are later tensors'. Payloads still reach Horovod where
    the other ranks' do (on the device with NCCL), so every rank hands each collective tensors
    of one kind. The core makes the same bytes and sums, so results do not change and ranks
    still agree."""

    failure = None  # the first KernelError in this process, once the kernels are off
    _failure_lock = threading.Lock()

    def __init__(self, compressor, dtype, device):
        super().__init__(compressor, dtype)
        self.device = device

    @staticmethod
    def kernels_failed(error):
        """Turn the kernels off for this process after ``error`` (a gpu.KernelError),
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

    def encode(self, values, slot, step, shape, config, record, first_round=True):
        if DeviceCodec.failure is None:
            started = time.perf_counter()
            try:
                payload = gpu().encode(values, scheme=config.scheme, bits=config.bits,
                                        bucket_size=config.bucket_size, key=self.key(slot),
                                        step=step, dtype_name=self.dtype_name, shape=shape)
            except gpu().KernelError as error:
                self.kernels_failed(error)
            else:
                # (no error estimate: it would read the payload's bucket parameters back to
                # the host)
                self.state.record_payload(record, step, payload.numel(),
                                          time.perf_counter() - started,
                                          values.numel() if first_round else 0)
                return payload
        payload = HostCodec.encode(self, HostCodec.values(self, values), slot, step, shape,
                                   config, record, first_round)
        return torch.from_numpy(payload).to(self.device)  # where the kernels' payloads are

    def decode_sum(self, received, expect, factor, out):
        if DeviceCodec.failure is None:
            try:
                return gpu().decode_sum(received, expect, factor, out_dtype=out.dtype,
                                         out=out)[1]
            except gpu().KernelError as error:
                self.kernels_failed(error)
        total = np.empty(out.numel(), _NUMPY_DTYPES[out.dtype])
        count = HostCodec.decode_sum(self, received.cpu().numpy(), expect, factor, total)
        out.view(-1).copy_(torch.from_numpy(total))
        return count

    def empty(self, numel, dtype):
        return torch.empty(numel, dtype=_TORCH[np.dtype(dtype)], device=self.device)

    def full_precision(self, values):
        return values.reshape(-1).to(_TORCH[np.dtype(self.chunk_dtype)])

    def scale_into(self, out, values, scale):
        return torch.mul(values.reshape(-1), scale, out=out)

    @staticmethod
    def concatenate(payloads):
        return torch.cat(payloads)

    @staticmethod
    def sizes(payloads):
        return torch.tensor([p.numel() for p in payloads], dtype=torch.int32)

    @staticmethod
    def split_sizes(payload, sizes):
        return torch.split(payload, sizes.tolist())

    @staticmethod
    def nbytes(payload):
        return payload.numel()

    @staticmethod
    def payload_ends(gathered, count):
        return NumpyCodec.payload_ends(gathered.cpu().numpy(), count)

    def to_tensor(self, array):
        return array

    def from_tensor(self, tensor):
        return tensor.to(self.device)


def codec_for(owner, tensor, config):
    """Where ``tensor``'s payloads are made and decoded with ``config``, for ``owner`` (its
    ``state`` and ``key(slot)``: a compressor or the DDP hook's state): on its device by the
    GPU kernels (gpu/) for CUDA tensors of the schemes they have, without error feedback (whose
    residuals the state keeps on the host; after a kernel failed in this process, DeviceCodec
    runs the core on the host but keeps the device's place in the collectives); by the core on
    the host otherwise."""
    on_cpu = os.environ.get(KERNELS_FOR_CPU_TENSORS, "0") == "1"
    if (tensor.is_cuda or on_cpu) and not config.error_feedback:
        kernels = gpu()
        if kernels.available() and config.scheme in kernels.SCHEMES:
            return DeviceCodec(owner, tensor.dtype, tensor.device)
    return HostCodec(owner, tensor.dtype)


def gpu():
    """horovod_tnq.gpu, imported when the first tensor that may use it comes: it imports
    Triton."""
    from .. import gpu as kernels
    return kernels


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
