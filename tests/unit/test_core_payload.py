import numpy as np
import pytest

from horovod_tnq import core


def payload(bits=3, n=1000, bucket_size=256, key=7, shape=None):
    x = np.random.default_rng(0).normal(size=n).astype(np.float32)
    return core.encode(x, bits=bits, bucket_size=bucket_size, key=key, shape=shape)


def test_size_is_header_scales_and_packed_codes():
    p = payload(bits=3, n=1000, bucket_size=256)
    assert p.size == core.HEADER.size + 4 * 4 + (1000 * 3 + 7) // 8
    assert core.encoded_size(1000, 3, 256) == p.size


def test_concatenated_payloads_decode_and_sum():
    parts = [payload(key=k) for k in range(3)]
    total, count = core.decode_sum(np.concatenate(parts), core.read_header(parts[0]))
    expected = sum(core.decode(p)[0] for p in parts)
    assert count == 3
    np.testing.assert_array_equal(total, expected)


@pytest.mark.parametrize("field, other", [("bits", dict(bits=4)), ("numel", dict(n=999)),
                                          ("bucket_size", dict(bucket_size=128)),
                                          ("shape_tag", dict(shape=(10, 100)))])
def test_mismatched_settings_name_the_field(field, other):
    mine = payload()
    with pytest.raises(core.PayloadError, match=field):
        core.decode_sum(np.concatenate([mine, payload(**other)]), core.read_header(mine))


def test_truncated_payload_is_reported():
    p = payload()
    for cut in (10, p.size - 1):
        with pytest.raises(core.PayloadError, match="truncated"):
            core.decode(p[:cut])


def test_corrupted_header_is_reported():
    p = payload().copy()
    p[0] = ord("X")
    with pytest.raises(core.PayloadError, match="not a horovod_tnq payload"):
        core.decode(p)
    p = payload().copy()
    p[5] = 12  # bits
    with pytest.raises(core.PayloadError, match="bits"):
        core.decode(p)


def test_exception_index_out_of_range_is_reported():
    x = np.ones(100, dtype=np.float32)
    x[5] = np.nan
    p = core.encode(x, bits=2, bucket_size=64, key=0).copy()
    start = core.HEADER.size + 2 * 4
    p[start: start + 8] = np.frombuffer(np.uint64(1000).tobytes(), dtype=np.uint8)
    with pytest.raises(core.PayloadError, match="out of range"):
        core.decode(p)


@pytest.mark.parametrize("scheme, bits, extra", [("maxmin", 3, 4 * 4), ("bingrad", 1, 4 * 4),
                                                 ("orq", 3, 8 * 4), ("tnq-opt", 2, 4 * 4)])
def test_size_counts_offsets_and_fitted_levels(scheme, bits, extra):
    """maxmin and bingrad add one offset per bucket, orq and tnq-opt a table of 2**bits float32."""
    x = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    p = core.encode(x, scheme=scheme, bits=bits, bucket_size=256, key=0)
    assert p.size == core.HEADER.size + 4 * 4 + extra + (1000 * bits + 7) // 8
    assert core.encoded_size(1000, bits, 256, scheme=scheme) == p.size
    header = core.read_header(p)
    assert (header.bucket_params, header.num_levels) == (
        core.get_scheme(scheme).bucket_params, core.get_scheme(scheme).levels_sent(bits))


def test_older_format_version_is_named():
    p = payload().copy()
    p[3] = 1
    reads = f"format version 1, this rank reads version {core.codec.FORMAT_VERSION}"
    with pytest.raises(core.PayloadError, match=reads):
        core.decode(p)


def orq_payload():
    x = np.random.default_rng(1).standard_t(3, 1000).astype(np.float32)
    return core.encode(x, scheme="orq", bits=3, bucket_size=256, key=0).copy()


@pytest.mark.parametrize("level, value", [(3, np.nan), (3, -5.0), (7, np.inf)])
def test_unordered_or_non_finite_levels_are_reported(level, value):
    p = orq_payload()
    table = p[core.HEADER.size: core.HEADER.size + 8 * 4].view("<f4")
    table[level] = value
    with pytest.raises(core.PayloadError, match="level table"):
        core.decode(p)


@pytest.mark.parametrize("offset, value, match", [(7, 2, "parameters per bucket"),
                                                 (28, 4, "levels sent"), (30, 2, "flags")])
def test_header_counts_must_match_the_scheme(offset, value, match):
    p = orq_payload()
    p[offset] = value
    with pytest.raises(core.PayloadError, match=match):
        core.decode(p)


def test_code_beyond_the_table_is_reported():
    # QSGD at 2 bits has three levels, so code 3 cannot come from an encoder
    x = np.random.default_rng(2).normal(size=64).astype(np.float32)
    p = core.encode(x, scheme="qsgd", bits=2, bucket_size=64, key=0).copy()
    p[-16:] = 0xFF
    with pytest.raises(core.PayloadError, match="beyond the 3 levels"):
        core.decode(p)


def test_ranks_with_different_schemes_fail_loudly():
    x = np.random.default_rng(3).normal(size=1000).astype(np.float32)
    mine = core.encode(x, scheme="orq", bits=3, bucket_size=256, key=0)
    theirs = core.encode(x, scheme="tnq-opt", bits=3, bucket_size=256, key=0)
    with pytest.raises(core.PayloadError, match="scheme_id"):
        core.decode_sum(np.concatenate([mine, theirs]), core.read_header(mine))


def test_a_bucket_size_beyond_the_limit_is_refused_by_encoder_and_decoder():
    from horovod_tnq.core.codec import MAX_BUCKET_SIZE
    with pytest.raises(ValueError, match="bucket_size must be an int"):
        core.encode(np.ones(64, np.float32), bits=4, bucket_size=MAX_BUCKET_SIZE + 1, key=1)
    payload = core.encode(np.ones(64, np.float32), scheme="tnq", bits=4, bucket_size=64, key=1)
    payload[16:20] = np.frombuffer(np.uint32(2**32 - 1).tobytes(), np.uint8)  # bucket size field
    with pytest.raises(core.PayloadError, match="bucket size 4294967295"):
        core.decode(payload)


def test_one_large_bucket_on_a_small_tensor_allocates_the_tensor_only():
    from horovod_tnq.core.codec import MAX_BUCKET_SIZE
    import tracemalloc
    values = np.linspace(-1, 1, 1000).astype(np.float32)
    payload = core.encode(values, scheme="tnq", bits=4, bucket_size=MAX_BUCKET_SIZE, key=1,
                          reference=True)
    tracemalloc.start()
    decoded, _, _ = core.decode(payload)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert decoded.shape == (1000,) and peak < 1 << 20  # bytes: not a bucket's worth


@pytest.mark.parametrize("scheme", ["qsgd", "nuqsgd"])
@pytest.mark.parametrize("reference", [True, False])
def test_norms_beyond_float32_decode_finite(scheme, reference):
    # |x| ~ 1.5e37 over 512-element buckets: the L2 norm exceeds float32's largest value
    x = (np.random.default_rng(0).standard_normal(4096) * 1.5e37).astype(np.float32)
    payload = core.encode(x, scheme=scheme, bits=4, bucket_size=512, key=1, reference=reference)
    decoded = core.decode(payload)[0]
    assert np.all(np.isfinite(decoded))
    assert np.sum((decoded - x) ** 2) < 2 * np.sum(x.astype(np.float64) ** 2)


@pytest.mark.parametrize("scheme", ["tnq-rht", "tnq", "qsgd"])
@pytest.mark.parametrize("reference", [True, False])
def test_a_finite_sum_near_float32s_limit_stays_finite(scheme, reference):
    # 1.7e38 + 1.7e38 is finite in float32; quantization error must not round it to inf
    x = np.full(4096, 1.7e38, np.float32)
    payloads = [core.encode(x, scheme=scheme, bits=4, bucket_size=512, key=rank,
                            reference=reference) for rank in range(2)]
    total, _ = core.decode_sum(np.concatenate(payloads), core.read_header(payloads[0]), 1.0,
                               np.float32, reference=reference)
    assert np.all(np.isfinite(total)) and np.median(total) > 2.5e38


def test_true_infinities_still_reach_the_sum():
    x = np.full(4096, 1.7e38, np.float32)
    x[5] = np.inf
    payloads = [core.encode(x, bits=4, bucket_size=512, key=rank) for rank in range(2)]
    total, _ = core.decode_sum(np.concatenate(payloads), core.read_header(payloads[0]), 1.0,
                               np.float32)
    assert total[5] == np.inf and np.isfinite(np.delete(total, 5)).all()
