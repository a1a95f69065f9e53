"""The host codec's seam (protocol/host_core.py): what the benchmarks install through it takes
effect on the host codec's real calls, and comes off again."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks import worker_common
from horovod_tnq import CompressorConfig, core
from horovod_tnq.protocol import CompressorState
from horovod_tnq.protocol.exchange import NumpyCodec
from horovod_tnq.protocol.host_core import HOST_CORE
from horovod_tnq.torch.codecs import HostCodec

CONFIG = CompressorConfig(bits=3)
N = 4096


def values(seed):
    return np.random.default_rng(seed).standard_normal(N).astype(np.float32)


def expect():
    return core.PayloadHeader.describe(CONFIG.scheme, CONFIG.bits, "float32", N,
                                       CONFIG.bucket_size, (N,))


def own_payload(seed, step):
    return core.encode(values(seed), scheme=CONFIG.scheme, bits=CONFIG.bits,
                       bucket_size=CONFIG.bucket_size, key=7, step=step, dtype_name="float32",
                       shape=(N,), options=CONFIG.scheme_options())


def decoded(codec, payload):
    out = np.empty(N, np.float32)
    assert codec.decode_sum(payload, expect(), 1.0, out) == 1
    return out


@pytest.fixture
def restore():
    before = HOST_CORE.encode, HOST_CORE.decode_sum
    undo = []
    yield undo
    for step in reversed(undo):
        step()
    assert (HOST_CORE.encode, HOST_CORE.decode_sum) == before


def test_the_host_codec_calls_the_core_unless_told_otherwise():
    assert HOST_CORE.encode is core.encode and HOST_CORE.decode_sum is core.decode_sum
    codec = NumpyCodec(CompressorState(CONFIG), lambda slot: 7, "float32")
    np.testing.assert_array_equal(codec.encode(values(1), "w", 3, (N,), CONFIG, None),
                                  own_payload(1, 3))


def test_replay_codec_replays_the_first_payload_and_sum_of_the_host_codec(restore):
    codec = NumpyCodec(CompressorState(CONFIG), lambda slot: 7, "float32")
    first, second = own_payload(1, 0), own_payload(2, 1)
    restore.append(worker_common.replay_codec())
    replayed = [codec.encode(values(seed), "w", step, (N,), CONFIG, None)
                for seed, step in ((1, 0), (2, 1))]
    np.testing.assert_array_equal(replayed[0], first)
    np.testing.assert_array_equal(replayed[1], first)  # the second gradient's bytes: the first's
    sums = [decoded(codec, payload) for payload in (first, second)]
    np.testing.assert_array_equal(sums[1], sums[0])  # the second payload decodes as the first
    restore.pop()()
    np.testing.assert_array_equal(codec.encode(values(2), "w", 1, (N,), CONFIG, None), second)
    assert not np.array_equal(decoded(codec, second), sums[0])


def test_replay_takes_effect_on_pytorchs_host_codec(restore):
    """The path of the PyTorch digits worker's CPU tensors (and the DDP hook's)."""
    owner = SimpleNamespace(state=CompressorState(CONFIG), key=lambda slot: 7)  # a compressor
    codec = HostCodec(owner, torch.float32)
    restore.append(worker_common.replay_codec())
    payloads = [codec.encode(codec.values(torch.from_numpy(values(seed))), "w", step, (N,),
                             CONFIG, None) for seed, step in ((1, 0), (2, 1))]
    np.testing.assert_array_equal(payloads[0], payloads[1])


def test_codec_timer_times_what_the_host_codec_runs_and_comes_off(restore):
    codec = NumpyCodec(CompressorState(CONFIG), lambda slot: 7, "float32")
    timer = worker_common.CodecTimer()
    restore.append(timer.undo)
    payload = codec.encode(values(1), "w", 0, (N,), CONFIG, None)
    decoded(codec, payload)
    assert timer.encode_s > 0 and timer.decode_cpu_s >= 0
    timer.undo()
    restore.pop()
    spent = timer.encode_s
    codec.encode(values(1), "w", 0, (N,), CONFIG, None)
    assert timer.encode_s == spent
