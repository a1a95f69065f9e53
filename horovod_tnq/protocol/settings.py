"""The settings every rank of a job must share, validated once (no framework imports)."""

import json
import numbers
import zlib

import numpy as np
from dataclasses import dataclass

from ..core import SCHEMES, check_scheme_bits, get_scheme, rotation
from ..core.codec import MAX_BUCKET_SIZE

# The scheme a TNQCompressor uses unless told otherwise: TNQ's truncation and level placement
# applied after a random rotation, where the gradient's distribution is known (core/rotation.py).
# It is unbiased and 3-60x more accurate than the paper's closed form "tnq" at equal bits
# (benchmarks/quality.py), and its errors average away across ranks (rank_averaging.py).
DEFAULT_SCHEME = "tnq-rht"

# How the codes travel (see plan.choose_exchange):
# "allgather": every rank's payload goes to every rank, which decodes and sums them all.
# "reduce-scatter": each rank quantizes one chunk of the tensor per owner rank and an alltoall
#   delivers them; each owner decodes and sums its chunk, quantizes the sum again, and an
#   allgather returns the reduced chunks. Per-rank traffic stays ~2 payloads whatever the number
#   of ranks, like a ring allreduce, at the price of a second quantization (wider: its error
#   stays small against the averaged first) and a second round.
# "hierarchical": on hosts of several ranks, a full-precision sum inside each host, one of the
#   above between hosts on each rank's slice of it, a full-precision allgather inside the host.
EXCHANGES = ("auto", "allgather", "reduce-scatter", "hierarchical")

MAX_SEED = 2**64 - 1  # core.stream_key takes the seed as 64 bits


def scheme_option_names():
    """Every option some registered scheme reads (core Scheme.options), sorted."""
    return sorted({name for scheme in SCHEMES.values() for name in scheme.options})


@dataclass(frozen=True, init=False)
class CompressorConfig:
    """Settings shared by the framework compressors; every rank must use the same ones.

    The general settings are fields; a scheme's own settings (e.g. dqsgd's ``min_bits``,
    dp-binomial's ``dp_clip``) are keyword arguments checked by that scheme (core
    Scheme.options / check_options) and kept, with the scheme's defaults filled in, in
    ``options`` as sorted (name, value) pairs (``scheme_options()`` gives them as a dict).
    """

    bits: int = 4
    scheme: str = DEFAULT_SCHEME
    bucket_size: int = 512
    min_numel: int = 1024
    seed: int = 0
    error_feedback: float = None  # None: the scheme's default (Scheme.error_feedback_default)
    exchange: str = "auto"
    part_elements: int = 1 << 21  # allgather: larger tensors go as several payloads (0: never)
    options: tuple = ()

    def __init__(self, bits=4, scheme=DEFAULT_SCHEME, bucket_size=512, min_numel=1024, seed=0,
                 error_feedback=None, exchange="auto", part_elements=1 << 21, **scheme_options):
        bits, bucket_size, min_numel = (_integer("bits", bits),
                                        _integer("bucket_size", bucket_size),
                                        _integer("min_numel", min_numel))
        seed, part_elements = _integer("seed", seed), _integer("part_elements", part_elements)
        error_feedback = plain_number(error_feedback)
        scheme_options = {name: plain_number(value) for name, value in scheme_options.items()}
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; known: {sorted(SCHEMES)}")
        check_scheme_bits(scheme, bits)
        spec = get_scheme(scheme)
        options = _scheme_options(spec, scheme_options)
        if spec.check_options is not None:
            spec.check_options(bits, **options)
        if error_feedback is None:
            error_feedback = spec.error_feedback_default
        values = dict(bits=bits, scheme=scheme, bucket_size=bucket_size, min_numel=min_numel,
                      seed=seed, error_feedback=error_feedback, exchange=exchange,
                      part_elements=part_elements, options=tuple(sorted(options.items())))
        for name, value in values.items():
            object.__setattr__(self, name, value)
        self._check(spec)

    def _check(self, spec):
        for field in ("bucket_size", "min_numel", "seed", "part_elements"):
            value = getattr(self, field)
            if value < 0:
                raise ValueError(f"{field} must be a non-negative int, got {value!r}")
        if self.seed > MAX_SEED:
            # the random streams take the seed as 64 bits: a larger one would silently equal
            # another seed (2**64 + 1 draws what 1 draws)
            raise ValueError(f"seed must be in [0, 2**64 - 1], got {self.seed}")
        feedback = self.error_feedback
        if isinstance(feedback, bool) or not isinstance(feedback, (int, float)) or \
                not 0.0 <= feedback <= 1.0:
            raise ValueError(f"error_feedback must be a decay factor in [0, 1] (0: off), got "
                             f"{feedback!r}")
        if feedback and spec.refuses_error_feedback:
            raise ValueError(f"error_feedback cannot be used with {spec.name}: "
                             f"{spec.refuses_error_feedback}")
        if not 1 <= self.bucket_size <= MAX_BUCKET_SIZE:
            raise ValueError(f"bucket_size must be in [1, {MAX_BUCKET_SIZE}], got "
                             f"{self.bucket_size}")
        if spec.rotation:
            rotation.check_bucket_size(self.bucket_size)
        if self.exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}, got {self.exchange!r}")
        if self.exchange in ("reduce-scatter", "hierarchical") and spec.body is not None:
            # A scheme with its own payload body would be applied again to the owners' sums:
            # Top-K of a sum of sparse chunks, or a second private release of dp-binomial's
            # noisy codes outside its accounting.
            raise ValueError(f"scheme {self.scheme!r} runs with exchange='allgather' only")

    def scheme_options(self):
        """The scheme's own settings (passed to core.encode), defaults included."""
        return dict(self.options)

    def with_bits(self, bits, exchange=None, error_feedback=None):
        """These settings at another width (and exchange or error feedback, where given;
        checked as any)."""
        general = {name: getattr(self, name) for name in (
            "scheme", "bucket_size", "min_numel", "seed", "part_elements")}
        return CompressorConfig(
            bits=bits, exchange=exchange or self.exchange,
            error_feedback=self.error_feedback if error_feedback is None else error_feedback,
            **general, **self.scheme_options())

    def bits_per_element(self):
        """Codes plus per-bucket parameters, ignoring what each tensor's payload adds once (its
        40-byte header and, for schemes that fit them, 2**bits float32 levels); level-table
        schemes only (core.encoded_size covers the others)."""
        return self.bits + 32.0 * get_scheme(self.scheme).bucket_params / self.bucket_size


def plain_number(value):
    """A numpy scalar (or other numbers.Integral / numbers.Real) as the Python int or float it
    holds; bools and anything else as they are. Settings are compared across ranks and saved
    as JSON, which takes Python numbers only."""
    if isinstance(value, (bool, np.bool_)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _integer(name, value):
    """``value`` of integer setting ``name`` as a Python int: any numbers.Integral (numpy
    integers included) is taken, a bool or anything else is refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _scheme_options(spec, given):
    """The scheme's defaults updated with ``given``; an option no scheme has is a TypeError, one
    of another scheme a ValueError naming who reads it."""
    known = scheme_option_names()
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise TypeError(f"unknown compressor option(s) {unknown}; scheme options: {known}")
    for name in given:
        if name not in spec.options:
            users = [s.name for s in SCHEMES.values() if name in s.options]
            raise ValueError(f"{name} applies to scheme {' / '.join(users)} only, not to "
                             f"{spec.name!r}")
    return {**spec.options, **given}


# The settings as every rank sends them at its first step (fixed size, so one allgather carries
# them all), to name what differs rather than fail later in an exchange that does not pair.
SETTINGS_BYTES = 1024


def settings_text(config, overrides=()):
    """``config`` and the ``overrides`` (TensorSettings.describe()) as JSON bytes of at most
    SETTINGS_BYTES; overrides too long to fit are sent as their checksum."""
    settings = dict(config.__dict__)
    if overrides:
        settings["overrides"] = overrides
        text = json.dumps(settings, sort_keys=True).encode()
        if len(text) <= SETTINGS_BYTES:
            return text
        settings["overrides"] = f"crc32:{zlib.crc32(json.dumps(overrides).encode()):08x}"
    text = json.dumps(settings, sort_keys=True).encode()
    if len(text) > SETTINGS_BYTES:
        raise ValueError(f"compressor settings too long to compare across ranks: {text!r}")
    return text


def settings_differences(config, gathered, overrides=()):
    """What differs between this rank's settings (``config``, ``overrides``) and each rank's
    settings_text() (zero-padded bytes, in rank order): "bits: 3 on rank 1, 4 here; ..." or ""
    when all agree."""
    mine = json.loads(settings_text(config, overrides))
    differences = []
    for rank, raw in enumerate(gathered):
        theirs = json.loads(raw.rstrip(b"\0") or b"{}")
        for name in sorted(set(mine) | set(theirs)):
            if theirs.get(name) != mine.get(name):
                differences.append(f"{name}: {theirs.get(name)!r} on rank {rank}, "
                                   f"{mine.get(name)!r} here")
    return "; ".join(differences)


def settings_buffer(config, overrides=()):
    """settings_text() zero-padded to SETTINGS_BYTES, as a numpy uint8 array: what each rank
    contributes to the first-step allgather of settings."""
    text = settings_text(config, overrides)
    buffer = np.zeros(SETTINGS_BYTES, np.uint8)
    buffer[:len(text)] = np.frombuffer(text, np.uint8)
    return buffer


def check_settings_agree(config, gathered, overrides=()):
    """Raise a ValueError naming what differs if the allgathered settings_buffer()s of every
    rank (``gathered``: uint8, SETTINGS_BYTES per rank) are not all this rank's."""
    rows = np.asarray(gathered, np.uint8).reshape(-1, SETTINGS_BYTES)
    differences = settings_differences(config, [bytes(row) for row in rows], overrides)
    if differences:
        raise ValueError(f"ranks use different compressor settings ({differences}): all "
                         "ranks must use the same compressor settings")
