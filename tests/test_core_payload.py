import numpy as np
import pytest

from horovod_tnq import core


def payload(bits=3, n=1000, bucket_size=256, key=7, shape=None):
    x = np.random.default_rng(0).normal(size=n).astype(np.float32)
    return core.encode(x, bits=bits, bucket_size=bucket_size, key=key, shape=shape)


def test_size_is_header_scales_and_packed_codes():
    p = payload(bits=3, n=1000, bucket_size=256)
    assert p.size == 32 + 4 * 4 + (1000 * 3 + 7) // 8
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
    start = 32 + 2 * 4
    p[start: start + 8] = np.frombuffer(np.uint64(1000).tobytes(), dtype=np.uint8)
    with pytest.raises(core.PayloadError, match="out of range"):
        core.decode(p)
