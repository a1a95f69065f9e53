"""The Triton kernels (horovod_tnq.gpu) against the core: identical payload bytes and
identical decode_sum results for "tnq-rht" and "tnq".

On a machine with CUDA the kernels run compiled on CUDA tensors; elsewhere on CPU tensors under
Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported), which is slow: the
tensors here are small, and each configuration is one launch or a few.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from horovod_tnq import gpu  # noqa: E402
from horovod_tnq.core import codec, native  # noqa: E402
from horovod_tnq.gpu import codec as gpu_codec  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KEY = 0x9E3779B97F4A7C15  # both key words at or above 2**31
NAMES = {torch.bfloat16: "bfloat16"}


def gradient(n, seed, dtype=torch.float32, scale=1.0):
    """Gradient-like data: Gaussian with heavy-tailed outliers and exact zeros."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(n) * scale
    values[rng.random(n) < 0.05] = 0.0
    values[rng.random(n) < 0.02] *= 30.0
    return torch.from_numpy(values).to(dtype).to(DEVICE)


def host(tensor):
    """The numpy array the core sees for a tensor (bfloat16 is handed over as float32)."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


@pytest.fixture(autouse=True)
def host_calls(monkeypatch):
    """Counts the rare paths that run the core on the host (gpu/codec.py): the tests of the
    device path check that they did not take them."""
    calls = {"encode": 0, "decode_sum": 0}

    def counted(name, original):
        def call(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        return call

    monkeypatch.setattr(gpu_codec, "_host_encode", counted("encode", gpu_codec._host_encode))
    monkeypatch.setattr(gpu_codec, "_host_decode_sum",
                        counted("decode_sum", gpu_codec._host_decode_sum))
    return calls


def check_encode(x, **settings):
    """gpu.encode(x) is the reference's payload (and the native kernel's, where built)."""
    payload = gpu.encode(x, **settings)
    assert payload.dtype == torch.uint8 and payload.device == x.device
    name = NAMES.get(x.dtype)
    expected = codec.encode(host(x), dtype_name=name, reference=True, **settings)
    assert payload.cpu().numpy().tobytes() == expected.tobytes()
    if native.LIBRARY is not None:
        assert codec.encode(host(x), dtype_name=name, **settings).tobytes() == expected.tobytes()
    return payload, expected


def check_decode(payloads, expected, factor):
    """gpu.decode_sum of the payloads is the core's result, bit for bit, in float32 and float64
    (into a fresh tensor and into ``out``)."""
    buf = torch.cat(payloads)
    host_buf = np.concatenate(expected)
    header = codec.read_header(expected[0])
    for torch_dtype, np_dtype in ((torch.float32, np.float32), (torch.float64, np.float64)):
        want, count = codec.decode_sum(host_buf, header, factor, out_dtype=np_dtype,
                                       reference=True)
        assert count == len(payloads)
        if native.LIBRARY is not None:
            assert codec.decode_sum(host_buf, header, factor, out_dtype=np_dtype)[0].tobytes() \
                == want.tobytes()
        got, count = gpu.decode_sum(buf, header, factor, out_dtype=torch_dtype)
        assert count == len(payloads) and got.dtype == torch_dtype and got.device == buf.device
        assert got.cpu().numpy().tobytes() == want.tobytes()
        if np_dtype == np.float32:
            want_float32 = want
    out = torch.full((header.numel,), 7.0, dtype=torch.float32, device=buf.device)
    got, _ = gpu.decode_sum(buf, header, factor, out=out)
    assert got is out and out.cpu().numpy().tobytes() == want_float32.tobytes()


def supported_bits(scheme):
    return [bits for bits in range(1, 9) if codec.supports(scheme, bits)]


# ---- tnq-rht ----

RHT_CASES = [  # bits, bucket size, elements, dtype
    (1, 8, 37, torch.float32),
    (2, 16, 203, torch.float32),
    (3, 32, 250, torch.float16),
    (4, 64, 1001, torch.float32),
    (5, 128, 300, torch.bfloat16),
    (6, 256, 777, torch.float32),
    (7, 512, 1100, torch.float64),
    (8, 512, 1030, torch.float32),
    (4, 2048, 2100, torch.float32),
    (2, 8, 64, torch.float64),
]


@pytest.mark.parametrize("bits,bucket,n,dtype", RHT_CASES)
def test_rht_encode_matches_core(bits, bucket, n, dtype, host_calls):
    check_encode(gradient(n, bits * 1000 + bucket, dtype), scheme="tnq-rht", bits=bits,
                 bucket_size=bucket, key=KEY + bits, step=bucket + 3)
    assert host_calls["encode"] == 0


def test_rht_persistent_programs_loop_over_tiles(monkeypatch, host_calls):
    """Large tensors give each encode program several tiles in turn (its scratch slot reused):
    small tiles and three programs do the same here."""
    monkeypatch.setattr(gpu_codec, "RHT_TILE", 64)
    monkeypatch.setattr(gpu_codec, "_max_programs", lambda device, tiles: min(tiles, 3))
    for bucket, n, dtype in ((16, 500, torch.float32), (64, 700, torch.float64)):
        check_encode(gradient(n, bucket, dtype), scheme="tnq-rht", bits=3, bucket_size=bucket,
                     key=KEY, step=1)
    assert host_calls["encode"] == 0


def test_rht_covers_every_bit_width():
    assert {case[0] for case in RHT_CASES} == set(supported_bits("tnq-rht"))


# payloads, bits, bucket size, elements, dtype; ranks at very different scales (the sum's order
# shows), and factors 1/N and 1/3
DECODE_CASES = [(1, 4, 64, 200, torch.float32), (3, 2, 8, 45, torch.float32),
                (8, 3, 32, 100, torch.bfloat16), (2, 8, 128, 300, torch.float64),
                (5, 1, 16, 77, torch.float16)]


@pytest.mark.parametrize("count,bits,bucket,n,dtype", DECODE_CASES)
@pytest.mark.parametrize("scheme, factor", [("tnq-rht", None), ("tnq", 1.0 / 3.0)])
def test_decode_sum_matches_core(scheme, factor, count, bits, bucket, n, dtype, host_calls):
    if scheme == "tnq":
        bucket += 2  # buckets that are not a multiple of 8 too
    payloads, expected = [], []
    for rank in range(count):
        x = gradient(n, 50 + rank, dtype, scale=10.0 ** (rank % 5 - 2))
        payload, ref = check_encode(x, scheme=scheme, bits=bits, bucket_size=bucket,
                                    key=KEY + rank * 7919, step=11)
        payloads.append(payload)
        expected.append(ref)
    check_decode(payloads, expected, factor or 1.0 / count)
    assert host_calls == {"encode": 0, "decode_sum": 0}


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
def test_rht_rare_paths(host_calls):
    """Non-finite elements, norms beyond codec.SAFE_NORMS (huge and tiny tensors, float32 and
    float64), all-zero and empty tensors: the core's bytes and sums."""
    settings = dict(scheme="tnq-rht", bits=4, bucket_size=16, step=2)
    special = gradient(40, 1)
    special[[3, 17, 18, 39]] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    tensors = [special,
               gradient(40, 2, scale=1e36), gradient(40, 3, scale=1e-38),
               gradient(40, 4, torch.float64, scale=1e300), gradient(40, 5, torch.float64,
                                                                    scale=1e-300),
               torch.zeros(40, device=DEVICE), -torch.zeros(23, device=DEVICE, dtype=torch.float64)]
    for i, x in enumerate(tensors):
        payloads, expected = zip(*[check_encode(x, key=KEY + rank, **settings)
                                   for rank in range(2)])
        check_decode(list(payloads), list(expected), 0.5)
        # the 40 zeros are a zero run (codec.MIN_ZERO_RUN): the core's; 23 -0s stay on the device
        rare = i < 6
        assert host_calls == {"encode": 2 * rare, "decode_sum": 3 * rare}, i
        host_calls.update(encode=0, decode_sum=0)
    empty = torch.zeros(0, device=DEVICE)
    payload, ref = check_encode(empty, key=KEY, **settings)
    total, count = gpu.decode_sum(torch.cat([payload, payload]), codec.read_header(ref))
    assert count == 2 and total.numel() == 0


# ---- tnq ----

TNQ_CASES = [  # bits, bucket size, elements, dtype: buckets not a multiple of 8 take two kernels
    (1, 8, 37, torch.float32),
    (2, 100, 999, torch.float32),
    (3, 7, 50, torch.float16),
    (4, 64, 1001, torch.float32),
    (5, 16, 203, torch.bfloat16),
    (6, 512, 1030, torch.float64),
    (7, 33, 130, torch.float64),
    (8, 24, 301, torch.float32),
    (4, 1 << 20, 77, torch.float32),  # one bucket, larger than the tensor
    (2, 1000, 2001, torch.float32),
]


@pytest.mark.parametrize("bits,bucket,n,dtype", TNQ_CASES)
def test_tnq_encode_matches_core(bits, bucket, n, dtype, host_calls):
    check_encode(gradient(n, bits * 1000 + bucket, dtype), scheme="tnq", bits=bits,
                 bucket_size=bucket, key=KEY - bits, step=bucket)
    assert host_calls["encode"] == 0


def test_tnq_covers_every_bit_width():
    assert {case[0] for case in TNQ_CASES} == set(supported_bits("tnq"))


def test_tnq_rare_paths(host_calls):
    settings = dict(scheme="tnq", bits=3, bucket_size=12, step=9)
    special = gradient(50, 6)
    special[[0, 11, 12, 49]] = torch.tensor([float("inf"), float("nan"), -float("inf"), -0.0])
    for i, x in enumerate((special, torch.zeros(50, device=DEVICE), gradient(50, 7, scale=1e35))):
        payloads, expected = zip(*[check_encode(x, key=rank, **settings) for rank in range(3)])
        check_decode(list(payloads), list(expected), 1.0)
        rare = i < 2  # the non-finite elements, and 50 zeros (a zero run)
        assert host_calls == {"encode": 3 * rare, "decode_sum": 3 * rare}, i
        host_calls.update(encode=0, decode_sum=0)
    payload, ref = check_encode(torch.zeros(0, device=DEVICE, dtype=torch.float64), key=1,
                                **settings)
    total, count = gpu.decode_sum(payload, codec.read_header(ref), out_dtype=torch.float64)
    assert count == 1 and total.numel() == 0


# ---- checks, mixed payloads and errors ----

def test_decode_sum_checks_payloads_like_the_core():
    x = gradient(64, 8)
    settings = dict(scheme="tnq-rht", bits=4, bucket_size=32, step=1)
    payload, ref = check_encode(x, key=KEY, **settings)
    header = codec.read_header(ref)
    other, _ = check_encode(x, key=KEY, **dict(settings, bits=3))
    with pytest.raises(codec.PayloadError, match="bits"):
        gpu.decode_sum(torch.cat([payload, other]), header)
    with pytest.raises(codec.PayloadError):
        gpu.decode_sum(payload[:-1], header)
    corrupted = payload.clone()
    corrupted[0] = ord("X")
    with pytest.raises(codec.PayloadError, match="magic"):
        gpu.decode_sum(corrupted, header)
    with pytest.raises(codec.PayloadError, match="no payload"):
        gpu.decode_sum(payload[:0], header)
    with pytest.raises(ValueError, match="out must be"):
        gpu.decode_sum(payload, header, out=torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match="schemes"):
        gpu.encode(x, scheme="qsgd", bits=4, bucket_size=32, key=1)
    with pytest.raises(ValueError, match="power of two"):
        gpu.encode(x, scheme="tnq-rht", bits=4, bucket_size=24, key=1)
    with pytest.raises(TypeError):
        gpu.encode(torch.arange(8, device=DEVICE), scheme="tnq", bits=4, bucket_size=8, key=1)


def test_mixed_payloads_with_exceptions_sum_like_the_core(host_calls):
    """One rank's payload carries non-finite exceptions (a larger payload); the others do not."""
    settings = dict(scheme="tnq-rht", bits=2, bucket_size=8, step=4)
    payloads, expected = [], []
    for rank in range(3):
        x = gradient(30, 20 + rank)
        if rank == 1:
            x[5] = float("inf")
        payload, ref = check_encode(x, key=rank, **settings)
        payloads.append(payload)
        expected.append(ref)
    check_decode(payloads, expected, 1.0)
    assert host_calls == {"encode": 1, "decode_sum": 3}


def test_shape_and_dtype_name_reach_the_header():
    x = gradient(60, 9).reshape(6, 10)
    payload, ref = check_encode(x, scheme="tnq", bits=4, bucket_size=16, key=3, step=0,
                                shape=(60,))
    assert codec.read_header(ref).shape_tag == codec.shape_tag((60,))
    payload, ref = check_encode(x, scheme="tnq-rht", bits=4, bucket_size=16, key=3, step=0)
    assert codec.read_header(ref).shape_tag == codec.shape_tag((6, 10))
    named = gpu.encode(x, scheme="tnq-rht", bits=4, bucket_size=16, key=3, dtype_name="float64")
    assert codec.read_header(named.cpu().numpy()).dtype_name == "float64"
    assert named.cpu().numpy().tobytes() == codec.encode(
        host(x), scheme="tnq-rht", bits=4, bucket_size=16, key=3, dtype_name="float64",
        reference=True).tobytes()


def test_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import horovod_tnq.gpu as gpu\n"
            "assert not gpu.available()\n"
            "try:\n"
            "    gpu.encode(None, bits=4, bucket_size=8, key=1)\n"
            "except RuntimeError as exc:\n"
            "    assert 'triton' in str(exc)\n"
            "else:\n"
            "    raise SystemExit('no RuntimeError')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))] +
        sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU every test above runs compiled")
def test_kernels_compile_for_cuda_without_fma():
    """The interpreter does not enforce the compiler's rules; compile every kernel for sm_90
    ahead of time (no GPU needed) and check its PTX: IEEE division and square root, no fused
    multiply-add (gpu/aot.py)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "horovod_tnq.gpu.aot", "90"], env=env,
                            capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                                os.path.abspath(__file__)))))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": ok") == 11, result.stdout
