"""The exchange protocol shared by the PyTorch and TensorFlow compressors (no framework imports).

Stock Horovod hands ``compress(tensor)`` to an *allreduce*, but packed codes cannot be summed.
So each compressor, inside the stock interface:

1. encodes the gradient and starts an allgather of the payload under a name derived from the
   name Horovod gives the allreduce, so every rank pairs the same tensors;
2. returns a two-element *probe* instead of the gradient; Horovod allreduces the probe with the
   caller's op, prescale and postscale factors;
3. in ``decompress(probe, ctx)`` waits for the allgather, decodes and sums every rank's payload,
   and scales the sum by what the probe reveals (see ``reduction_scale``).

The probe makes op=Average, op=Sum, ``gradient_predivide_factor`` and pre/postscale factors
come out exactly as Horovod applies them to an uncompressed tensor.
"""

import sys
import threading
from dataclasses import dataclass
from typing import Any

from .core import SCHEMES, check_scheme_bits, dynamic, get_scheme, privacy, rotation

# How the codes travel (see choose_exchange):
# "allgather": every rank's payload goes to every rank, which decodes and sums them all.
# "reduce-scatter": each rank quantizes one chunk of the tensor per owner rank and an alltoall
#   delivers them; each owner decodes and sums its chunk, quantizes the sum again, and an
#   allgather returns the reduced chunks. Per-rank traffic stays ~2 payloads whatever the number
#   of ranks, like a ring allreduce, at the price of a second quantization and a second round.
EXCHANGES = ("auto", "allgather", "reduce-scatter")

# Schemes that leave entries out: without error feedback that mass is lost for good, so they
# turn it on unless told otherwise (error_feedback=None).
FEEDBACK_BY_DEFAULT = ("topk", "tnq-sparse")

# The scheme a TNQCompressor uses unless told otherwise: TNQ's truncation and level placement
# applied after a random rotation, where the gradient's distribution is known (core/rotation.py).
# It is unbiased and 3-60x more accurate than the paper's closed form "tnq" at equal bits
# (benchmarks/quality.py), and its errors average away across ranks (rank_averaging.py).
DEFAULT_SCHEME = "tnq-rht"


@dataclass(frozen=True)
class CompressorConfig:
    """Settings shared by the framework compressors; every rank must use the same ones."""

    bits: int = 4
    scheme: str = DEFAULT_SCHEME
    bucket_size: int = 512
    min_numel: int = 1024
    seed: int = 0
    error_feedback: float = None  # None: on (1.0) for FEEDBACK_BY_DEFAULT schemes, else 0
    exchange: str = "auto"
    part_elements: int = 1 << 21  # allgather: larger tensors go as several payloads (0: never)
    # settings read by one scheme each (core Scheme.options); others must keep their defaults
    min_bits: int = dynamic.DEFAULT_MIN_BITS          # dqsgd: narrowest width
    nmse_target: float = dynamic.DEFAULT_NMSE_TARGET  # dqsgd: E||Q(g)-g||^2 / ||g||^2 allowed
    dp_clip: float = None                             # dp-binomial: elements clipped to +-dp_clip
    dp_epsilon: float = privacy.DEFAULT_EPSILON       # dp-binomial: epsilon per release
    dp_delta: float = privacy.DEFAULT_DELTA           # dp-binomial: delta per release
    dp_sensitivity: float = None                      # dp-binomial: l2 sensitivity of a gradient

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {self.scheme!r}; known: {sorted(SCHEMES)}")
        check_scheme_bits(self.scheme, self.bits)
        if self.error_feedback is None:
            object.__setattr__(self, "error_feedback",
                               1.0 if self.scheme in FEEDBACK_BY_DEFAULT else 0.0)
        self._check_scheme_options()
        for field in ("bucket_size", "min_numel", "seed", "part_elements"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{field} must be a non-negative int, got {value!r}")
        feedback = self.error_feedback
        if isinstance(feedback, bool) or not isinstance(feedback, (int, float)) or \
                not 0.0 <= feedback <= 1.0:
            raise ValueError(f"error_feedback must be a decay factor in [0, 1] (0: off), got "
                             f"{feedback!r}")
        if not 1 <= self.bucket_size < 2**32:
            raise ValueError(f"bucket_size must be in [1, 2**32), got {self.bucket_size}")
        if get_scheme(self.scheme).rotation:
            rotation.check_bucket_size(self.bucket_size)
        if self.exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}, got {self.exchange!r}")
        if self.exchange == "reduce-scatter" and get_scheme(self.scheme).body is not None:
            # A scheme with its own payload body would be applied again to the owners' sums:
            # Top-K of a sum of sparse chunks, or a second private release of dp-binomial's
            # noisy codes outside its accounting.
            raise ValueError(f"scheme {self.scheme!r} runs with exchange='allgather' only")

    def _check_scheme_options(self):
        mine = get_scheme(self.scheme).options
        for option in SCHEME_OPTIONS:
            default = CompressorConfig.__dataclass_fields__[option].default
            if option not in mine and getattr(self, option) != default:
                users = [name for name, scheme in SCHEMES.items() if option in scheme.options]
                raise ValueError(f"{option} applies to scheme {' / '.join(users)} only, not to "
                                 f"{self.scheme!r}")
        if self.scheme == "dqsgd":
            dynamic.check_options(self.bits, self.min_bits, self.nmse_target)
        if self.scheme == "dp-binomial":
            privacy.check_options(self.bits, self.dp_clip, self.dp_epsilon, self.dp_delta,
                                  self.dp_sensitivity)
            if self.error_feedback:
                raise ValueError("error_feedback cannot be used with dp-binomial: the residual "
                                 "would carry the private gradient into later releases, "
                                 "outside the privacy accounting")

    def scheme_options(self):
        """The settings this config's scheme reads (passed to core.encode)."""
        return {option: getattr(self, option) for option in get_scheme(self.scheme).options}

    def bits_per_element(self):
        """Codes plus per-bucket parameters, ignoring what each tensor's payload adds once (its
        32-byte header and, for schemes that fit them, 2**bits float32 levels); level-table
        schemes only (core.encoded_size covers the others)."""
        return self.bits + 32.0 * get_scheme(self.scheme).bucket_params / self.bucket_size


def choose_exchange(config, numel, size):
    """The exchange for a tensor of ``numel`` elements among ``size`` ranks.

    Per rank and tensor, with P the bytes of one full payload, the allgather sends and receives
    (size - 1) P, the reduce-scatter about 2 (size - 1) / size P plus a header per chunk. So
    with 2 ranks they move the same bytes and the allgather wins (one round, one quantization);
    from 3 ranks on the reduce-scatter moves fewer, and "auto" takes it for every tensor big
    enough that each rank owns at least one full bucket. All ranks see the same arguments, so
    they all choose the same.
    """
    if config.exchange != "auto":
        return config.exchange
    if get_scheme(config.scheme).body is not None:
        return "allgather"  # see CompressorConfig: such schemes do not re-quantize sums
    if size >= 3 and numel >= size * config.bucket_size:
        return "reduce-scatter"
    return "allgather"


# Names of a tensor's payloads, appended to its base name: they key the random stream and the
# error-feedback residual of each part, so no two parts share either.
WHOLE = ""  # the whole tensor (allgather exchange)
REDUCED = "#reduced"  # an owner's reduced chunk (second round of the reduce-scatter)


def part_names(kind, bounds):
    """The name of each payload of a tensor: its parts in the allgather exchange (the whole tensor
    when there is one), its owners' chunks in the reduce-scatter."""
    if kind == "allgather":
        return [WHOLE] if len(bounds) == 1 else [f"#p{index}" for index in range(len(bounds))]
    return [f"#{owner}" for owner in range(len(bounds))]


def part_bounds(numel, part_elements, bucket_size):
    """(start, stop) of each payload of a tensor in the allgather exchange: one for tensors of at
    most ``part_elements`` elements (or when it is 0), else consecutive parts of that many
    elements rounded down to whole buckets (at least one). Each part is encoded and sent on its
    own as soon as it is encoded, and decoded as soon as it arrives, so encoding, transfer and
    decoding of a large tensor overlap instead of following each other."""
    if not part_elements or numel <= part_elements:
        return [(0, numel)]
    step = max(part_elements // bucket_size, 1) * bucket_size
    return [(start, min(start + step, numel)) for start in range(0, numel, step)]


def chunk_bounds(numel, size, bucket_size):
    """(start, stop) of the chunk each rank owns in the reduce-scatter: whole buckets, as even
    as possible, in rank order (the last may be short or empty)."""
    buckets = -(-numel // bucket_size)
    bounds = []
    for rank in range(size):
        first, last = buckets * rank // size, buckets * (rank + 1) // size
        bounds.append((min(first * bucket_size, numel), min(last * bucket_size, numel)))
    return bounds


@dataclass(eq=False)  # compared by identity: contexts in flight are kept in a list
class Pending:
    """compress()'s context for decompress(): the collective in flight (a Horovod handle in
    PyTorch, the gathered tensor in TF) and what this rank sent."""

    exchange: Any
    header: Any
    base_name: str
    shape: Any
    dtype: Any
    process_set: Any
    device: Any = None
    kind: str = "allgather"  # or "reduce-scatter"
    bounds: Any = None  # reduce-scatter: chunk_bounds(...)
    collective_name: str = ""
    step: int = 0
    second_round: Any = None  # reduce-scatter: the allgather of the reduced chunks


SCHEME_OPTIONS = ("min_bits", "nmse_target", "dp_clip", "dp_epsilon", "dp_delta",
                  "dp_sensitivity")
HOROVOD_COMPRESSORS = ("none", "fp16")


def compressor_registry(quantizer_class, horovod_compression):
    """Each framework's get_compressor(): "none" and "fp16" are Horovod's own compressors
    (``horovod_compression``), any name in core.SCHEMES is ``quantizer_class(scheme=name,
    **options)``."""

    def get_compressor(name, **options):
        """A Horovod compressor by name: any scheme of horovod_tnq.core.SCHEMES, or Horovod's own
        "none" / "fp16".

        TNQ: "tnq-rht" (the default TNQCompressor: a random Hadamard rotation, then the levels
        and threshold that are optimal for the Gaussian it makes), "tnq" (the paper's closed
        form for a Laplace model), "tnq-fit" (threshold fitted per bucket), "tnq-opt" (level
        table fitted to each tensor), "tnq-sparse" (the largest entries on fitted non-uniform
        levels). Baselines: "tnq-uniform" (truncated
        uniform, arXiv 2402.01798), "qsgd", "qsgdinf" (Alistarh et al.), "nuqsgd"
        (Ramezani-Kebrya et al.), "maxmin" (CGX, Bagua ByteGrad), "orq" (2+ bits) and "bingrad"
        (1 bit) (Xu, Huo, Huang, arXiv 2002.11082), "terngrad" (2 bits, Wen et al.), "sign"
        (1 bit). Adaptive: "topk" (adaptive Top-K), "dqsgd" (width chosen per step),
        "dp-binomial" (differential privacy). ``options`` go to TNQCompressor (bits,
        bucket_size, min_numel, seed, error_feedback, exchange, part_elements and the scheme's
        own settings, e.g. dp_clip)."""
        if name in HOROVOD_COMPRESSORS:
            if options:
                raise ValueError(f"Horovod's {name!r} compressor takes no options, got "
                                 f"{options}")
            return getattr(horovod_compression, name)
        if name not in SCHEMES:
            raise ValueError(f"unknown compressor {name!r}; known: "
                             f"{sorted(HOROVOD_COMPRESSORS + tuple(SCHEMES))}")
        return quantizer_class(scheme=name, **options)

    return get_compressor


# Functions of stock Horovod that call compress(); each holds the collective's name in a local
# variable ``name`` and its process set in ``process_set`` or ``self.process_set``.
_HOROVOD_CALLERS = {
    "_allreduce_grad_async", "_grouped_allreduce_grad_async", "allreduce", "grouped_allreduce",
    "_allreduce_cond", "_grouped_allreduce_cond", "allreduce_grads",
}


def horovod_call_site(max_depth=12):
    """(name, process_set) of the Horovod collective that called compress(), or (None, None).

    Stock Horovod does not pass the name to compress(); reading it from the calling frame is what
    lets the allgather be named like the allreduce it accompanies, so ranks that reach their
    tensors in different orders still pair them correctly. Inside tf.function, AutoGraph runs
    converted copies of Horovod's functions (``tf__allreduce``) a few frames further up. Tested
    against Horovod 0.28.1; when nothing is found the caller falls back to Horovod's own
    convention (the graph tensor name in TF graphs, a sequence number otherwise), and payload
    headers still catch mismatched shapes.
    """
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            break
        module = frame.f_globals.get("__name__", "")
        function = frame.f_code.co_name
        if function.startswith("tf__"):
            function = function[len("tf__"):]
        if module.startswith("horovod.") and function in _HOROVOD_CALLERS:
            local = frame.f_locals
            process_set = local.get("process_set")
            owner = local.get("self")
            if process_set is None and owner is not None:
                process_set = getattr(owner, "process_set", None)
            name = local.get("name")
            return (name if isinstance(name, str) and name else None), process_set
        frame = frame.f_back
    return None, None


class CollectiveNamer:
    """Names allgathers uniquely among those in flight, identically on every rank.

    A grouped allreduce compresses several tensors under one Horovod name, so each gets the index
    of its turn among the tensors of that name still in flight; names then repeat from step to
    step (Horovod's response cache stays useful). ``step`` counts a name's uses and feeds the
    random stream, so every step draws fresh noise.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._in_flight = {}
        self._uses = {}
        self._anonymous = 0

    def state_dict(self):
        return {"uses": dict(self._uses), "anonymous": self._anonymous}

    def load_state_dict(self, state):
        with self._lock:
            self._uses = dict(state["uses"])
            self._anonymous = int(state["anonymous"])

    def acquire(self, name):
        with self._lock:
            if name is None:
                name = f"noname.{self._anonymous}"
                self._anonymous += 1
            index = self._in_flight.get(name, 0)
            self._in_flight[name] = index + 1
            step = self._uses.get(name, 0)
            self._uses[name] = step + 1
            return name, f"tnq.{name}.{index}", step

    def release(self, name):
        with self._lock:
            left = self._in_flight.get(name, 0) - 1
            if left > 0:
                self._in_flight[name] = left
            else:
                self._in_flight.pop(name, None)


# The probe's third element: which exchange this rank started for the tensor.
EXCHANGE_CODES = {"allgather": 1.0, "reduce-scatter": 2.0}


def probe_values(rank, kind="allgather"):
    """What each rank contributes to the probe allreduce."""
    return [1.0, float(rank + 1), EXCHANGE_CODES[kind]]


UNSUPPORTED_OP = "horovod_tnq compressors support op=Average and op=Sum only"
PROBE_TOLERANCE = 1e-3


def reduction_scale(probe, size, kind="allgather"):
    """Factor to multiply the *sum* of decoded payloads by, from the allreduced probe.

    Horovod returns postscale * reduce(prescale * probe). With probe = [1, rank + 1, c]:
    op=Sum gives k * [N, N (N + 1) / 2, N c] and op=Average k * [1, (N + 1) / 2, c], with k the
    product of the scale factors. Both have ratio (N + 1) / 2, and probe[0] / N is k / N for
    Average and k for Sum: exactly the factor Horovod would apply to the summed gradients. Min,
    Max, Product and Adasum give other ratios (for N > 1) and are refused.

    The third element checks that every rank started the same exchange (c its code): ranks
    configured differently could otherwise wait forever, one in an allgather and another in an
    alltoall, which Horovod sees as two unrelated collectives. The probe's allreduce completes
    either way, so this raises on every rank before any waits for its exchange.
    """
    first, second, third = (float(value) for value in probe)
    expected_ratio = (size + 1) / 2.0
    if size > 1 and (first == 0 or
                     abs(second / first - expected_ratio) > PROBE_TOLERANCE * expected_ratio):
        raise ValueError(f"{UNSUPPORTED_OP} (the allreduced probe {[first, second]} matches "
                         f"neither for {size} ranks)")
    code = EXCHANGE_CODES[kind]
    if abs(third / first - code) > PROBE_TOLERANCE * code:
        raise ValueError(f"ranks started different exchanges for this tensor (this rank: {kind}; "
                         f"mean exchange code {third / first:.3f} across ranks, "
                         f"{EXCHANGE_CODES}): all ranks must use the same compressor settings")
    return first / size


class DefaultInstanceMethod:
    """Lets a compressor class itself be passed as ``compression=TNQCompressor``, as with
    Horovod's own compressors: accessed on the class, the method binds to one lazily made
    default instance (``owner.default_instance()``)."""

    def __init__(self, function):
        self.function = function

    def __get__(self, instance, owner):
        if instance is None:
            instance = owner.default_instance()
        return self.function.__get__(instance, owner)


class DefaultInstanceMixin:
    _defaults_lock = threading.Lock()

    @classmethod
    def default_instance(cls):
        with cls._defaults_lock:
            if cls.__dict__.get("_default") is None:
                cls._default = cls()
            return cls._default


class CompressorBase(DefaultInstanceMixin):
    """What the framework compressors share: validated settings, collective naming, repr and
    the settings check of a checkpoint."""

    def __init__(self, bits=4, scheme=DEFAULT_SCHEME, bucket_size=512, min_numel=1024, seed=0,
                 error_feedback=None, exchange="auto", part_elements=1 << 21,
                 **scheme_options):
        unknown = set(scheme_options) - set(SCHEME_OPTIONS)
        if unknown:
            raise TypeError(f"unknown compressor option(s) {sorted(unknown)}; scheme options: "
                            f"{list(SCHEME_OPTIONS)}")
        self.config = CompressorConfig(bits=bits, scheme=scheme, bucket_size=bucket_size,
                                       min_numel=min_numel, seed=seed,
                                       error_feedback=error_feedback, exchange=exchange,
                                       part_elements=part_elements, **scheme_options)
        self._namer = CollectiveNamer()
        self._released = {}  # tensor name -> element count, for the privacy accounting

    def __repr__(self):
        settings = ", ".join(f"{k}={v!r}" for k, v in self.config.__dict__.items())
        return f"{type(self).__name__}({settings})"

    def _check_checkpoint(self, state):
        if state["config"] != self.config.__dict__:
            raise ValueError(f"checkpoint was saved with compressor settings {state['config']}, "
                             f"this compressor has {self.config.__dict__}")
        self._namer.load_state_dict(state["namer"])
        self._released = dict(state.get("released", {}))

    def _note_release(self, base_name, numel):
        if self.config.scheme == "dp-binomial":
            self._released[base_name] = int(numel)

    def privacy_spent(self):
        """The (epsilon, delta) this rank's dp-binomial payloads have spent so far, per step and
        composed over the steps (core/privacy.py documents the accounting)."""
        if self.config.scheme != "dp-binomial":
            raise ValueError(f"privacy_spent() needs scheme 'dp-binomial', this compressor uses "
                             f"{self.config.scheme!r}")
        steps = max((self._steps_of(name) for name in self._released), default=0)
        options = self.config.scheme_options()
        return privacy.account(list(self._released.values()), steps, self.config.bits,
                               **options)

    def _steps_of(self, name):
        return self._namer.state_dict()["uses"].get(name, 0)


def new_stats():
    """Counters a compressor keeps: what it handed to Horovod, to report bytes on the wire."""
    return {"compressed_tensors": 0, "passthrough_tensors": 0, "payload_bytes": 0,
            "passthrough_bytes": 0, "elements": 0, "allgather": 0, "reduce-scatter": 0}
