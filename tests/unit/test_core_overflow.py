"""Sums beyond the tensor dtype's range come out as Horovod's sum in that dtype would: infinite
where the ranks' values really overflow it, finite where they do not and only quantization error
crosses the limit (core.codec.overflow_rule; each payload's amax bounds the true sums)."""

import numpy as np
import pytest

from horovod_tnq import core
from horovod_tnq.core import codec

LARGEST = {name: limits[0] for name, limits in codec.OVERFLOW_LIMITS.items()}


def payloads_of(values, dtype_name, scheme="tnq-rht", bits=4, reference=False):
    return [core.encode(v, scheme=scheme, bits=bits, bucket_size=256, key=rank,
                        dtype_name=dtype_name, reference=reference)
            for rank, v in enumerate(values)]


def reduce(values, dtype_name, factor=1.0, scheme="tnq-rht", reference=False):
    payloads = payloads_of(values, dtype_name, scheme, reference=reference)
    expect = core.read_header(payloads[0])
    out = np.float32 if dtype_name == "float32" else np.float64
    total, _ = core.decode_sum(np.concatenate(payloads), expect, factor, out,
                               reference=reference)
    return total


def cast(total, dtype_name):
    """What the adapters hand back: the result rounded to the tensor's dtype (bfloat16 as the
    float32 of its rounding, which overflows where bfloat16 does)."""
    if dtype_name == "float16":
        return total.astype(np.float16).astype(np.float64)
    if dtype_name == "bfloat16":
        limit = codec.OVERFLOW_LIMITS["bfloat16"][1]
        return np.where(np.abs(total) >= limit, np.copysign(np.inf, total), total)
    return total.astype(np.float32).astype(np.float64)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("scheme", ["tnq-rht", "tnq", "qsgd"])
@pytest.mark.parametrize("reference", [False, True])
def test_a_sum_that_fits_stays_finite_near_the_limit(dtype_name, scheme, reference):
    # two ranks, each value just under half the largest: Horovod's sum is finite everywhere
    rng = np.random.default_rng(0)
    half = LARGEST[dtype_name] / 2
    values = [(rng.uniform(0.9, 0.999, 4096) * half * rng.choice([-1, 1], 4096))
              .astype(np.float32) for _ in range(2)]
    total = cast(reduce(values, dtype_name, 1.0, scheme, reference), dtype_name)
    assert np.all(np.isfinite(total))
    assert np.median(np.abs(total)) > 0.8 * LARGEST[dtype_name]


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("factor", [1.0, 0.5])  # op=Sum, op=Average of 2 ranks
@pytest.mark.parametrize("reference", [False, True])
def test_a_sum_that_overflows_is_infinite_for_sum_and_average(dtype_name, factor, reference):
    # each rank 0.8 of the largest: Horovod's sum overflows, and its average (the sum divided
    # afterwards) is infinite too; the half below the limit stays finite
    values = np.full(4096, 0.8 * LARGEST[dtype_name], np.float32)
    values[2048:] *= 0.5
    values[::2] *= -1
    total = cast(reduce([values, values], dtype_name, factor, reference=reference), dtype_name)
    assert np.all(np.isinf(total[:2048]))
    assert np.array_equal(np.sign(total[:2048]), np.sign(values[:2048]))
    assert np.all(np.isfinite(total[2048:]))


def test_infinities_that_were_sent_stay_when_nothing_else_overflows():
    values = np.full(4096, 0.49 * LARGEST["float32"], np.float32)
    values[7] = -np.inf
    total = reduce([values, values], "float32")
    assert total[7] == -np.inf and np.all(np.isfinite(np.delete(total, 7)))


def test_amax_is_the_largest_finite_magnitude_and_bounds_the_rule():
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    x[3], x[4] = -7.5, np.nan
    for reference in (False, True):
        header = core.read_header(payloads_of([x], "float32", reference=reference)[0])
        assert header.amax == 7.5
    assert codec.overflow_rule("float32", 1.0, 1.0, bound=1e30) is None  # far from the limit
    threshold, value = codec.overflow_rule("float16", 0.5, 60000.0)
    assert (threshold, value) == (65520.0 * 0.5, 65504.0 * 0.5)  # cannot overflow: held
    assert codec.overflow_rule("float16", 0.5, 70000.0)[1] == np.inf  # may: infinite


def test_gpu_codec_settles_overflow_as_the_core():
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from horovod_tnq import gpu
    if not gpu.available():
        pytest.skip("the GPU codec is not available here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    values = np.full(512, 0.8 * LARGEST["float32"], np.float32)
    values[256:] *= 0.5
    payloads = [gpu.encode(torch.from_numpy(values).to(device), scheme="tnq-rht", bits=4,
                           bucket_size=256, key=rank) for rank in range(2)]
    host = [core.encode(values, scheme="tnq-rht", bits=4, bucket_size=256, key=rank)
            for rank in range(2)]
    assert all(np.array_equal(p.cpu().numpy(), h) for p, h in zip(payloads, host))
    expect = core.read_header(host[0])
    for factor in (1.0, 0.5):
        total, _ = gpu.decode_sum(torch.cat(payloads), expect, factor)
        expected, _ = core.decode_sum(np.concatenate(host), expect, factor, np.float32)
        assert np.array_equal(total.cpu().numpy(), expected)
        assert np.all(np.isinf(expected[:256])) and np.all(np.isfinite(expected[256:]))
