"""core.estimate_error (issue 18): a cheap estimate of each payload's squared quantization error
and of the encoded tensor's squared norm, tested against the true error ||decode - x||^2 on real
gradients (benchmarks/gradients.py: a CNN on digits, a character-level GRU LM) and on synthetic
heavy tails, for every covered scheme; None for the others; the same numbers from the numpy
reference's and the compiled kernel's payloads (the same bytes).

The bounds asserted are the measured accuracy plus a margin (measured values in comments: the
ratio estimated relative error / true relative error over five rotation/rounding keys).
"""

import hashlib
import os
import time

import numpy as np
import pytest

from horovod_tnq import core
from horovod_tnq.core import codec, error_estimate, levels, native

BUCKET = 512  # the compressors' default
ALL_BITS = (1, 2, 3, 4, 8)


def _capture():
    from benchmarks import gradients
    layers = {}
    for source, capture in (("cnn_digits", gradients.cnn_digits), ("char_lm", gradients.char_lm)):
        for name, grad in capture().items():
            layers[f"{source}/{name}"] = grad
    return layers


@pytest.fixture(scope="module")
def real(request):
    """{source: {layer: float32 gradient}} of the two real models, cached in pytest's cache
    directory (keyed by the capturing code) so that reruns skip the 4 s of training."""
    import benchmarks.gradients
    with open(benchmarks.gradients.__file__, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    cache = getattr(request.config, "cache", None)
    path = os.path.join(str(cache.mkdir("error_estimate")), f"real_{digest}.npz") if cache else None
    if path and os.path.exists(path):
        with np.load(path) as stored:
            layers = dict(stored)
    else:
        layers = _capture()
        if path:
            np.savez(path, **layers)
    sources = {}
    for key, grad in layers.items():
        source, name = key.split("/", 1)
        sources.setdefault(source, {})[name] = grad
    return sources


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(0)
    n = 1 << 16
    return {"laplace": {"all": rng.laplace(size=n).astype(np.float32)},
            "student_t3": {"all": rng.standard_t(3, n).astype(np.float32)},
            "student_t2": {"all": rng.standard_t(2, n).astype(np.float32)}}


def true_error(payload, x):
    decoded = core.decode(payload)[0]
    x = x.astype(np.float64)
    return float(np.sum((decoded - x) ** 2)), float(np.sum(x * x))


def measure(layers, scheme, bits, keys=(0,), min_layer=0):
    """(aggregate ratio, per-layer ratios, aggregate norm ratio): estimated relative error over
    true relative error, both summed over the layers and the keys; the same per layer (layers
    of at least ``min_layer`` elements; a layer of three buckets says little)."""
    est_error = est_norm = error = norm = 0.0
    per_layer = []
    for x in layers.values():
        layer = [0.0] * 4
        for key in keys:
            payload = core.encode(x, scheme=scheme, bits=bits, bucket_size=BUCKET, key=key,
                                  step=1)
            estimate = core.estimate_error(payload)
            assert estimate is not None, (scheme, bits)
            for i, value in enumerate(estimate + true_error(payload, x)):
                layer[i] += value
        est_error, est_norm = est_error + layer[0], est_norm + layer[1]
        error, norm = error + layer[2], norm + layer[3]
        if x.size >= min_layer:
            per_layer.append((layer[0] / layer[1]) / (layer[2] / layer[3]))
    return (est_error / est_norm) / (error / norm), per_layer, est_norm / norm


def within(ratio, factor):
    return 1.0 / factor <= ratio <= factor


# --- the default scheme, tnq-rht: header only --------------------------------------------------

def test_rotated_constants_are_edens_lloyd_max_error():
    """For large buckets the relative error is E[Q^2] / E[QZ]^2 - 1 = D / (1 - D), D the
    Lloyd-Max distortion (Max 1960: 0.1175, 0.03455, 0.009497 at 2-4 bits); buckets below 1024
    use Monte Carlo constants, which converge to the same values."""
    for bits, distortion in ((1, 0.3634), (2, 0.1175), (3, 0.03455), (4, 0.009497)):
        c_norm, c_error = error_estimate.rht_constants(bits, 4096)
        assert c_error / c_norm == pytest.approx(distortion / (1 - distortion), rel=2e-3)
        small_norm, small_error = error_estimate.rht_constants(bits, 512)
        assert small_error / small_norm == pytest.approx(c_error / c_norm, rel=0.02)
        assert small_norm / 512 ** 2 == pytest.approx(c_norm / 4096 ** 2, rel=0.01)
    # deterministic: the same constants on every rank
    error_estimate.rht_constants.cache_clear()
    assert error_estimate.rht_constants(2, 64) == error_estimate.rht_constants(2, 64)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_rotated_estimate_on_real_gradients(real, bits):
    """tnq-rht: within 10% over each model's layers, within 15% on every layer of at least 4096
    elements (measured: 0.95-1.05 per model, 0.94-1.10 per layer, at 1-8 bits)."""
    for source, layers in real.items():
        ratio, per_layer, norm_ratio = measure(layers, "tnq-rht", bits, keys=(0, 1),
                                               min_layer=4096)
        assert within(ratio, 1.10), (source, bits, ratio)
        assert all(within(r, 1.15) for r in per_layer), (source, bits, per_layer)
        assert within(norm_ratio, 1.03), (source, bits, norm_ratio)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_rotated_estimate_on_heavy_tails(synthetic, bits):
    """tnq-rht on synthetic data: Laplace and Student-t(3) within 10% (measured 0.99-1.06);
    Student-t(2), whose rotated buckets are furthest from Gaussian (a few huge elements
    dominate their sums), is overestimated: by 8-14% at 2-8 bits, 1.53-1.55x at 1 bit."""
    for source, layers in synthetic.items():
        ratio, _, norm_ratio = measure(layers, "tnq-rht", bits)
        if source == "student_t2":
            assert 1.0 <= ratio <= (1.7 if bits == 1 else 1.25), (source, bits, ratio)
            assert within(norm_ratio, 1.2), (source, bits, norm_ratio)
        else:
            assert within(ratio, 1.10), (source, bits, ratio)
            assert within(norm_ratio, 1.05), (source, bits, norm_ratio)


@pytest.mark.parametrize("bucket_size", [8, 64, 512, 2048])
def test_rotated_estimate_holds_for_every_bucket_size(bucket_size):
    """The finite-bucket constants (Gaussian rotated coordinates normalised by their own RMS):
    without them buckets of 8 were overestimated by 1.42x; with them, Gaussian data within 5%
    at every size (measured 0.98-1.01)."""
    x = np.random.default_rng(bucket_size).normal(size=1 << 17).astype(np.float32)
    for bits in (1, 2, 4, 8):
        payload = core.encode(x, scheme="tnq-rht", bits=bits, bucket_size=bucket_size, key=5)
        est_error, est_norm = core.estimate_error(payload)
        error, norm = true_error(payload, x)
        assert within((est_error / est_norm) / (error / norm), 1.05), (bucket_size, bits)
        assert within(est_norm / norm, 1.02), (bucket_size, bits)


def test_header_only_schemes_do_not_read_the_codes():
    """tnq-rht, tnq and tnq-uniform estimate from the header and the per-bucket scales alone:
    payloads whose codes are overwritten give the same numbers."""
    x = np.random.default_rng(1).standard_t(3, 10_000).astype(np.float32)
    for scheme in ("tnq-rht", "tnq", "tnq-uniform"):
        payload = core.encode(x, scheme=scheme, bits=3, bucket_size=BUCKET, key=2)
        codes_at = payload.size - codec.read_header(payload).section_sizes()[4]
        scrambled = payload.copy()
        scrambled[codes_at:] = 0
        assert core.estimate_error(scrambled) == core.estimate_error(payload)
        assert core.estimate_error(payload.tobytes()) == core.estimate_error(payload)


# --- tnq and tnq-uniform: the Laplace model they are built on, header only --------------------

def test_laplace_table_error_is_below_tnq_closed_form_bound():
    for bits in range(1, 9):
        tnq_id = core.SCHEMES["tnq"].scheme_id
        assert error_estimate.laplace_table_error(tnq_id, bits) <= \
            levels.laplace_error_bound(bits)


@pytest.mark.parametrize("scheme", ["tnq", "tnq-uniform"])
def test_laplace_schemes(real, synthetic, scheme):
    """Exact on the model's own data (Laplace within 5%, measured 0.97-1.05 at 1-8 bits); over a
    real model's layers within 25% at 1-4 bits (measured 0.90-1.17; single layers 0.35-1.3);
    heavy tails are what the Laplace model cannot see, so there the estimate is low
    (measured 0.05-0.91 on Student-t(3)/(2) at 1-4 bits, below 0.01 at 8 bits; on the CNN
    at 8 bits 0.35-0.46)."""
    for bits in ALL_BITS:
        ratio, _, norm_ratio = measure(synthetic["laplace"], scheme, bits)
        assert within(ratio, 1.05) and within(norm_ratio, 1.02), (bits, ratio, norm_ratio)
        for source in ("student_t3", "student_t2"):
            ratio, _, norm_ratio = measure(synthetic[source], scheme, bits)
            assert ratio < 0.95 and norm_ratio < 0.9, (source, bits, ratio, norm_ratio)
        if bits <= 4:
            for source, layers in real.items():
                ratio, _, _ = measure(layers, scheme, bits)
                assert within(ratio, 1.25), (source, bits, ratio)


# --- qsgd, nuqsgd, maxmin: codes read --------------------------------------------------------

@pytest.mark.parametrize("scheme", ["qsgd", "nuqsgd"])
def test_norm_scaled_schemes(real, synthetic, scheme):
    """||Q(x)||^2 - ||x||^2 with the exact norms the scales carry: within 10% at 2-3 bits on
    every source and real layer (measured 0.94-1.05); qsgd within 15% at 4 bits (0.93-1.09)."""
    for bits in (2, 3, 4):
        if scheme == "nuqsgd" and bits == 4:
            continue  # coarse top cells: see test_norm_scaled_estimate_is_unbiased
        factor = 1.15 if bits == 4 else 1.10
        for source, layers in {**real, **synthetic}.items():
            ratio, per_layer, norm_ratio = measure(layers, scheme, bits, min_layer=4096)
            assert within(ratio, factor), (source, bits, ratio)
            assert all(within(r, factor) for r in per_layer), (source, bits, per_layer)
            assert norm_ratio == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("scheme,bits", [("qsgd", 8), ("nuqsgd", 4), ("nuqsgd", 8)])
def test_norm_scaled_estimate_is_unbiased(real, scheme, bits):
    """Where few large elements round in coarse cells (nuqsgd's top cells, qsgd at 8 bits) the
    estimate's own noise 2 <Q(x) - x, x> is as large as the error: one step of one model
    measures 0.63-1.60x. It is unbiased, so averaged over steps it converges: over 8 steps
    within 25% (measured 0.87-1.03)."""
    for source, layers in real.items():
        ratio, _, _ = measure(layers, scheme, bits, keys=range(8))
        assert within(ratio, 1.25), (source, ratio)


def test_maxmin(real, synthetic):
    """High-resolution approximation delta^2 / 6 per element: within 20% at 3-8 bits (measured
    0.86-1.14, real models 0.91-1.08); None at 1-2 bits, where cells are as wide as the data."""
    for bits in (3, 4, 8):
        for source, layers in {**real, **synthetic}.items():
            ratio, per_layer, norm_ratio = measure(layers, "maxmin", bits, min_layer=4096)
            assert within(ratio, 1.2), (source, bits, ratio)
            assert all(within(r, 1.2) for r in per_layer), (source, bits, per_layer)
            assert within(norm_ratio, 1.1), (source, bits, norm_ratio)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("bucket_size", [5, 12, 512])
def test_code_sums_match_the_decoded_values(bits, bucket_size):
    """bucket_code_sums' byte tables (1, 2, 4, 8 bits, whole buckets in bytes) and its unpacking
    path (otherwise), ragged last bucket and last byte included: qsgd's estimate is exactly
    ||decoded||^2 - ||x||^2 with the stored norms."""
    x = np.random.default_rng(bits).laplace(size=1001).astype(np.float32)
    payload = core.encode(x, scheme="qsgd", bits=bits, bucket_size=bucket_size, key=3)
    sections = codec.split(payload)
    decoded = core.decode(payload)[0]
    expected = float(np.sum(decoded ** 2) - np.sum(sections.scales ** 2))
    assert core.estimate_error(payload)[0] == pytest.approx(max(expected, 0.0), rel=1e-9)


# --- coverage, same bytes, edge cases ---------------------------------------------------------

OPTIONS = {"dp-binomial": {"dp_clip": 1.0, "dp_sensitivity": 0.01, "dp_epsilon": 8.0}}


def test_none_for_schemes_without_a_cheap_estimate():
    x = np.random.default_rng(4).laplace(size=3000).astype(np.float32)
    covered = set()
    for name in core.SCHEMES:
        for bits in range(1, 9):
            if not core.supports(name, bits):
                continue
            payload = core.encode(x, scheme=name, bits=bits, bucket_size=BUCKET, key=1,
                                  options=OPTIONS.get(name))
            estimate = core.estimate_error(payload)
            expected = error_estimate.COVERED_SCHEMES.get(name, 99) <= bits
            assert (estimate is not None) == expected, (name, bits)
            if estimate is not None:
                covered.add(name)
    assert covered == {"tnq-rht", "tnq", "tnq-uniform", "qsgd", "nuqsgd", "maxmin"}
    for name in ("topk", "tnq-sparse", "dp-binomial", "dqsgd", "qsgdinf", "terngrad", "sign",
                 "bingrad", "orq", "tnq-fit", "tnq-opt"):
        assert name not in covered


@pytest.mark.skipif(native.LIBRARY is None, reason="the compiled kernel is not built")
def test_numpy_reference_and_compiled_kernel_payloads_estimate_alike():
    x = np.random.default_rng(6).standard_t(3, 20_000).astype(np.float32)
    for name, first in error_estimate.COVERED_SCHEMES.items():
        for bits in sorted({first, 4, 8}):
            payloads = [core.encode(x, scheme=name, bits=bits, bucket_size=BUCKET, key=9,
                                    step=2, reference=reference) for reference in (True, False)]
            assert np.array_equal(payloads[0], payloads[1]), (name, bits)
            assert core.estimate_error(payloads[0]) == core.estimate_error(payloads[1])


def test_zero_and_empty_tensors():
    for name, first in error_estimate.COVERED_SCHEMES.items():
        for x in (np.zeros(0, np.float32), np.zeros(3000, np.float32)):
            payload = core.encode(x, scheme=name, bits=max(first, 3), bucket_size=BUCKET, key=1)
            assert core.estimate_error(payload) == (0.0, 0.0), name
            assert not np.any(core.decode(payload)[0])  # decoded exactly: 0 / 0 means no error


def test_non_finite_exceptions_are_left_out():
    """Non-finite elements travel exactly and their norm is infinite: the estimate describes
    the finite part, as the encoder saw it (zeros in their place)."""
    x = np.random.default_rng(7).laplace(size=8192).astype(np.float32)
    bad = x.copy()
    bad[[5, 700, 4000]] = [np.inf, -np.inf, np.nan]
    zeroed = np.where(np.isfinite(bad), bad, 0).astype(np.float32)
    for name, first in error_estimate.COVERED_SCHEMES.items():
        bits = max(first, 4)
        with_exceptions = core.encode(bad, scheme=name, bits=bits, bucket_size=BUCKET, key=1)
        assert codec.read_header(with_exceptions).num_exceptions == 3
        estimate = core.estimate_error(with_exceptions)
        assert all(np.isfinite(estimate)), name
        plain = core.estimate_error(core.encode(zeroed, scheme=name, bits=bits,
                                                bucket_size=BUCKET, key=1))
        assert estimate == pytest.approx(plain, rel=1e-6), name
        decoded = core.decode(with_exceptions)[0]
        finite = np.isfinite(bad)
        error = float(np.sum((decoded[finite] - bad[finite]) ** 2))
        norm = float(np.sum(bad[finite].astype(np.float64) ** 2))
        assert within((estimate[0] / estimate[1]) / (error / norm), 1.3), name


def test_scaled_rotated_payloads_and_other_dtypes():
    """Rotated tensors beyond float32's safe norms travel as x * 2^-e (codec.SAFE_NORMS): the
    estimate scales back by 4^e; float16 and float64 tensors estimate like float32 ones."""
    x = np.random.default_rng(8).laplace(size=1 << 14)
    reference = core.estimate_error(core.encode(x.astype(np.float32), scheme="tnq-rht", bits=3,
                                                bucket_size=BUCKET, key=1))
    for values, factor in ((np.ldexp(x, -120).astype(np.float32), 2.0 ** -240),
                           (np.ldexp(x, 110).astype(np.float32), 2.0 ** 220),
                           (np.ldexp(x, -480), 2.0 ** -960),
                           (x.astype(np.float16), 1.0), (x, 1.0)):
        payload = core.encode(values, scheme="tnq-rht", bits=3, bucket_size=BUCKET, key=1)
        est_error, est_norm = core.estimate_error(payload)
        error, norm = true_error(payload, values)
        assert est_norm == pytest.approx(norm, rel=0.03), values.dtype
        assert within((est_error / est_norm) / (error / norm), 1.1), values.dtype
        assert est_error / factor == pytest.approx(reference[0], rel=0.05)


def test_cost_against_encode():
    """Reported, not asserted: estimate_error against core.encode on 1M float32 elements."""
    x = np.random.default_rng(9).standard_t(3, 1 << 20).astype(np.float32)

    def best(call, repeat):
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return min(times) * 1e3

    for name, bits in (("tnq-rht", 4), ("tnq", 4), ("qsgd", 4), ("maxmin", 4)):
        payload = core.encode(x, scheme=name, bits=bits, bucket_size=BUCKET, key=1)
        core.estimate_error(payload)  # constants computed once per (bits, bucket size)
        encode_ms = best(lambda: core.encode(x, scheme=name, bits=bits, bucket_size=BUCKET,
                                             key=1), 5)
        estimate_ms = best(lambda: core.estimate_error(payload), 20)
        print(f"{name} {bits} bits, 2^20 float32: encode {encode_ms:.2f} ms, "
              f"estimate_error {estimate_ms:.3f} ms ({estimate_ms / encode_ms:.1%})")
