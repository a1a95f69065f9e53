"""Naming each tensor's collectives identically on every rank (no framework imports).

Who calls compress() says what the tensor is called, in a TensorName: horovod_tnq's own callers
(the Keras 3 DistributedOptimizer, through ``compressor.named(...)``) pass it; PyTorch's fused
DistributedOptimizer and DDP hook name their buckets themselves (``TNQCompressor.start``, the
hook's Job). Only stock Horovod (``hvd.DistributedOptimizer``, ``DistributedGradientTape``,
``hvd.allreduce(..., compression=c)``) calls ``compress(tensor)`` without names; for it each
adapter reads them from Horovod's frames in one module of its own (torch/horovod_frames.py,
tensorflow/horovod_frames.py). This module keeps what is framework-free: the TensorName, the
namer of collectives and the names records are kept under.
"""

import dataclasses
import threading
import warnings
import weakref
from typing import Any, Optional


@dataclasses.dataclass(frozen=True)
class TensorName:
    """What compress() is told of a tensor besides its data.

    ``collective``: the name of the Horovod collective it serves (None: unnamed, see
    CollectiveNamer; a CallSiteName also holds the parameter); ``parameter``: the name of the
    parameter or variable whose gradient it is, which per-tensor settings (overrides.py) match
    and its metrics are kept under (None: ``collective``); ``names``: every parameter name of
    its optimizer, checked once against the override patterns; ``process_set``: Horovod's
    process set (None: the global one)."""

    collective: Optional[str] = None
    parameter: Optional[str] = None
    names: tuple = ()
    process_set: Any = None

    @property
    def setting_name(self):
        """The name the tensor's settings are looked up by."""
        return self.parameter or self.collective


class NamedCompression:
    """``compression=`` for one Horovod collective whose tensor the caller can name: Horovod
    calls ``compress(tensor)`` and ``decompress(tensor, ctx)`` on it, and the compressor gets
    the TensorName with the tensor (``compressor.named(...)`` makes one)."""

    def __init__(self, compressor, name):
        self.compressor = compressor
        self.name = name

    def compress(self, tensor):
        return self.compressor.compress_named(tensor, self.name)

    def decompress(self, tensor, ctx):
        return self.compressor.decompress(tensor, ctx)


def variable_name(variable):
    """A TF variable's name without its ":0" (Keras 3 variables: their path): what overrides of
    the TensorFlow adapter match."""
    name = getattr(variable, "path", None) or getattr(variable, "name", "")
    return name.rsplit(":", 1)[0] if ":" in name else name


# The Horovod whose private frames the stock paths read names from (torch/horovod_frames.py,
# tensorflow/horovod_frames.py); another version warns once (check_horovod_version).
HOROVOD_VERSION = "0.28.1"
_version_checked = False  # one warning per process, whichever adapter reads frames first


def check_horovod_version(version=None):
    """Warn once per process where the installed Horovod (``version``: horovod.__version__) is
    not HOROVOD_VERSION (call it from the adapter function that reads Horovod's frames: the
    warning points at that function's caller)."""
    global _version_checked
    if _version_checked:
        return
    _version_checked = True
    if version is None:
        import horovod  # (Horovod's top package: no framework)
        version = getattr(horovod, "__version__", "unknown")
    if version != HOROVOD_VERSION:
        warnings.warn(_horovod_version_warning(version), stacklevel=3)


def _horovod_version_warning(installed):
    return (f"horovod_tnq reads the names of stock Horovod's gradients from Horovod "
            f"{HOROVOD_VERSION}'s frames, and Horovod {installed} is installed: if its frames "
            f"changed, per-tensor overrides, metrics names and error feedback silently miss "
            f"their tensors. horovod_tnq's own DistributedOptimizer (and Keras 3 optimizer) "
            f"pass names instead; tests/unit/test_horovod_frames.py checks a Horovod version")


def collective_in(local):
    """(name or None, process set) of a stock Horovod function that called compress(), from
    its ``local`` variables: ``name``, and ``process_set`` or ``self.process_set``."""
    process_set = local.get("process_set")
    if process_set is None and local.get("self") is not None:
        process_set = getattr(local["self"], "process_set", None)
    name = local.get("name")
    return (name if isinstance(name, str) and name else None), process_set


class CallSiteName(str):
    """A collective's name as Horovod gives it, with ``owner()``: the parameter whose gradient
    it reduces (None where there is none), held weakly: keeping it would keep the model
    alive."""

    def __new__(cls, name, owner=None):
        self = super().__new__(cls, name)
        self.owner = _no_owner
        if owner is not None:
            try:
                self.owner = weakref.ref(owner)
            except TypeError:  # not weakly referenceable: no owner, not a strong reference
                pass
        return self

    def __reduce__(self):  # pickles as the plain name (a weak reference does not pickle)
        return str, (str(self),)


def _no_owner():
    return None


# The base name CollectiveNamer gives a tensor Horovod did not name: "noname.<n>", numbered in
# the order this rank compresses them. It changes at every call, so nothing is kept under it.
ANONYMOUS = "noname."


def anonymous_number(name):
    """The number of ``name`` (a base name, or a payload's: base name + part) if it is one that
    CollectiveNamer gave a tensor Horovod did not name, else None."""
    if isinstance(name, str) and name.startswith(ANONYMOUS):
        number = name[len(ANONYMOUS):].split("#", 1)[0]  # (payload parts start with "#")
        if number.isdigit():
            return int(number)
    return None


def is_anonymous(name):
    return anonymous_number(name) is not None


UNNAMED = "unnamed"  # what per-tensor records of tensors without a name are kept under


def record_name(name):
    """What a per-tensor record (metrics, byte counts) of tensor ``name`` is kept under: its
    name, or UNNAMED for every tensor that Horovod did not name, so that such records stay one
    however many calls come."""
    return UNNAMED if is_anonymous(name) else name


class CollectiveNamer:
    """Names each tensor's state and collectives, identically on every rank.

    ``acquire`` gives a tensor two names. Its **base name** keys what the compressor keeps for
    it (its step, the random stream and error-feedback residual of each payload, its metrics):
    Horovod's name, except where parameters of two models reach one compressor under the same
    name (a GAN's generator and discriminator, both with stock DistributedOptimizers): the
    first parameter seen under a name keeps it, the others get "<name>@1", "@2", ... in the
    order they first come, and a parameter that no longer lives gives its number up to the next
    newcomer. Its **collective name** names its allgathers and alltoalls: a grouped allreduce
    compresses several tensors under one Horovod name, so each gets the index of its turn among
    the tensors of that name still in flight; names then repeat from step to step (Horovod's
    response cache stays useful). Both stay on Horovod's name where Horovod gave one.

    Tensors Horovod did not name are numbered in the order this rank compresses them
    (``anonymous``, saved with the compressor's state): "noname.<n>", new at every call
    (is_anonymous).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._in_flight = {}  # Horovod name -> tensors of it in flight
        self._owners = {}  # Horovod name -> weak reference to the parameter of each base name
        self._horovod_names = {}  # "<name>@<k>" -> name
        self.anonymous = 0

    def acquire(self, name):
        """(base name, collective name) for a tensor Horovod calls ``name`` (or None; a
        CallSiteName tells its parameter)."""
        with self._lock:
            if name is None:
                name = f"{ANONYMOUS}{self.anonymous}"
                self.anonymous += 1
            base = self._base_name(name)
            name = str(name)
            index = self._in_flight.get(name, 0)
            self._in_flight[name] = index + 1
            return base, f"tnq.{name}.{index}"

    def _base_name(self, name):
        owner = getattr(name, "owner", _no_owner)()
        name = str(name)
        if owner is None:
            return name
        owners = self._owners.setdefault(name, [])
        alive = [reference() for reference in owners]
        number = next((k for k, other in enumerate(alive) if other is owner), None)
        if number is None:  # a newcomer takes the first number no living parameter holds
            number = next((k for k, other in enumerate(alive) if other is None), len(owners))
            if number == len(owners):
                owners.append(None)
            owners[number] = weakref.ref(owner)
        if number == 0:
            return name
        base = f"{name}@{number}"
        self._horovod_names[base] = name
        return base

    def release(self, base_name):
        """The tensor of ``base_name`` (from acquire) is no longer in flight."""
        with self._lock:
            name = self._horovod_names.get(base_name, base_name)
            left = self._in_flight.get(name, 0) - 1
            if left > 0:
                self._in_flight[name] = left
            else:
                self._in_flight.pop(name, None)

    def __getstate__(self):  # picklable: the lock, what is in flight and the owners stay behind
        return {"anonymous": self.anonymous}

    def __setstate__(self, state):
        self.__init__()
        self.anonymous = state["anonymous"]
