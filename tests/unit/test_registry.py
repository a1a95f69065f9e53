"""get_compressor: one registry of names for both frameworks."""

import horovod.tensorflow as hvd_tf
import horovod.torch as hvd_torch
import pytest

from horovod_tnq import core
from horovod_tnq.tensorflow import TNQCompressor as TFCompressor
from horovod_tnq.tensorflow import get_compressor as tf_get
from horovod_tnq.torch import TNQCompressor as TorchCompressor
from horovod_tnq.torch import get_compressor as torch_get


OPTIONS = {"dp-binomial": dict(dp_clip=1.0, dp_sensitivity=0.01)}


@pytest.mark.parametrize("get, cls", [(torch_get, TorchCompressor), (tf_get, TFCompressor)])
def test_every_scheme_is_reachable_by_name(get, cls):
    for name in core.SCHEMES:
        bits = next(b for b in (4, 2, 1) if core.supports(name, b))
        compressor = get(name, bits=bits, bucket_size=256, **OPTIONS.get(name, {}))
        assert isinstance(compressor, cls)
        assert (compressor.config.scheme, compressor.config.bits) == (name, bits)


def test_horovod_compressors_by_name():
    assert torch_get("fp16") is hvd_torch.Compression.fp16
    assert tf_get("none") is hvd_tf.Compression.none


@pytest.mark.parametrize("get", [torch_get, tf_get])
def test_bad_names_and_options_are_clear_errors(get):
    with pytest.raises(ValueError, match="unknown compressor 'qsgd8'"):
        get("qsgd8")
    with pytest.raises(ValueError, match="takes no options"):
        get("fp16", bits=4)
    with pytest.raises(ValueError, match="bit"):
        get("terngrad", bits=4)
    with pytest.raises(TypeError, match="unknown compressor option"):
        get("topk", density=0.01)
    with pytest.raises(ValueError, match="privacy_spent"):
        get("topk").privacy_spent()
