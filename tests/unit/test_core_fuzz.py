"""Hostile payloads: random and mutated bytes fed to every decode entry point end in a clear
PayloadError or a result, never another exception, a huge allocation or a hang."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from horovod_tnq import core

OPTIONS = {"dp-binomial": dict(dp_clip=1.0, dp_sensitivity=0.01)}
VALUES = np.random.default_rng(0).standard_normal(3000).astype(np.float32)
VALUES[[10, 20]] = [np.nan, -np.inf]  # payloads with exceptions too


# and payloads with a zero-run section (codec.MIN_ZERO_RUN)
ZEROED = VALUES.copy()
ZEROED[[*range(100, 180), *range(1500, 1540)]] = 0


def payload_of(name, values=VALUES):
    bits = next(b for b in (4, 2, 1) if core.supports(name, b))
    return core.encode(values, scheme=name, bits=bits, bucket_size=256, key=1,
                       options=OPTIONS.get(name))


PAYLOADS = {name: payload_of(name) for name in core.SCHEMES}
PAYLOADS.update({f"{name} zero runs": payload_of(name, ZEROED)
                 for name, scheme in core.SCHEMES.items() if scheme.body is None})
NAMES = sorted(PAYLOADS)

mutation = st.one_of(
    st.tuples(st.just("bytes"), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                         min_size=1, max_size=4)),
    st.tuples(st.just("header"), st.lists(st.tuples(st.integers(4, 47), st.integers(0, 255)),
                                          min_size=1, max_size=3)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("random"), st.binary(min_size=0, max_size=120)),
)


def mutated(payload, change):
    kind, detail = change
    payload = payload.copy()
    if kind in ("bytes", "header"):
        for at, value in detail:
            payload[at % payload.size] = value
    elif kind == "truncate":
        payload = payload[: detail % payload.size]
    else:
        payload = np.frombuffer(core.codec.MAGIC + detail, dtype=np.uint8).copy()
    return payload


@settings(max_examples=1500, deadline=None)
@given(name=st.sampled_from(NAMES), change=mutation)
def test_mutated_payloads_raise_payload_error_or_decode(name, change):
    original = PAYLOADS[name]
    payload = mutated(original, change)
    expect = core.read_header(original)
    for decode in (lambda: core.decode(payload),
                   lambda: list(core.iter_payloads(payload)),
                   lambda: core.decode_sum(payload, expect),
                   lambda: core.decode_sum(np.concatenate([original, payload]), expect)):
        try:
            decode()
        except core.PayloadError:
            pass


def test_a_sparse_payload_declaring_a_huge_tensor_is_refused_before_allocating():
    payload = PAYLOADS["topk"].copy()
    payload[8:16] = np.frombuffer(np.uint64(1 << 40).tobytes(), np.uint8)  # numel
    with pytest.raises(core.PayloadError, match="more than the"):
        core.decode(payload)
    with pytest.raises(core.PayloadError, match="numel=1099511627776, more than the 3000"):
        core.decode_sum(payload, core.read_header(PAYLOADS["topk"]))
