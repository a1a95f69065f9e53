"""The codec's names in one place, as ``core.codec`` has always offered them: the scheme registry
(schemes.py), the payload format (payload.py), encode (encoder.py) and decode (decoder.py). Code
in the package imports from those modules; this one only gathers them."""

from .decoder import MATCHING_FIELDS, MAX_DECODE_NUMEL, decode, decode_sum, iter_payloads
from .encoder import (SAFE_NORMS, check_encode, encode, encode_rotated, fit_buckets,
                      scan)
from .payload import (AMAX, AMAX_OFFSET, DTYPE_CODES, DTYPE_NAMES, FORMAT_VERSION, HEADER, MAGIC,
                      MAX_BUCKET_SIZE, MAX_EXPONENT, MAX_RUNS_NUMEL, MIN_ZERO_RUN,
                      OVERFLOW_LIMITS, ROTATION, RUN_COUNT, ZERO_RUNS_FLAG, PayloadError,
                      PayloadHeader, Sections, coded_mask, encoded_size, overflow_rule,
                      read_header, shape_tag, split, value_bound)
from .schemes import (SCHEMES, SCHEMES_BY_ID, Body, Scheme, check_scheme_bits, get_scheme,
                      level_table, register_scheme, supports)

__all__ = [
    "AMAX", "AMAX_OFFSET", "DTYPE_CODES", "DTYPE_NAMES", "FORMAT_VERSION", "HEADER", "MAGIC",
    "MATCHING_FIELDS", "MAX_BUCKET_SIZE", "MAX_DECODE_NUMEL", "MAX_EXPONENT", "MAX_RUNS_NUMEL",
    "MIN_ZERO_RUN", "OVERFLOW_LIMITS", "ROTATION", "RUN_COUNT", "SAFE_NORMS", "SCHEMES",
    "SCHEMES_BY_ID", "ZERO_RUNS_FLAG", "Body", "PayloadError", "PayloadHeader", "Scheme",
    "Sections", "check_encode", "check_scheme_bits", "coded_mask", "decode", "decode_sum",
    "encode", "encode_rotated", "encoded_size", "fit_buckets", "get_scheme", "iter_payloads",
    "level_table", "overflow_rule", "read_header", "register_scheme", "scan", "shape_tag",
    "split", "supports", "value_bound",
]
