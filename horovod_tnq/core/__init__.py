"""Framework-free core of horovod_tnq: statistics, thresholds, levels, quantization, packing.

Imports numpy only; the PyTorch and TensorFlow adapters build on it.
"""

from . import codec  # noqa: F401  (core.codec: the codec's names gathered in one module)
from .decoder import decode, decode_sum, iter_payloads
from .encoder import encode
from .payload import DTYPE_CODES, HEADER, PayloadError, PayloadHeader, encoded_size, read_header, \
    shape_tag
from .schemes import SCHEMES, check_scheme_bits, get_scheme, register_scheme, supports
from .error_estimate import estimate_error
from .levels import (LAPLACE_C, MAX_BITS, MIN_BITS, check_bits, laplace_error_bound,
                     laplace_truncation_threshold, maxmin_levels, tnq_levels, uniform_levels,
                     uniform_truncation_threshold)
from .packing import pack_bits, packed_size, unpack_bits
from .quantize import bucket_statistic, mean_abs_per_bucket, stochastic_round
from .rng import key_words, stream_key, uniform_noise

# Schemes beyond "one level table per bucket", each in its own module, registered here so that
# schemes.py needs no import of them.
from . import dynamic, privacy, tnq_sparse, topk  # noqa: E402

for _module in (topk, tnq_sparse, dynamic, privacy):
    register_scheme(_module.SCHEME)

__all__ = [
    "DTYPE_CODES", "HEADER", "LAPLACE_C", "MAX_BITS", "MIN_BITS", "SCHEMES", "PayloadError",
    "PayloadHeader", "bucket_statistic", "check_bits",
    "check_scheme_bits", "decode", "decode_sum", "encode", "encoded_size", "estimate_error",
    "get_scheme", "iter_payloads", "key_words", "laplace_error_bound",
    "laplace_truncation_threshold", "maxmin_levels", "mean_abs_per_bucket", "pack_bits",
    "packed_size",
    "read_header", "shape_tag", "supports",
    "stochastic_round", "stream_key", "tnq_levels", "uniform_levels", "uniform_noise",
    "uniform_truncation_threshold", "unpack_bits",
]
