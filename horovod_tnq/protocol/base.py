"""What the framework compressors share beyond the wire: construction, the default instance,
the state, and each framework's ``get_compressor`` (no framework imports)."""

import itertools
import threading
import warnings

from ..core import SCHEMES
from .overrides import TensorSettings, given_settings
from .settings import CompressorConfig
from .state import CompressorState

HOROVOD_COMPRESSORS = ("none", "fp16")
_INSTANCES = itertools.count()  # (next() on it is atomic under the GIL)


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
        levels). Baselines: "tnq-uniform" (truncated uniform, arXiv 2402.01798), "qsgd",
        "qsgdinf" (Alistarh et al.), "nuqsgd" (Ramezani-Kebrya et al.), "maxmin" (CGX, Bagua
        ByteGrad), "orq" (2+ bits) and "bingrad" (1 bit) (Xu, Huo, Huang, arXiv 2002.11082),
        "terngrad" (2 bits, Wen et al.), "sign" (1 bit). Adaptive: "topk" (adaptive Top-K),
        "dqsgd" (width chosen per step), "dp-binomial" (differential privacy). ``options`` go
        to TNQCompressor (bits, bucket_size, min_numel, seed, error_feedback, exchange,
        part_elements and the scheme's own settings, e.g. dp_clip)."""
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


class DefaultInstanceProperty(DefaultInstanceMethod):
    """A read-only property that, accessed on the class, reads the default instance's."""

    def __get__(self, instance, owner):
        return self.function(owner.default_instance() if instance is None else instance)

    def __set__(self, instance, value):
        raise AttributeError(f"{self.function.__name__} is read-only (reset() clears it)")


class CompressorBase:
    """What the framework compressors share: validated settings (``config``), the per-rank
    ``state`` (state.py), the default instance, repr, and checkpointing.

    The constructor takes CompressorConfig's arguments and ``overrides``: per-tensor settings
    by name pattern (overrides.py); ``settings.for_name(name)`` resolves them."""

    _defaults_lock = threading.Lock()

    def __init__(self, *args, overrides=None, **settings):
        self.config = CompressorConfig(*args, **settings)
        self.settings = TensorSettings(self.config, overrides, given_settings(args, settings))
        self.state = CompressorState(self.config, self.settings.describe())
        # compressors made in this process, in order (the same on every rank): names the
        # collective of their first-use settings check
        self._instance = next(_INSTANCES)

    @classmethod
    def default_instance(cls):
        with cls._defaults_lock:
            if cls.__dict__.get("_default") is None:
                cls._default = cls()
            return cls._default

    def __repr__(self):
        settings = {k: v for k, v in self.config.__dict__.items() if k != "options"}
        settings.update(self.config.scheme_options())
        if self.settings.rules:
            settings["overrides"] = dict(self.settings.describe())
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in settings.items())})"

    def config_for(self, name, names=None):
        """The settings of tensor ``name`` (``overrides``; None: send it uncompressed);
        ``names``, all the tensors its optimizer reduces, are checked against the patterns
        once."""
        if names:
            self.settings.check_names(names)
        return self.settings.for_name(name)

    @DefaultInstanceMethod
    def metrics(self):
        """What this rank's compressor did, the one accounting API: ``{"last_step": ...,
        "total": ..., "tensors": {name: ...}, "counters": ...}``. The first three hold bytes
        handed to Horovod (compressed payloads and pass-through), bits per element,
        encode/decode seconds and the estimated relative quantization error
        (protocol/metrics.py says how each is measured); log_metrics() writes them to
        TensorBoard. ``counters`` (what ``stats`` gave, state.new_stats lists them) counts
        since the start or the last reset(): tensors compressed and passed through, their
        payload and pass-through bytes and compressed elements, and the exchanges each kind
        ran ("allgather", "reduce-scatter", "hierarchical")."""
        summary = self.state.metrics.summary()
        summary["counters"] = self.state.counters()
        return summary

    @DefaultInstanceProperty
    def stats(self):
        """Deprecated: ``metrics()["counters"]`` (this is the live dict, as before)."""
        warnings.warn('compressor.stats is deprecated and will be removed in the next release: '
                      'use compressor.metrics()["counters"]', DeprecationWarning, stacklevel=3)
        return self.state.stats

    def state_dict(self):
        """Per-rank state to checkpoint with the model: each tensor's step count (which seeds its
        rounding), error-feedback residuals and privacy accounting, so a restored run continues
        exactly. Residuals are numpy arrays (torch tensors in the PyTorch adapter)."""
        return self.state.state_dict(*self._world())

    def load_state_dict(self, state, any_rank=False):
        """Restore a state_dict() of this rank (CompressorState.load_state_dict says what is
        refused). One checkpoint file for all ranks, saved by rank 0: pass ``any_rank=True`` to
        take its steps on every rank (each rank's error-feedback residuals then start afresh);
        to resume exactly, save and load one compressor state per rank."""
        self.state.load_state_dict(state, *self._world(), any_rank=any_rank)

    def _world(self):
        """(rank, size) of this process in Horovod (the adapters ask Horovod), or (None, None)
        before hvd.init()."""
        return None, None

    @DefaultInstanceMethod
    def reset(self):
        """Forget the per-rank state (names in flight, steps, residuals, accounting), as a new
        compressor would start. Elastic Horovod: register it as a reset callback of the elastic
        state, so that every rank, newcomers included, names and counts alike after workers join
        or leave (docs/design.md#elastic-horovod). In TensorFlow, also create the step's
        tf.function anew: a graph traced before the reset refuses to run."""
        self.state.reset()
        self.settings.reset()

    def privacy_spent(self):
        """See CompressorState.privacy_spent."""
        return self.state.privacy_spent()
