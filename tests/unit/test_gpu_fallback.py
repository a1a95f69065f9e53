"""A GPU kernel that fails to compile or launch: gpu/ raises KernelError naming it, and the
PyTorch adapter's DeviceCodec falls back to the host codec with one warning, giving the bytes
and sums the kernels would have given (the failure is forced by a kernel whose launch raises).

Without a GPU the kernels run on CPU tensors under Triton's interpreter, as in
test_gpu_kernels.py; the real horovodrun case is in tests/horovodrun/test_device_path.py.
"""

import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from horovod_tnq import core  # noqa: E402
from horovod_tnq import gpu  # noqa: E402
from horovod_tnq.gpu import kernels  # noqa: E402
from horovod_tnq.torch import TNQCompressor  # noqa: E402
from horovod_tnq.torch.codecs import KERNELS_FOR_CPU_TENSORS, DeviceCodec, HostCodec  # noqa: E402
from horovodrun.workers.common import FailingKernel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ENCODE = {"tnq-rht": "rht_encode_kernel", "tnq": "tnq_encode_kernel"}
DECODE = {"tnq-rht": "rht_decode_kernel", "tnq": "tnq_decode_kernel"}


@pytest.fixture
def device_codec(monkeypatch):
    """A compressor whose tensors take the DeviceCodec (on CPU tensors under the interpreter),
    with the kernels on; rank 0's random streams without hvd.init()."""
    monkeypatch.setenv(KERNELS_FOR_CPU_TENSORS, "1")
    monkeypatch.setattr(DeviceCodec, "failure", None)

    def make(scheme):
        compressor = TNQCompressor(scheme=scheme, bits=3, bucket_size=64, min_numel=1)
        CONFIG[:] = [compressor.config]
        monkeypatch.setattr(compressor, "key",
                            lambda slot: core.stream_key(compressor.config.seed, 0, slot))
        return compressor
    return make


CONFIG = []  # the settings the fixture's compressors were made with


def break_kernel(monkeypatch, name):
    monkeypatch.setattr(kernels, name, FailingKernel(getattr(kernels, name)))


def gradient(seed, n=1000, dtype=torch.float32):
    values = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return values.to(dtype).to(DEVICE)


def encode(codec, tensor, slot="layer.weight"):
    """A payload as a tensor (the host codec's are numpy arrays)."""
    payload = codec.encode(codec.values(tensor), slot, 7, tuple(tensor.shape), CONFIG[0], slot)
    return torch.from_numpy(payload) if isinstance(payload, np.ndarray) else payload


def decode(codec, payloads, tensor, dtype=torch.float32):
    out = torch.empty(tensor.numel(), dtype=dtype, device=codec.device)
    config = CONFIG[0]
    expect = core.PayloadHeader.describe(config.scheme, config.bits, codec.dtype_name,
                                         tensor.numel(), config.bucket_size, tuple(tensor.shape))
    count = codec.decode_sum(codec.from_tensor(payloads), expect, 0.5, codec.from_tensor(out))
    return count, out


def horovod_tnq_warnings(caught):
    return [str(w.message) for w in caught if str(w.message).startswith("horovod_tnq:")]


def test_a_failing_launch_raises_a_kernel_error_naming_the_kernel(monkeypatch):
    break_kernel(monkeypatch, "rht_encode_kernel")
    with pytest.raises(gpu.KernelError, match="rht_encode_kernel.*PTX assembly failed") as info:
        gpu.encode(gradient(0), bits=4, bucket_size=64, key=1)
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize("scheme", ["tnq-rht", "tnq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_an_encode_failure_falls_back_to_the_host_once(device_codec, monkeypatch, scheme, dtype):
    compressor, reference = device_codec(scheme), device_codec(scheme)
    tensors = [gradient(seed, dtype=dtype) for seed in range(3)]
    host = HostCodec(reference, dtype)
    expected = [encode(host, t, f"t{i}").numpy().tobytes() for i, t in enumerate(tensors)]
    codec = compressor.codec_for(tensors[0])
    assert isinstance(codec, DeviceCodec)
    break_kernel(monkeypatch, ENCODE[scheme])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the payload in progress is made on the host, and so is every later one
        payloads = [encode(codec, t, f"t{i}") for i, t in enumerate(tensors)]
    messages = horovod_tnq_warnings(caught)
    assert len(messages) == 1, messages
    assert ENCODE[scheme] in messages[0] and "PTX assembly failed" in messages[0]
    assert "host codec" in messages[0]
    assert [p.device.type for p in payloads] == [DEVICE] * 3
    assert [p.cpu().numpy().tobytes() for p in payloads] == expected
    assert isinstance(DeviceCodec.failure, gpu.KernelError)
    # later tensors: the host's codec, in the device's place (as the other ranks' payloads)
    later = compressor.codec_for(tensors[0])
    assert isinstance(later, DeviceCodec) and later.device == tensors[0].device
    # the metrics counted each payload once
    assert compressor.metrics()["tensors"]["t0"]["payload_bytes"] == len(expected[0])


@pytest.mark.parametrize("scheme", ["tnq-rht", "tnq"])
def test_a_decode_failure_decodes_the_same_bytes_on_the_host(device_codec, monkeypatch, scheme):
    compressor = device_codec(scheme)
    tensor = gradient(1)
    codec = compressor.codec_for(tensor)
    # two ranks' payloads, made by the kernels
    payloads = torch.cat([encode(codec, tensor, "a"), encode(codec, gradient(2), "a")])
    expected_count, expected = decode(HostCodec(compressor, tensor.dtype), payloads.cpu(),
                                      tensor)
    break_kernel(monkeypatch, DECODE[scheme])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        count, total = decode(codec, payloads, tensor)
        assert decode(codec, payloads, tensor)[0] == 2  # off now: no second warning
    messages = horovod_tnq_warnings(caught)
    assert len(messages) == 1 and DECODE[scheme] in messages[0], messages
    assert count == expected_count == 2
    assert total.device.type == DEVICE and torch.equal(total.cpu(), expected)


def test_the_kernels_stay_on_without_a_failure(device_codec):
    compressor = device_codec("tnq-rht")
    tensor = gradient(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encode(compressor.codec_for(tensor), tensor)
    assert not horovod_tnq_warnings(caught) and DeviceCodec.failure is None
    assert isinstance(compressor.codec_for(tensor), DeviceCodec)
