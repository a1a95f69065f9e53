"""Per-tensor settings chosen by parameter name (no framework imports).

Real models mix tensors that compress well (large dense matrices) with tensors that should go
uncompressed or with more bits (embeddings with rare rows, normalisation scales, the output
layer); CGX (IST-DASLab's Horovod fork) lets users set bits per layer by module-name pattern for
that reason. Here a compressor takes ``overrides``: an ordered mapping from glob patterns
(``fnmatch``, matched against the names Horovod's optimizers use: ``named_parameters`` names
in PyTorch, variable names in TensorFlow) to the settings that differ for matching tensors, or
to None to send them uncompressed. The first matching pattern wins; unmatched tensors keep the
compressor's own settings.

The overrides join the first-step agreement of the compressor's settings, and each payload's
header carries the scheme, bits and bucket it was made with, so ranks configured differently get
an error instead of collectives that never pair. Tensor names must be the same on every rank:
a tensor resolved differently on two ranks is caught by its header or probe, but in TensorFlow
graphs a different ``part_elements`` or ``exchange`` still waits as Horovod would.
"""

import fnmatch
import inspect
import warnings

from ..core import SCHEMES
from .settings import CompressorConfig

# Settings that may differ per tensor: all but the seed (one random stream per job, keyed by
# each payload's name anyway) and the scheme options, which are checked by the scheme.
TENSOR_SETTINGS = ("bits", "scheme", "bucket_size", "min_numel", "error_feedback", "exchange",
                   "part_elements")
# dp-binomial's privacy accounting composes one setting's releases over the steps
# (core/privacy.py); tensors released with other settings would fall outside it.
_ONE_SETTING_SCHEMES = ("dp-binomial",)
_CONFIG_ARGUMENTS = inspect.signature(CompressorConfig.__init__)


class TensorSettings:
    """A compressor's settings for each tensor: ``config`` unless a pattern of ``overrides``
    matches the tensor's name. ``given``: the arguments the compressor was made with (an
    override inherits them, and the scheme's defaults where it changes the scheme)."""

    def __init__(self, config, overrides=None, given=None):
        self.config = config
        self.rules = _rules(config, overrides, given or {})
        self._resolved = {}
        self._checked_names = False

    def for_name(self, name):
        """The CompressorConfig for tensor ``name`` (None or unnamed: the compressor's own), or
        None when it goes uncompressed."""
        if name is None or not self.rules:
            return self.config
        if name not in self._resolved:
            for pattern, config in self.rules:
                if fnmatch.fnmatchcase(name, pattern):
                    self._resolved[name] = config
                    break
            else:
                self._resolved[name] = self.config
        return self._resolved[name]

    def may_use(self, exchange):
        """Whether some tensor may take ``exchange`` ("hierarchical": also through "auto"): the
        compressor's settings or an override's (schemes with a payload body of their own,
        which take the allgather only, never the hierarchical one). Every rank answers
        alike."""
        configs = [self.config] + [config for _, config in self.rules if config is not None]
        accepted = (exchange, "auto") if exchange == "hierarchical" else (exchange,)
        return any(config.exchange in accepted and
                   (exchange != "hierarchical" or SCHEMES[config.scheme].body is None)
                   for config in configs)

    def resolved(self):
        """{tensor name: its CompressorConfig, or None when sent uncompressed} for every name
        resolved so far: to see what the patterns chose."""
        return dict(self._resolved)

    def check_names(self, names):
        """Warn once about patterns that match none of ``names`` (all the tensors an optimizer
        reduces, seen at its first step): a typo would otherwise silently leave the layer at
        the default settings."""
        if self._checked_names or not self.rules:
            return
        self._checked_names = True
        names = list(names)
        unmatched = [pattern for pattern, _ in self.rules
                     if not any(fnmatch.fnmatchcase(name, pattern) for name in names)]
        if unmatched:
            sample = ", ".join(repr(name) for name in names[:5])
            warnings.warn(f"compressor overrides {unmatched} match no tensor name (names look "
                          f"like {sample}{', ...' if len(names) > 5 else ''})", stacklevel=3)

    def describe(self):
        """The overrides as plain values, for the ranks' settings agreement and checkpoints:
        [[pattern, {setting: value} or None], ...]."""
        return [[pattern, None if config is None else _differences(self.config, config)]
                for pattern, config in self.rules]

    def reset(self):
        self._checked_names = False


def given_settings(args, settings):
    """The compressor's constructor arguments by name (positional ones bound to
    CompressorConfig's parameters)."""
    bound = _CONFIG_ARGUMENTS.bind(None, *args, **settings)
    given = dict(bound.arguments)
    given.pop("self")
    given.update(given.pop("scheme_options", {}))
    return given


def _rules(config, overrides, given):
    if overrides is None:
        return []
    if not hasattr(overrides, "items"):
        raise ValueError(f"overrides must map name patterns to settings (a dict), got "
                         f"{type(overrides).__name__}")
    rules = []
    for pattern, changes in overrides.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"override pattern {pattern!r} must be a non-empty string (a glob "
                             "matched against parameter names, e.g. '*embed*')")
        rules.append((pattern, _override_config(config, pattern, changes, given)))
    return rules


def _override_config(config, pattern, changes, given):
    if changes is None:
        return None
    if not hasattr(changes, "items"):
        raise ValueError(f"override {pattern!r}: settings must be a dict or None (send "
                         f"uncompressed), got {changes!r}")
    scheme = changes.get("scheme", config.scheme)
    allowed = set(TENSOR_SETTINGS)
    if isinstance(scheme, str) and scheme in SCHEMES:
        allowed |= set(SCHEMES[scheme].options)
    unknown = sorted(str(key) for key in changes if key not in allowed)
    if unknown:
        raise ValueError(f"override {pattern!r}: unknown setting(s) {unknown}; a tensor's "
                         f"settings are {sorted(allowed)}")
    if (config.scheme in _ONE_SETTING_SCHEMES or scheme in _ONE_SETTING_SCHEMES) and \
            (scheme != config.scheme or set(changes) - {"min_numel"}):
        raise ValueError(f"override {pattern!r}: dp-binomial tensors must all share the "
                         "compressor's settings (its privacy accounting covers one setting); "
                         "only min_numel may differ, or None to send a tensor uncompressed")
    # another scheme starts from its own defaults for error feedback and its options
    inherited = {name: value for name, value in given.items()
                 if scheme == config.scheme or
                 (name in TENSOR_SETTINGS + ("seed",) and name != "error_feedback")}
    try:
        return CompressorConfig(**{**inherited, **changes})
    except (TypeError, ValueError) as error:
        raise ValueError(f"override {pattern!r}: {error}") from None


def _differences(base, config):
    mine, theirs = config.__dict__, base.__dict__
    return {name: list(value) if isinstance(value, tuple) else value
            for name, value in mine.items() if theirs.get(name) != value}
