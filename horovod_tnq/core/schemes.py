"""The scheme registry: what each scheme is (Scheme), its level tables, and whether it runs at a
number of bits. The payload format is payload.py's; encoder.py and decoder.py code the schemes.

Every scheme belongs to one of three families (Scheme.family), which encoder.py and decoder.py
each handle with one function:
* "table": one level table per bucket, scaled by a bucket statistic (fixed tables) or fitted to
  the data (``fit``); ``choose_bits`` may pick each payload's bits (dynamic.py);
* "rotated": each bucket rotated first (rotation.py), then rounded to the nearest level of a
  table for unit RMS, with EDEN's scale (tnq-rht);
* "body": a payload body of the scheme's own after the header and the non-finite exceptions
  (Scheme.body: adaptive Top-K, TNQ-sparse, binomial DP), registered by core/__init__.py.
"""

from dataclasses import dataclass, field

from .fitting import bingrad_fit, maxmin_fit, orq_fit, tnq_opt_fit
from .levels import (binary_levels, check_bits, gaussian_levels, maxmin_levels, nuqsgd_levels,
                     orq_levels, qsgd_levels, sign_levels, ternary_levels, tnq_levels,
                     uniform_levels)


@dataclass(frozen=True)
class Body:
    """How a scheme of the "body" family lays out its payload body (after the 40-byte header
    and the non-finite exceptions): the five functions the codec calls.

    check_bits(bits): raises a ValueError where the scheme cannot run at ``bits``;
    encode(finite, *, bits, key, step, **options): the body (uint8) of the finite values;
    size(buf, at, header): the validated size of the body at ``at`` of ``buf``;
    decode(body, header): the decoded values (float64) of the payload's elements;
    max_size(numel, bits, **options): the largest body a payload of ``numel`` elements has.
    """

    check_bits: object
    encode: object
    size: object
    decode: object
    max_size: object


@dataclass(frozen=True, eq=False)  # one object per scheme: compared by identity
class Scheme:
    """How a tensor is quantized: per bucket, value = offset + scale * level, the levels a sorted
    table of at most 2**bits entries for unit scale, rounded stochastically (unbiased between
    adjacent levels) or, with ``rounding="nearest"``, to the nearest level.

    Fixed-table schemes take the scale from a bucket ``statistic`` (quantize.bucket_statistic),
    searched further with ``fit_scale``. Data-fitted schemes compute table and parameters with
    ``fit(flat, bucket_size, bits) -> fitting.BucketFit``; they store ``bucket_params`` floats
    per bucket (1: scale, 2: scale and offset) and, with ``sends_levels``, the fitted table.

    Schemes that are not one level table per bucket plug in through ``body`` (a Body),
    ``choose_bits`` and ``options`` (registered by core/__init__.py from core/topk.py,
    tnq_sparse.py, dynamic.py, privacy.py): choose_bits picks each payload's bits (at most the
    configured ones) from the data; options: the scheme's own settings, name -> default (users
    pass them to the compressor; encode receives them), checked by
    ``check_options(bits, **options)``.

    Error feedback (the protocol layer's): ``error_feedback_default`` is the decay a compressor
    uses unless told otherwise (1.0 for schemes that leave entries out, whose mass would
    otherwise be lost for good); ``refuses_error_feedback`` says why a scheme cannot have it.

    With ``rotation`` each bucket is rotated (rotation.py) before it is rounded to the nearest
    level of a table for unit RMS, and its scale is then EDEN's correction
    (encoder.encode_rotated).
    """

    name: str
    scheme_id: int
    level_table: object  # bits -> float32 table (for fitted tables: the starting one)
    statistic: object    # name of the bucket statistic, or None for data-fitted schemes
    reference: str
    fit_scale: bool = False  # search the scale on the data (quantize.fit_scales)
    fit: object = None       # data-fitted schemes: see fitting.py
    bucket_params: int = 1
    sends_levels: bool = False
    rounding: str = "stochastic"
    body: Body = None
    choose_bits: object = None
    options: dict = field(default_factory=dict)
    check_options: object = None
    error_feedback_default: float = 0.0
    refuses_error_feedback: str = None
    rotation: bool = False  # buckets rotated first (rotation.py); nearest rounding, EDEN scale

    @property
    def family(self):
        """"body", "rotated" or "table" (module docstring)."""
        return "body" if self.body is not None else "rotated" if self.rotation else "table"

    def levels_sent(self, bits):
        return 1 << bits if self.sends_levels else 0


SCHEMES = {
    scheme.name: scheme
    for scheme in (
        Scheme("tnq-rht", 24, gaussian_levels, "l2",
               "TNQ's optimal truncation and levels for the Gaussian that a random Hadamard "
               "rotation makes of any gradient; EDEN's unbiasing scale (Vargaftik et al., "
               "ICML 2022)", rounding="nearest", rotation=True),
        Scheme("tnq", 1, tnq_levels, "mean_abs",
               "Yan et al., Truncated Non-uniform Quantization, arXiv 2402.01160"),
        Scheme("tnq-fit", 8, tnq_levels, "mean_abs",
               "TNQ's levels with the threshold fitted per bucket to the observed values",
               fit_scale=True),
        Scheme("tnq-opt", 16, tnq_levels, None,
               "TNQ's E_TQ minimised over the level table on the observed values (fitting.py)",
               fit=tnq_opt_fit, sends_levels=True),
        Scheme("tnq-uniform", 2, uniform_levels, "mean_abs",
               "truncated uniform levels (Yan et al., arXiv 2402.01798), Laplace threshold"),
        Scheme("qsgd", 3, qsgd_levels, "l2", "Alistarh et al., QSGD, NeurIPS 2017"),
        Scheme("qsgdinf", 4, qsgd_levels, "max_abs", "QSGD scaled by max |x| (QSGDinf)"),
        Scheme("nuqsgd", 5, nuqsgd_levels, "l2", "Ramezani-Kebrya et al., NUQSGD, JMLR 2021"),
        Scheme("maxmin", 17, maxmin_levels, None,
               "bucketed MaxMin: CGX (IST-DASLab Horovod fork), Bagua ByteGrad",
               fit=maxmin_fit, bucket_params=2),
        Scheme("orq", 18, orq_levels, None,
               "Xu, Huo, Huang, ORQ, arXiv 2002.11082", fit=orq_fit, sends_levels=True),
        Scheme("bingrad", 19, binary_levels, None,
               "Xu, Huo, Huang, BinGrad, arXiv 2002.11082", fit=bingrad_fit, bucket_params=2,
               rounding="nearest"),
        Scheme("terngrad", 6, ternary_levels, "max_abs", "Wen et al., TernGrad, NeurIPS 2017"),
        Scheme("sign", 7, sign_levels, "max_abs", "stochastic 1-bit sign, max |x| scaled"),
    )
}
SCHEMES_BY_ID = {scheme.scheme_id: scheme for scheme in SCHEMES.values()}
assert len(SCHEMES_BY_ID) == len(SCHEMES), "scheme ids must be unique"


def register_scheme(scheme):
    """Add a scheme to the registry (get_compressor, payload decoding) under its name and id."""
    if scheme.name in SCHEMES or scheme.scheme_id in SCHEMES_BY_ID:
        raise ValueError(f"scheme name {scheme.name!r} or id {scheme.scheme_id} already taken")
    SCHEMES[scheme.name] = scheme
    SCHEMES_BY_ID[scheme.scheme_id] = scheme


_TABLES = {}


def level_table(scheme_id, bits):
    key = (scheme_id, bits)
    if key not in _TABLES:
        _TABLES[key] = SCHEMES_BY_ID[scheme_id].level_table(bits)
    return _TABLES[key]


def get_scheme(name):
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown scheme {name!r}; known: {sorted(SCHEMES)}") from None


def check_scheme_bits(name, bits):
    """Raise a ValueError naming the problem if ``name`` cannot run at ``bits``."""
    scheme = get_scheme(name)
    if scheme.body is not None:
        scheme.body.check_bits(bits)
        return
    level_table(scheme.scheme_id, check_bits(bits))  # raises where the scheme has no table


def supports(name, bits):
    """Whether scheme ``name`` runs at ``bits`` bits per element."""
    try:
        check_scheme_bits(name, bits)
    except ValueError:
        return False
    return True
