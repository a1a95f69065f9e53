"""Exact zeros: runs of at least MIN_ZERO_RUN exact zeros (embedding rows no rank touched, the
gradients of frozen parameters) travel as (start, length) and decode to exactly 0, for every
scheme with level tables, on the numpy reference and the compiled kernel alike."""

import numpy as np
import pytest

from horovod_tnq import core
from horovod_tnq.core import codec, native

RUN = codec.MIN_ZERO_RUN
CASES = [(name, bits) for name, scheme in core.SCHEMES.items() if scheme.body is None
         for bits in (1, 2, 4, 8) if core.supports(name, bits)]


def embedding_gradient(rows=300, dim=48, touched=40, dtype=np.float32, seed=0):
    """An embedding's gradient: most rows untouched (exactly zero), the rest dense."""
    rng = np.random.default_rng(seed)
    grad = np.zeros((rows, dim), dtype=dtype)
    grad[rng.choice(rows, touched, replace=False)] = rng.standard_normal((touched, dim))
    return grad


def runs_of(flat):
    """The maximal runs of zeros of length >= RUN, by a plain loop (the definition)."""
    runs, start = [], None
    for i, value in enumerate(list(flat) + [1.0]):
        if value == 0 and start is None:
            start = i
        elif value != 0 and start is not None:
            if i - start >= RUN:
                runs.append((start, i - start))
            start = None
    return runs


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(6))
def test_scan_finds_the_maximal_long_runs_and_amax_on_both_paths(dtype, seed):
    rng = np.random.default_rng(seed)
    flat = rng.standard_normal(5000).astype(dtype)
    for _ in range(25):  # runs of every length around RUN and the scan's block of 64
        start, length = rng.integers(0, 5000), rng.integers(1, 3 * RUN + 70)
        flat[start: start + length] = rng.choice([0.0, -0.0])
    flat[:RUN] = 0.0  # at the start, and up to the end
    flat[-RUN - 1:] = -0.0
    flat[2000] = np.nan  # NaN is not a zero
    flat[3000] = np.inf  # nor is it finite: amax skips it
    expected = runs_of(flat)
    amax = float(np.abs(flat[np.isfinite(flat)]).max())
    for runs, largest in (codec.scan(flat), native.scan(flat, RUN)):
        assert [tuple(r) for r in runs] == expected
        assert largest == amax
    mask = codec.coded_mask(flat.size, codec.scan(flat)[0])
    assert mask.sum() == flat.size - sum(length for _, length in expected)
    assert np.all(flat[~mask] == 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(4))
def test_scan_among_scattered_zeros(dtype, seed):
    # ReLU gradients: zeros everywhere (every block of the scan has some), a few long runs among
    # them, runs just shorter and just longer than RUN, runs across the scan's blocks of 64
    rng = np.random.default_rng(100 + seed)
    flat = rng.standard_normal(6000).astype(dtype)
    flat[rng.random(flat.size) < 0.5] = 0.0
    for length in (RUN - 1, RUN, RUN + 1, 2 * RUN - 1, 64, 130):
        start = int(rng.integers(0, flat.size - length))
        flat[start - 1 if start else 0] = 1.0
        flat[start: start + length] = -0.0
        if start + length < flat.size:
            flat[start + length] = 1.0
    expected = runs_of(flat)
    assert any(length >= RUN for _, length in expected)
    for runs, _ in (codec.scan(flat), native.scan(flat, RUN)):
        assert [tuple(r) for r in runs] == expected


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(5))
def test_native_gather_and_spread_follow_the_coded_mask(dtype, seed):
    # the compiled copy of the coded elements (encoder) and the add around the runs (decoder)
    # against the boolean mask, with runs at the start, at the end, back to back with one
    # element between, and none at all
    rng = np.random.default_rng(200 + seed)
    flat = rng.standard_normal(3000).astype(dtype)
    flat[:RUN + seed] = 0.0
    flat[-RUN - 2 * seed:] = -0.0
    flat[1000:1000 + RUN] = 0.0
    flat[1000 + RUN + 1:1000 + 3 * RUN] = 0.0
    for _ in range(seed * 3):
        start = int(rng.integers(0, flat.size - 4 * RUN))
        flat[start:start + int(rng.integers(1, 4 * RUN))] = 0.0
    for data in (flat, rng.standard_normal(700).astype(dtype), np.zeros(500, dtype)):
        runs = native.scan(data, RUN)[0]
        mask = codec.coded_mask(data.size, runs)
        coded = native.gather_coded(data, runs)
        assert coded.dtype == data.dtype and np.array_equal(coded, data[mask])
        acc = np.full(data.size, np.nan)
        values = rng.standard_normal(coded.size)
        native.spread_sum(values, runs, acc, first=True)
        expected = np.zeros(data.size)
        expected[mask] = values
        assert np.array_equal(acc, expected)
        native.spread_sum(values * 3, runs, acc, first=False)
        expected[mask] += values * 3
        assert np.array_equal(acc, expected)
    with pytest.raises(ValueError, match="acc must be"):
        native.spread_sum(np.zeros(3), None, np.zeros(4), first=True)
    # the compiled loops trust their runs: overlapping, unordered or overlong ones are refused
    for runs in ([[20, 15], [10, 15]], [[5, 40]], [[-1, 40]], [[0, 0]]):
        with pytest.raises(ValueError, match="ascending, apart and within"):
            native.spread_sum(np.zeros(0), runs, np.zeros(40), first=True)
        with pytest.raises(ValueError, match="ascending, apart and within"):
            native.gather_coded(np.zeros(40, np.float32), runs)


@pytest.mark.parametrize("name,bits", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_rows_decode_to_exactly_zero(name, bits, dtype):
    grad = embedding_gradient(dtype=dtype)
    flat = grad.reshape(-1)
    options = dict(scheme=name, bits=bits, bucket_size=64 if name != "tnq-rht" else 128,
                   key=core.stream_key(3, 0, "embed"), step=2, shape=grad.shape)
    payload = core.encode(grad, **options)
    assert np.array_equal(payload, core.encode(grad, reference=True, **options))
    header = core.read_header(payload)
    runs = codec.scan(flat)[0]
    assert header.zero_runs == len(runs) > 0
    assert header.coded_numel == np.count_nonzero(flat)
    values, _, _ = core.decode(payload)
    untouched = ~grad.any(axis=1)
    assert np.all(values.reshape(grad.shape)[untouched] == 0)
    # the other elements decode as a payload of just them would
    mask = codec.coded_mask(flat.size, runs)
    coded_only = core.encode(flat[mask], **options)
    assert np.array_equal(values[mask], core.decode(coded_only)[0])
    # and the payload is that one's plus the run section (8 bytes a run, 4 for the count)
    assert payload.size == coded_only.size + 4 + 8 * len(runs)


@pytest.mark.parametrize("reference", [False, True])
def test_decode_sum_adds_payloads_around_their_own_runs(reference):
    grads = [embedding_gradient(seed=rank) for rank in range(3)] + \
        [np.random.default_rng(9).standard_normal((300, 48)).astype(np.float32)]  # none
    payloads = [core.encode(g, scheme="tnq-rht", bits=2, bucket_size=256,
                            key=core.stream_key(1, rank, "e"), step=0)
                for rank, g in enumerate(grads)]
    buf = np.concatenate(payloads)
    expect = core.PayloadHeader.describe("tnq-rht", 2, "float32", grads[0].size, 256,
                                         grads[0].shape)
    total, count = core.decode_sum(buf, expect, 0.25, np.float32, reference=reference)
    assert count == 4
    one_by_one = sum(core.decode(p)[0] for p in payloads) * 0.25
    assert np.array_equal(total, one_by_one.astype(np.float32))
    same, _ = core.decode_sum(buf, expect, 0.25, np.float32, reference=not reference)
    assert same.tobytes() == total.tobytes()
    out = np.full(grads[0].size, np.nan, np.float32)
    core.decode_sum(buf[: sum(p.size for p in payloads[:3])], expect, 1.0, np.float32, out=out)
    untouched_everywhere = ~np.any([g.any(axis=1) for g in grads[:3]], axis=0)
    assert np.all(out.reshape(300, 48)[untouched_everywhere] == 0)


@pytest.mark.parametrize("name", ["tnq-rht", "tnq", "maxmin"])
def test_all_zero_tensor_and_short_runs(name):
    zeros = np.zeros(1000, np.float32)
    payload = core.encode(zeros, scheme=name, bits=2, bucket_size=128, key=1)
    header = core.read_header(payload)
    assert (header.zero_runs, header.coded_numel) == (1, 0)
    assert np.all(core.decode(payload)[0] == 0)
    assert core.estimate_error(payload) in (None, (0.0, 0.0))
    short = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    short[100: 100 + RUN - 1] = 0  # one zero short of a run: coded as usual
    assert core.read_header(core.encode(short, scheme=name, bits=2, bucket_size=128,
                                        key=1)).zero_runs == 0


def test_error_estimate_counts_only_coded_elements():
    grad = embedding_gradient(rows=2000, dim=64, touched=200)
    payload = core.encode(grad, scheme="tnq-rht", bits=2, bucket_size=512, key=7)
    error, norm = core.estimate_error(payload)
    decoded = core.decode(payload)[0]
    assert 0.8 < norm / float(np.sum(grad.astype(np.float64) ** 2)) < 1.2
    assert 0.7 < error / float(np.sum((decoded - grad.reshape(-1)) ** 2)) < 1.4


def bad_runs(payload, runs):
    """``payload`` (a zero-run payload of tnq) with its run pairs replaced."""
    head = core.HEADER.size
    out = payload.copy()
    pairs = np.asarray(runs, dtype="<u4").reshape(-1).view(np.uint8)
    out[head + 4: head + 4 + pairs.size] = pairs
    return out


@pytest.mark.parametrize("runs,why", [
    ([(0, 40), (30, 40)], "ascending, apart"),  # overlapping
    ([(0, 40), (40, 40)], "ascending, apart"),  # touching: not maximal
    ([(0, 40), (100, 5)], "at least"),  # too short
    ([(0, 40), (990, 40)], "within"),  # beyond the tensor
])
def test_invalid_zero_runs_are_refused(runs, why):
    values = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    values[0:40] = 0
    values[200:240] = 0
    payload = core.encode(values, scheme="tnq", bits=2, bucket_size=128, key=1)
    assert core.read_header(payload).zero_runs == 2
    with pytest.raises(core.PayloadError, match=why):
        core.decode(bad_runs(payload, runs))
    flagged = core.encode(np.ones(1000, np.float32), scheme="tnq", bits=2, bucket_size=128,
                          key=1).copy()
    flagged[30] = codec.ZERO_RUNS_FLAG  # a flag without its section
    with pytest.raises(core.PayloadError):
        core.decode(flagged)


def test_gpu_codec_makes_the_cores_zero_run_payloads():
    """The GPU codec (gpu/) gives such tensors to the core on the host (its rare path) and
    decodes their payloads there too: the same bytes and sums either way."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from horovod_tnq import gpu
    if not gpu.available():
        pytest.skip("the GPU codec is not available here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    grad = embedding_gradient(rows=64, dim=40, touched=10)
    key = core.stream_key(2, 0, "embed")
    for scheme in ("tnq-rht", "tnq"):
        payload = gpu.encode(torch.from_numpy(grad).to(device), scheme=scheme, bits=2,
                             bucket_size=64, key=key, step=1)
        expected = core.encode(grad, scheme=scheme, bits=2, bucket_size=64, key=key, step=1)
        assert np.array_equal(payload.cpu().numpy(), expected)
        expect = core.PayloadHeader.describe(scheme, 2, "float32", grad.size, 64, grad.shape)
        total, count = gpu.decode_sum(payload, expect, 1.0, out_dtype=torch.float32)
        assert count == 1
        assert np.array_equal(total.cpu().numpy(), core.decode_sum(expected, expect, 1.0,
                                                                  np.float32)[0])


def finite(values, dtype):
    """values as dtype, clipped into its finite range (non-finite ones take another path)."""
    top = float(np.finfo(dtype).max)
    return np.clip(values, -top, top).astype(dtype)


def runs_tensor(rng, n, dtype, scale=1.0):
    """n elements with zero runs of every kind the summed decoder walks: at the start and the
    end, longer than its chunk (native.RUNS_CHUNK), across chunk boundaries, one element apart,
    and short zeros that are coded."""
    flat = finite(rng.standard_normal(n) * scale, dtype)
    chunk = native.RUNS_CHUNK
    for start, length in ((0, RUN + int(rng.integers(0, 40))), (n - RUN - 3, RUN + 3),
                          (chunk - 50, 120), (2 * chunk + 7, chunk + 300),
                          (4 * chunk - RUN - 5, RUN + 5)):  # (ends where a chunk does)
        flat[max(start, 0): start + length] = 0
    for _ in range(int(rng.integers(0, 30))):
        start = int(rng.integers(0, n - 4 * RUN))
        flat[start: start + int(rng.integers(1, 4 * RUN))] = 0
    return flat


@pytest.mark.parametrize("avx512", [True, False])
@pytest.mark.parametrize("dtype,scale,bucket", [
    (np.float32, 1.0, 128), (np.float32, 1.0, 8), (np.float32, 1.0, 16), (np.float64, 1.0, 64),
    (np.float64, 2.0 ** 600, 32),  # float64 beyond SAFE_NORMS
    (np.float16, 1.0, 256), (np.float16, 2e4, 512),  # near float16's top: an overflow rule
    (np.float32, 2.0 ** 110, 128),  # norms beyond SAFE_NORMS: payloads scaled by 2^-e
])
def test_summed_decoder_with_runs_matches_the_reference(avx512, dtype, scale, bucket):
    """tnq-rht payloads with zero runs summed in one cached pass (native.c's
    tnq_rotated_decode_runs_sum) give the numpy reference's bits, into a fresh array or out=,
    for ranks whose runs differ, one rank without runs and one with nothing but zeros."""
    rng = np.random.default_rng(bucket + int(np.log2(scale)))
    n = 4 * native.RUNS_CHUNK + 1001
    grads = [runs_tensor(rng, n, dtype, scale) for _ in range(3)]
    grads += [finite(rng.standard_normal(n) * scale, dtype), np.zeros(n, dtype)]
    options = dict(scheme="tnq-rht", bits=3, bucket_size=bucket)
    payloads = [core.encode(g, key=core.stream_key(2, rank, "w"), step=rank, **options)
                for rank, g in enumerate(grads)]
    assert [core.read_header(p).zero_runs > 0 for p in payloads] == [True] * 3 + [False, True]
    for rank, (g, p) in enumerate(zip(grads, payloads)):  # encoded around the runs, no copy
        assert np.array_equal(p, core.encode(g, key=core.stream_key(2, rank, "w"), step=rank,
                                             reference=True, **options))
    expect = core.PayloadHeader.describe("tnq-rht", 3, np.dtype(dtype).name, n, bucket, (n,))
    for count in (1, 2, 5):
        buf = np.concatenate(payloads[:count])
        for out_dtype in (np.float32, np.float64):
            reference, _ = core.decode_sum(buf, expect, 1 / 3, out_dtype, reference=True)
            try:
                native.set_vector_path(avx512)
                summed, _ = core.decode_sum(buf, expect, 1 / 3, out_dtype)
                out = np.full(n, np.nan, out_dtype)
                into, _ = core.decode_sum(buf, expect, 1 / 3, out_dtype, out=out)
            finally:
                native.set_vector_path(True)
            assert summed.tobytes() == reference.tobytes(), (count, out_dtype)
            assert into is out and out.tobytes() == reference.tobytes()
    zeros_everywhere = np.all([g == 0 for g in grads[:3]], axis=0)
    assert np.all(core.decode_sum(np.concatenate(payloads[:3]), expect, 1.0)[0][zeros_everywhere]
                  == 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rotated_encoder_reads_around_runs_beside_non_finite_elements(dtype):
    # non-finite elements travel as exceptions indexed among the coded elements: the kernel
    # that reads around the runs gives the reference's payload, and they decode in place
    rng = np.random.default_rng(4)
    flat = runs_tensor(rng, 3 * native.RUNS_CHUNK, dtype)
    mask = codec.coded_mask(flat.size, codec.scan(flat)[0])
    coded = np.flatnonzero(mask)
    flat[coded[[5, 700, -1]]] = [np.inf, np.nan, -np.inf]
    options = dict(scheme="tnq-rht", bits=2, bucket_size=256, key=7, step=1)
    payload = core.encode(flat, **options)
    assert np.array_equal(payload, core.encode(flat, reference=True, **options))
    assert core.read_header(payload).num_exceptions == 3
    values = core.decode(payload)[0]
    assert np.array_equal(values[coded[[5, -1]]], [np.inf, -np.inf])
    assert np.isnan(values[coded[700]]) and np.all(values[~mask] == 0)
