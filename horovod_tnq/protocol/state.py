"""Everything a compressor carries from one step to the next, in one picklable object.

Modelled on PyTorch's ``PowerSGDState`` (torch/distributed/algorithms/ddp_comm_hooks): the
per-rank state is explicit, documented and checkpointable, and the framework adapters keep none
of their own. Per rank it holds

1. each tensor's **step**: how many times it has been exchanged. With the seed, rank and the
   payload's name it keys the counter-based random stream (core/rng.py), so every step draws
   fresh noise and a resumed run draws exactly what the uninterrupted one would have;
2. the **error-feedback residuals** (ECQ-SGD, Wu et al., ICML 2018), one per payload name: what
   this rank's earlier quantizations of that part left out, decayed and added to its next
   gradient before quantizing (``encode``);
3. the **privacy accounting** of dp-binomial: the elements each tensor releases per step
   (core/privacy.py composes them over the steps);
4. **counters** (``stats``): what was handed to Horovod, for reporting bytes on the wire, and
   **metrics** (metrics.py): per tensor and in total, bytes, bits per element, seconds and the
   estimated quantization error, for live training metrics; the compressor's ``metrics()``
   reports both;
5. the collective namer (naming.py), whose counter of unnamed tensors is saved too.

Names key all of it (CollectiveNamer's base names). A tensor Horovod did not name (e.g.
``hvd.allreduce(t, compression=c)`` without ``name=``) gets a new one at every call
(naming.is_anonymous), so nothing of 1-2 is kept for it: its step is always 0 (its fresh name
already gives it a fresh random stream), error feedback is skipped with one warning (a residual
would never be applied), its dp-binomial releases are counted by size, and the metrics keep
its latest exchange under "unnamed". The state stays bounded however many such calls come.

``state_dict()`` / ``load_state_dict()`` carry 1-3 and the settings they were made with, as
numpy arrays and plain Python values; ``reset()`` forgets them all (e.g. when an elastic job's
membership changes).
"""

import threading
import time
import warnings

import numpy as np

from .. import core
from .host_core import HOST_CORE
from .metrics import CompressionMetrics
from .naming import UNNAMED, CollectiveNamer, is_anonymous
from .picklable import LockedState
from .settings import CompressorConfig, scheme_option_names


def new_stats():
    """Counters a compressor keeps: what it handed to Horovod, to report bytes on the wire."""
    return {"compressed_tensors": 0, "passthrough_tensors": 0, "payload_bytes": 0,
            "passthrough_bytes": 0, "elements": 0, "allgather": 0, "reduce-scatter": 0,
            "hierarchical": 0}


class CompressorState(LockedState):
    """The per-rank state of one compressor; see the module docstring."""

    def __init__(self, config, overrides=()):
        if not isinstance(config, CompressorConfig):
            raise TypeError(f"config must be a CompressorConfig, got {type(config).__name__}")
        self.config = config
        self.overrides = list(overrides)  # TensorSettings.describe(): checked on load
        self._lock = threading.Lock()  # compress() runs on Horovod's and the caller's threads
        self.namer = CollectiveNamer()
        self.steps = {}  # tensor name -> exchanges so far
        self.residuals = {}  # payload name -> error-feedback residual (numpy float32/64)
        self.released = {}  # tensor name -> elements per release (dp-binomial)
        self.unnamed_releases = {}  # elements -> releases of that many by unnamed tensors
        self.stats = new_stats()
        self.metrics = CompressionMetrics()
        self._warned_unnamed = False

    def next_step(self, name):
        """This exchange's step of tensor ``name`` (0, 1, 2, ...; always 0 for an unnamed
        tensor, whose name is new at every call)."""
        if is_anonymous(name):
            return 0
        with self._lock:
            step = self.steps.get(name, 0)
            self.steps[name] = step + 1
        return step

    def counters(self):
        """A copy of the counters (new_stats), for metrics()' "counters"."""
        with self._lock:
            return dict(self.stats)

    def count(self, **increments):
        with self._lock:
            for key, value in increments.items():
                self.stats[key] += value

    def passthrough(self, name, elements, nbytes):
        """Tensor ``name`` (None: unnamed) went to Horovod uncompressed."""
        self.count(elements=elements, passthrough_tensors=1, passthrough_bytes=nbytes)
        self.metrics.add(name or UNNAMED, None, passthrough_elements=elements,
                         passthrough_bytes=nbytes)

    def note_release(self, name, numel, config=None):
        if (config or self.config).scheme == "dp-binomial":
            with self._lock:
                if is_anonymous(name):
                    _count_release(self.unnamed_releases, numel)
                else:
                    self.released[name] = int(numel)

    def encode(self, chunk, slot, key, step, dtype_name, shape, config=None, record=None,
               first_round=True):
        """The payload of ``chunk`` (flat numpy float32/float64), a part of a tensor of
        ``dtype_name`` and ``shape`` named ``slot``, its rounding drawn from (key, step), with
        ``config`` (the tensor's settings; the compressor's by default).

        With error feedback the chunk first gets the decayed error that this rank's earlier
        quantizations of ``slot`` left behind, and keeps its new error.

        ``record``: the tensor's name in the metrics, which get the payload's bytes and
        encoding time and, for a ``first_round`` payload (of this rank's own gradient, not the
        reduce-scatter's re-quantized sum), its elements and estimated error."""
        started = time.perf_counter()
        config = config or self.config
        feedback = config.error_feedback
        if feedback and is_anonymous(slot):
            self._warn_unnamed()
            feedback = 0.0
        if feedback:
            residual = self.residuals.get(slot)
            if residual is not None:
                if residual.shape != chunk.shape:
                    raise ValueError(f"error-feedback residual for {slot!r} has shape "
                                     f"{residual.shape}, the gradient {chunk.shape}")
                chunk = chunk + chunk.dtype.type(feedback) * residual
        payload = HOST_CORE.encode(chunk, scheme=config.scheme, bits=config.bits,
                                   bucket_size=config.bucket_size, key=key, step=int(step),
                                   dtype_name=dtype_name, shape=shape,
                                   options=config.scheme_options())
        if feedback:
            with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: zeroed below
                # (the compiled decoder where it has the scheme, not the numpy reference: the
                # same float64 values, 60x faster for tnq-rht)
                decoded = core.decode_sum(payload, core.read_header(payload), 1.0,
                                          np.float64)[0]
                error = chunk - decoded.astype(chunk.dtype)
            # a NaN or Inf gradient must not poison every later step through the residual
            residual = np.where(np.isfinite(error), error, error.dtype.type(0))
            with self._lock:  # state_dict() may be copying them
                self.residuals[slot] = residual
        if record is not None:
            self.record_payload(record, step, payload.size, time.perf_counter() - started,
                                chunk.size if first_round else 0,
                                payload if first_round else None)
        return payload

    def _warn_unnamed(self):
        if not self._warned_unnamed:
            self._warned_unnamed = True
            warnings.warn(
                "error feedback needs named tensors: a tensor allreduced without a name gets a "
                "new name at every call, so its quantization error cannot be carried to its "
                "next call; it is sent without error feedback (pass name= to hvd.allreduce)",
                stacklevel=2)

    def record_payload(self, name, step, nbytes, seconds, elements=0, payload=None):
        """Metrics of one payload of tensor ``name`` at exchange ``step``: ``nbytes`` handed to
        Horovod, ``seconds`` to encode, ``elements`` of the gradient it carries, and the error
        estimated from ``payload`` (numpy, on the host) when given."""
        amounts = dict(payload_bytes=int(nbytes), encode_seconds=seconds,
                       compressed_elements=int(elements))
        estimate = core.estimate_error(payload) if payload is not None else None
        if estimate is not None:
            amounts["squared_error"], amounts["squared_norm"] = estimate
        self.metrics.add(name, int(step), **amounts)

    def privacy_spent(self):
        """The (epsilon, delta) this rank's dp-binomial payloads have spent so far, per step and
        composed over the steps (core/privacy.py documents the accounting); releases of
        unnamed tensors (``unnamed_releases``) add theirs to the totals."""
        if self.config.scheme != "dp-binomial":
            raise ValueError(f"privacy_spent() needs scheme 'dp-binomial', this compressor uses "
                             f"{self.config.scheme!r}")
        options = self.config.scheme_options()
        with self._lock:
            steps = max((self.steps.get(name, 0) for name in self.released), default=0)
            released = list(self.released.values())
            unnamed = dict(self.unnamed_releases)
        spent = core.privacy.account(released, steps, self.config.bits, **options)
        # each unnamed tensor is released once: its size's releases compose with the named
        # tensors' by adding up (sequential composition)
        for numel, releases in sorted(unnamed.items()):
            more = core.privacy.account([numel], releases, self.config.bits, **options)
            spent["epsilon"] += more["epsilon"]
            spent["delta"] += more["delta"]
        return spent

    def residual(self, slot):
        """The error-feedback residual of payload ``slot``, or None."""
        with self._lock:
            return self.residuals.get(slot)

    def set_residual(self, slot, residual):
        """Give payload ``slot`` the residual ``residual`` (flat numpy, its payload's length and
        dtype): where a residual moved to another slot (DDP's rebuilt buckets)."""
        with self._lock:
            self.residuals[slot] = residual

    def forget_residuals(self, name):
        """Forget the error-feedback residuals of every payload of tensor ``name`` (its parts,
        chunks and stages: of_tensor), where its layout changed (DDP rebuilds its buckets);
        whether there were any."""
        with self._lock:
            slots = [slot for slot in self.residuals if of_tensor(slot, name)]
            for slot in slots:
                del self.residuals[slot]
        return bool(slots)

    def residuals_copy(self):
        """{slot: residual} as they are now (the arrays themselves: residuals are replaced,
        never written into)."""
        with self._lock:
            return dict(self.residuals)

    def take_residuals(self, prefix):
        """Remove and return {slot: residual} of the slots that start with ``prefix``."""
        with self._lock:
            return {slot: self.residuals.pop(slot)
                    for slot in [slot for slot in self.residuals if slot.startswith(prefix)]}

    def state_dict(self, rank=None, size=None):
        """Settings, steps, residuals (numpy copies) and privacy accounting of this rank
        (``rank`` of ``size``, recorded so that another rank's residuals, or residuals of chunks
        cut for another world size, are not loaded by mistake)."""
        with self._lock:
            return {"config": self.config.__dict__.copy(), "overrides": self.overrides,
                    "rank": rank, "size": size,
                    "steps": dict(self.steps),
                    "anonymous": self.namer.anonymous,
                    "residuals": {slot: r.copy() for slot, r in self.residuals.items()},
                    "released": dict(self.released),
                    "unnamed_releases": dict(self.unnamed_releases)}

    def load_state_dict(self, state, rank=None, size=None, any_rank=False):
        """Restore what state_dict() returned on this ``rank`` of ``size``; the settings must be
        this compressor's. Residuals are one rank's own errors, so a state saved on another rank
        is refused unless ``any_rank``: then its steps and privacy accounting (the same on every
        rank) are taken and this rank's residuals start afresh. Residuals of a job of another
        size (the reduce-scatter's chunks depend on it) and non-finite ones (they would make the
        model NaN at the next step) are refused."""
        state = _upgraded(state)
        if state["config"] != self.config.__dict__:
            raise ValueError(f"checkpoint was saved with compressor settings {state['config']}, "
                             f"this compressor has {self.config.__dict__}")
        if state.get("overrides", []) != self.overrides:
            raise ValueError(f"checkpoint was saved with compressor overrides "
                             f"{state.get('overrides', [])}, this compressor has "
                             f"{self.overrides}")
        saved_rank = state.get("rank")
        if None not in (rank, saved_rank) and saved_rank != rank:
            if not any_rank:
                raise ValueError(
                    f"compressor state of rank {saved_rank} loaded on rank {rank}: save and "
                    "load one compressor state per rank (its error-feedback residuals are that "
                    "rank's own), or pass any_rank=True to take only its steps and privacy "
                    "accounting, the same on every rank")
            state = dict(state, residuals={})
        saved_size = state.get("size")
        if state["residuals"] and None not in (size, saved_size) and saved_size != size:
            raise ValueError(f"compressor state of a {saved_size}-rank job loaded in a "
                             f"{size}-rank one: its error-feedback residuals belong to chunks of "
                             "that size; reset() the compressor to start them again")
        for slot, residual in state["residuals"].items():
            if not np.all(np.isfinite(residual)):
                raise ValueError(f"checkpoint's error-feedback residual for {slot!r} is not "
                                 "finite: a corrupted checkpoint")
        with self._lock:
            # (earlier versions kept steps, residuals and releases of unnamed tensors by name)
            self.steps = {str(name): int(step) for name, step in state["steps"].items()
                          if not is_anonymous(name)}
            self.namer.anonymous = int(state["anonymous"])
            self.residuals = {slot: np.array(r) for slot, r in state["residuals"].items()
                              if not is_anonymous(slot)}
            self.released = {str(name): int(n) for name, n in state["released"].items()
                             if not is_anonymous(name)}
            self.unnamed_releases = {int(numel): int(n) for numel, n in
                                     state.get("unnamed_releases", {}).items()}
            for name, numel in state["released"].items():
                if is_anonymous(name):
                    _count_release(self.unnamed_releases, numel)

    def reset(self):
        """Forget steps, residuals, accounting and stats, as a new compressor would have them."""
        with self._lock:
            self.namer = CollectiveNamer()
            self.steps, self.residuals, self.released = {}, {}, {}
            self.unnamed_releases = {}
            self.stats = new_stats()
            self.metrics = CompressionMetrics()


def of_tensor(slot, name):
    """Whether payload ``slot`` is one of tensor ``name``'s: ``name`` itself, or its parts,
    chunks and stages (``name#...``)."""
    return slot == name or slot.startswith(name + "#")


def _count_release(releases, numel):
    """One more release of ``numel`` elements in ``releases`` ({elements: releases})."""
    releases[int(numel)] = releases.get(int(numel), 0) + 1


def _upgraded(state):
    """A state_dict() of horovod_tnq 0.1.0 (scheme options as config fields, steps in the
    namer's "uses"; TF kept "steps" apart) in this version's layout; newer ones as they are."""
    if "anonymous" in state:
        return state
    config = dict(state["config"])
    spec = core.get_scheme(config["scheme"])
    options = {name: config.pop(name) for name in list(config) if name in spec.options}
    for name in scheme_option_names():
        config.pop(name, None)  # other schemes' options, at their defaults
    config["options"] = tuple(sorted(options.items()))
    namer = state.get("namer", {})
    return {"config": config, "rank": None, "size": None,
            "steps": state.get("steps", namer.get("uses", {})),
            "anonymous": namer.get("anonymous", 0),
            "residuals": state.get("residuals", {}), "released": state.get("released", {})}
