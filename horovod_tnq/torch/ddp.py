"""TNQ as a PyTorch DDP communication hook, on the same exchange driver as the Horovod adapter.

    import torch.distributed as dist
    from horovod_tnq.torch.ddp import TNQHookState, tnq_hook

    model = torch.nn.parallel.DistributedDataParallel(model)
    model.register_comm_hook(TNQHookState(bits=3), tnq_hook)

DDP hands the hook each gradient bucket (``bucket.buffer()``, the flat gradients of a few
parameters) once per step, in bucket order on every rank. The hook encodes it with the core
(or the GPU kernels, where the Horovod adapter uses them), exchanges the payloads over
``torch.distributed`` with the exchange driver of protocol/exchange.py, decodes, and averages
(the sum times 1 / world size). For the same gradient bytes, seed, payload names and ranks it
gives the bits the Horovod adapter gives (``hvd.allreduce(..., name=f"ddp.bucket{i}",
op=hvd.Average, compression=TNQCompressor(...))``): the payloads of bucket ``i`` are named
``ddp.bucket<i>``, which keys their random streams, steps and error-feedback residuals in the
one CompressorState (protocol/state.py) of ``TNQHookState``.

``_DistCollectives`` is the driver's collectives interface over a torch.distributed process
group. torch.distributed pairs collectives by the order each rank issues them, not by name, so
every collective of this module is issued from the hook, in DDP's bucket order (``overlap``):
the allgather exchange issues all of its collectives when it starts and decodes in a callback
of their futures; an exchange of several rounds (the reduce-scatter, the hierarchical one)
issues its first round in its bucket's hook and each later round in the next bucket's hook,
once the round before has arrived (_issue_pending), all that is left at the step's last bucket.
docs/ddp.md lists what the hook does not do yet.
"""

import copy
import os
import socket
import threading
import warnings

import numpy as np
import torch
import torch.distributed as dist

from .. import core
from ..protocol import (CompressorBase, Hosts, check_settings_agree, local_bounds,
                        settings_buffer)
from ..protocol.exchange import Exchange, Job, residual_slots, run_to_end
from ..protocol.hosts import hosts_of_job
from ..protocol.state import of_tensor
from ..protocol.settings import SETTINGS_BYTES
from .codecs import DTYPE_NAMES, codec_for

BUCKET_NAME = "ddp.bucket{}"  # payload names: one per DDP bucket index, the same every step
# checkpoints keep a bucket's residuals by parameter, under "ddp.parameter<position><role>"
# (TNQHookState._portable_residuals): DDP's buckets in a resumed run need not be the saved ones
PARAMETER_SLOT = "ddp.parameter"
# (all_gather_into_tensor before PyTorch 2.13 named it all_gather_single)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TNQHookState(CompressorBase):
    """The state of ``tnq_hook``: settings shared by every rank, and this rank's
    CompressorState (``state``: each bucket's step count, which seeds its random stream, and its
    error-feedback residuals), checkpointed with ``state_dict()`` / ``load_state_dict()``.

    Args:
        process_group: the group DDP reduces over (None: the default group).
        bits, scheme, bucket_size, min_numel, seed, error_feedback, exchange, part_elements,
            and the scheme's own options: TNQCompressor's settings (horovod_tnq.torch), with
            the same defaults and checks. ``min_numel`` applies to whole DDP buckets (to each
            segment, with ``overrides``): a bucket of fewer elements (or of integer gradients)
            is averaged by DDP's plain allreduce.
            On several nodes of several ranks each (torchrun's GROUP_RANK and LOCAL_RANK, or
            the hosts' names), "auto" and "hierarchical" take the hierarchical exchange over
            groups the first hook call makes (dist.new_group), for the default group.
        overrides: per-parameter settings as TNQCompressor's, matched against the names of
            ``named_parameters``: each bucket is cut into segments of one setting
            (``ddp.bucket<i>.<k>``; uncompressed ones by DDP's plain allreduce).
        named_parameters: ``model.named_parameters()``, which ``overrides`` need (DDP's
            buckets carry parameters, not names); see name_parameters().
        overlap: decode in a callback of the collectives' futures, and issue the later
            rounds of a reduce-scatter or hierarchical exchange in the next bucket's hook, so
            that transfers and decoding overlap the rest of the backward pass; False finishes
            every exchange inside its hook. Both give the same bits.

    Picklable (the process group is not: an unpickled state uses the default group; set
    ``process_group`` after loading for another). Every rank must use the same settings: the
    first hook call allgathers them and raises a ValueError naming what differs.
    """

    def __init__(self, process_group=None, *, overlap=True, named_parameters=None,
                 **settings):
        super().__init__(**settings)
        self.process_group = process_group
        self.overlap = bool(overlap)
        self._init_transient()
        self._saved_layouts = {}  # bucket index -> parameter shapes, from an older checkpoint
        # the checkpoint's parameter shapes by position, until this run's numbering has matched
        # them (_number)
        self._saved_shapes = None
        if named_parameters is not None:
            self.name_parameters(named_parameters)

    def name_parameters(self, named_parameters):
        """Tell the hook the parameters' names (``model.named_parameters()``), which DDP's
        buckets do not carry: ``overrides`` match them. Not pickled (call it again after
        loading a pickled state)."""
        names = {}
        for name, parameter in named_parameters:
            if id(parameter) in names:
                continue  # a parameter shared by two modules: its first name, as DDP's
            names[id(parameter)] = (name, parameter)
        with self._lock:
            self._names = names
            self._relayout()  # (overrides may cut the buckets otherwise)

    def _init_transient(self):
        self._lock = threading.Lock()
        self._pending = []  # _Pending exchanges with collectives left to issue (_issue_pending)
        self._agreed = False  # the settings check passed (first hook call)
        self._layouts = {}  # bucket index -> (parameter shapes, parameter ids)
        self._hosts = None  # plan.Hosts of the hierarchical exchange (first hook call), or None
        self._names = {}  # id(parameter) -> (its name, the parameter): name_parameters()
        self._moved = {}  # residuals by (parameter position, role) between layouts (_segments)
        self._positions = {}  # id(parameter) -> its position: the order the hook first saw them
        self._shapes = []  # the parameters' shapes by position
        self._loaded = False  # _moved holds a checkpoint's pieces, not yet a step old
        self._laid_out = False  # a bucket of this step had a new layout (_segments)
        self._steady_steps = 0  # steps since the last one with a new layout (_end_step)
        self._place = None  # (rank, size) in the process group (first _segments call)

    def __getstate__(self):
        state = self.__dict__.copy()
        for name in ("process_group", "_lock", "_pending", "_agreed", "_layouts", "_hosts",
                     "_names", "_moved", "_positions", "_shapes", "_loaded", "_laid_out",
                     "_steady_steps", "_place"):
            state.pop(name)
        state["_saved_shapes"] = self._shapes_by_position()
        # (parameter ids are this process's: residuals go by parameter position)
        state["state"] = copy.copy(self.state)
        state["state"].residuals = self._portable_residuals(self.state.residuals_copy())
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__.setdefault("_saved_shapes", None)  # (pickles of earlier versions)
        self.process_group = None
        self._init_transient()
        self._take_parameter_residuals()

    def group(self):
        """The process group the hook reduces over."""
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def key(self, slot):
        """The random stream's key of payload ``slot`` on this rank (its global rank, as
        Horovod's rank keys the Horovod adapter's)."""
        return core.stream_key(self.config.seed, dist.get_rank(), slot)

    def codec_for(self, tensor, config=None):
        """Where ``tensor``'s payloads are made and decoded (codecs.codec_for: the Horovod
        adapter's choice): the GPU kernels for CUDA tensors of their schemes without error
        feedback, else the core on the host."""
        return codec_for(self, tensor, config or self.config)

    def _world(self):
        if not dist.is_available() or not dist.is_initialized():
            return None, None
        return dist.get_rank(), self.group().size()

    def state_dict(self):
        """CompressorState.state_dict() with the residuals as torch tensors (a checkpoint loads
        with ``torch.load(weights_only=True)``), those of DDP's buckets by parameter: a resumed
        run's buckets take them by the parameters they hold (_portable_residuals)."""
        state = super().state_dict()  # (its residuals are copies, the pieces new arrays)
        state["residuals"] = {slot: torch.from_numpy(r)
                              for slot, r in self._portable_residuals(state["residuals"]).items()}
        shapes = self._shapes_by_position()
        if shapes is not None:
            state["ddp_parameter_shapes"] = [list(shape) for shape in shapes]
        with self._lock:
            if self._saved_layouts:  # an earlier version's checkpoint, not yet used
                state["ddp_layouts"] = {int(index): [list(shape) for shape in shapes]
                                        for index, shapes in self._saved_layouts.items()}
        return state

    def _shapes_by_position(self):
        """The parameters' shapes by position, as this run numbered them (else as loaded)."""
        with self._lock:
            return list(self._shapes) if self._shapes else self._saved_shapes

    def load_state_dict(self, state, any_rank=False):
        """Restore a state_dict() of this rank (CompressorState.load_state_dict says what is
        refused; ``any_rank`` as TNQCompressor's)."""
        residuals = {slot: r.numpy() if torch.is_tensor(r) else r
                     for slot, r in state["residuals"].items()}
        super().load_state_dict(dict(state, residuals=residuals), any_rank)
        with self._lock:
            self._layouts, self._moved = {}, {}
            # (checkpoints of earlier versions: each bucket's parameter shapes, residuals by bucket)
            self._saved_layouts = {int(index): tuple(tuple(shape) for shape in shapes)
                                   for index, shapes in state.get("ddp_layouts", {}).items()}
            saved = state.get("ddp_parameter_shapes")
            self._saved_shapes = None if saved is None else [tuple(shape) for shape in saved]
        self._take_parameter_residuals()
        with self._lock:  # parameters numbered already (a live run): they must be the same
            mismatched = self._saved_shapes is not None and self._shapes and \
                not self._same_shapes(range(len(self._shapes)))
        if mismatched:
            warnings.warn(_OTHER_PARAMETERS.format("this process's"), stacklevel=2)

    def _portable_residuals(self, residuals):
        """``residuals`` (this rank's, by slot) with those of the buckets seen so far cut by
        parameter (and any not yet handed to a bucket), under PARAMETER_SLOT names: positions
        number the parameters in the order the hook first saw them, DDP's first layout, the
        same in every run of the model, which is where a resumed run's hook first sees them."""
        with self._lock:
            pieces = {key: piece.copy() for key, piece in self._moved.items()}
            if self._layouts:
                pieces.update(self._residuals_by_parameter(*self._place, forget=False))
            names = [name for *_, segments in self._layouts.values() for *_, name in segments]
        residuals = {slot: residual for slot, residual in residuals.items()
                     if not any(of_tensor(slot, name) for name in names)}
        residuals.update({f"{PARAMETER_SLOT}{position}{role}": piece
                          for (position, role), piece in pieces.items()})
        return residuals

    def _take_parameter_residuals(self):
        """The PARAMETER_SLOT residuals of a loaded state out of its slots, into _moved."""
        with self._lock:
            for slot, piece in self.state.take_residuals(PARAMETER_SLOT).items():
                rest = slot[len(PARAMETER_SLOT):]
                position = rest.split("#", 1)[0]
                self._moved[int(position), rest[len(position):]] = piece
                self._loaded = True

    def _same_shapes(self, positions):
        """Whether this run's parameters at ``positions`` have the checkpoint's shapes; where
        one does not, the checkpoint's pieces are dropped (another model, or DDP's first buckets
        in another order: positions would name other parameters), and False is returned if
        there were any. Call with the lock."""
        saved = self._saved_shapes
        if all(p < len(saved) and saved[p] == self._shapes[p] for p in positions):
            if len(self._shapes) >= len(saved):
                self._saved_shapes = None  # every position matched
            return True
        dropped = self._loaded and bool(self._moved)
        if self._loaded:
            self._moved = {}
        self._saved_shapes, self._loaded = None, False
        return not dropped

    def reset(self):
        """Forget steps, residuals and counters, as a new state would start."""
        super().reset()
        with self._lock:
            self._pending = []
            self._agreed = False
            self._layouts, self._saved_layouts, self._moved = {}, {}, {}
            self._saved_shapes, self._loaded = None, False
            # (positions stay: they number this process's parameters in DDP's first layout)

    # -- what the hook asks of its state ------------------------------------------------------

    def _check_settings(self, group):
        """At the first hook call (and the first after reset()): every rank's settings in one
        allgather, before any exchange, so that ranks configured differently raise here with
        what differs instead of waiting in collectives that do not pair."""
        if self._agreed:
            return
        overrides = self.settings.describe()
        mine = torch.from_numpy(settings_buffer(self.config, overrides))
        device = _comm_device(group, mine.device)
        gathered = torch.empty(group.size() * SETTINGS_BYTES, dtype=torch.uint8, device=device)
        _all_gather_single(gathered, mine.to(device), group=group)
        check_settings_agree(self.config, gathered.cpu().numpy(), overrides)
        if group is dist.group.WORLD and self.settings.may_use("hierarchical"):
            self._hosts = hosts_of_job(_Nodes(), _gather_places, Hosts, dynamic=True)
        self._agreed = True

    def _segments(self, bucket, name, group):
        """The bucket cut where its parameters' settings differ (``overrides``, matched against
        the names name_parameters() gave): [(start, stop, config or None for uncompressed,
        payload name)], one (0, numel, config, ``name``) without overrides.

        Residuals are kept per segment. DDP lays its buckets out anew once (after its first
        step, unless find_unused_parameters): the first bucket seen with other parameters cuts
        every residual of the old layout by parameter, and each bucket of the new one takes
        its parameters' pieces (_move_residuals), as the buckets of a run resumed from a
        checkpoint take the checkpoint's (state_dict())."""
        parameters = bucket.parameters()
        shapes = tuple(tuple(p.shape) for p in parameters)
        ids = tuple(id(p) for p in parameters)
        index = bucket.index()
        with self._lock:
            self._place = group.rank(), group.size()
            known = self._layouts.get(index)
            if known is not None and known[1] == ids:
                return known[2]
            self._laid_out = True  # (a new layout this step: see _end_step)
            if known is not None:  # DDP's new layout: every bucket at once
                self._relayout()
            mismatched = not self._number(index, ids, shapes)
            segments = self._cut(parameters, name)
            self._layouts[index] = (shapes, ids, segments)
            saved = self._saved_layouts.pop(index, None)
            if self._moved:
                self._forget(segments)  # (a checkpoint's, of this index in another layout)
                mismatched |= self._move_residuals(shapes, ids, segments, *self._place)
            elif saved is not None and saved != shapes and self._forget(segments):
                mismatched = True
        if mismatched:
            warnings.warn(_OTHER_PARAMETERS.format(f"bucket {index}'s"), stacklevel=3)
        return segments

    def _number(self, index, ids, shapes):
        """Give the bucket's parameters not seen before the next positions (the order the hook
        first sees parameters: DDP's first layout, the same in every run of one model and DDP
        settings); a bucket 0 of parameters none of which was seen is another model's, which
        numbers them from 0 again (this one's residuals forgotten; a checkpoint's kept).
        Whether the positions agree with the checkpoint's shapes. Call with the lock."""
        if index == 0 and self._positions and not any(i in self._positions for i in ids):
            self._forget([segment for *_, segments in self._layouts.values()
                          for segment in segments])
            self._layouts, self._positions, self._shapes = {}, {}, []
            if not self._loaded:
                self._moved = {}
        new = []
        for parameter_id, shape in zip(ids, shapes):
            if parameter_id not in self._positions:
                self._positions[parameter_id] = len(self._shapes)
                self._shapes.append(shape)
                new.append(self._positions[parameter_id])
        return not new or self._saved_shapes is None or self._same_shapes(new)

    def _end_step(self):
        """At a step's last bucket. Pieces still in _moved (of parameters no payload of this
        layout covers) wait for DDP's rebuild, which comes after the first step (the second
        with static_graph), and are dropped after two steps without a new layout."""
        with self._lock:
            self._steady_steps = 0 if self._laid_out else self._steady_steps + 1
            if self._steady_steps >= 2:
                self._moved = {}
            self._laid_out = self._loaded = False

    def _relaid(self, bucket):
        """Whether ``bucket`` holds other parameters than its index's did: DDP's new layout
        (the hook then issues what earlier buckets have left before their residuals move)."""
        with self._lock:
            known = self._layouts.get(bucket.index())
        return known is not None and known[1] != tuple(id(p) for p in bucket.parameters())

    def _relayout(self):
        """Cut the residuals of every layout seen so far by parameter into _moved (beside
        pieces not yet handed to a bucket) and forget the layouts (call with the lock)."""
        if self._layouts:
            self._moved = {**self._moved,
                           **self._residuals_by_parameter(*self._place, forget=True)}
        self._layouts = {}

    def _residuals_by_parameter(self, rank, size, forget):
        """Every residual of the layouts seen so far cut by parameter: {(the parameter's
        position, role): its residual of that role (exchange.residual_slots) in its shape,
        zeros where no slot of this rank covered it}; with ``forget`` their slots are
        forgotten."""
        moved = {}
        for shapes, ids, segments in self._layouts.values():
            for slot, _, key, in_slot, in_piece, shape in self._pieces(shapes, ids, segments,
                                                                       rank, size):
                residual = self.state.residual(slot)
                if residual is not None:
                    if key not in moved:
                        moved[key] = np.zeros(shape, residual.dtype)
                    moved[key].reshape(-1)[in_piece] = residual[in_slot]
            if forget:
                self._forget(segments)
        return moved

    def _move_residuals(self, shapes, ids, segments, rank, size):
        """The residuals of a bucket of a new layout, from its parameters' pieces in
        ``_moved`` (a slot none of whose parameters had one keeps none); whether a piece had
        another shape than its parameter (a checkpoint of another model: dropped)."""
        mismatched, used, residuals = False, set(), {}
        for slot, length, key, in_slot, in_piece, shape in self._pieces(shapes, ids, segments,
                                                                        rank, size):
            piece = self._moved.get(key)
            if piece is None:
                continue
            if piece.shape != shape:
                del self._moved[key]
                mismatched = True
                continue
            if slot not in residuals:
                residuals[slot] = np.zeros(length, piece.dtype)
            residuals[slot][in_slot] = piece.reshape(-1)[in_piece]
            used.add(key)
        for slot, residual in residuals.items():
            self.state.set_residual(slot, residual)
        for key in used:  # (the others may find a slot in DDP's next layout: end_step)
            del self._moved[key]
        return mismatched

    def _pieces(self, shapes, ids, segments, rank, size):
        """Where each parameter of a bucket meets each residual slot of its segments:
        (slot, its length, (position, role), the range within the slot, the range within the
        parameter's flat residual, the parameter's shape), for the cut (_residuals_by_parameter)
        and the assembly (_move_residuals) alike."""
        offsets = _offsets(shapes)
        for start, stop, config, name in segments:
            for slot, role, begin, end in self._slots(config, start, stop, name, rank, size):
                for k, (low, high) in _overlaps(offsets, start + begin, start + end):
                    yield (slot, end - begin, (self._positions[ids[k]], role),
                           slice(low - start - begin, high - start - begin),
                           slice(low - offsets[k], high - offsets[k]), shapes[k])

    def _slots(self, config, start, stop, name, rank, size):
        """exchange.residual_slots of a segment that _reduce compresses with error feedback
        (offsets within the segment), else none."""
        if config is None or not config.error_feedback or stop - start < config.min_numel:
            return []
        return residual_slots(config, stop - start, size, rank, self._hosts, name)

    def _cut(self, parameters, name):
        if not self.settings.rules:
            return [(0, sum(p.numel() for p in parameters), self.config, name)]
        missing = [tuple(p.shape) for p in parameters if id(p) not in self._names]
        if missing:
            raise ValueError(f"horovod_tnq DDP hook: overrides match parameter names, and no "
                             f"name is known for parameters of shapes {missing[:3]}: pass "
                             "named_parameters=model.named_parameters() to TNQHookState (or "
                             "call state.name_parameters(...) after loading a pickled state)")
        names = [self._names[id(p)][0] for p in parameters]
        self.settings.check_names(name for name, _ in self._names.values())
        segments, start = [], 0
        for parameter, parameter_name in zip(parameters, names):
            config = self.config_for(parameter_name)
            stop = start + parameter.numel()
            if segments and segments[-1][2] == config:
                segments[-1][1] = stop
            else:
                segments.append([start, stop, config])
            start = stop
        if len(segments) == 1:  # one setting for the whole bucket: named as without overrides
            return [(0, start, segments[0][2], name)]
        return [(begin, end, config, f"{name}.{k}")
                for k, (begin, end, config) in enumerate(segments)]

    def _forget(self, segments):
        """Drop the residuals of ``segments``; whether there were any."""
        forgotten = [self.state.forget_residuals(name) for *_, name in segments]
        return any(forgotten)


_OTHER_PARAMETERS = ("horovod_tnq DDP hook: {} parameters are not those its state was saved with "
                     "(another model, or DDP's first buckets in another order): the saved "
                     "error-feedback residuals start afresh")


def _offsets(shapes):
    """Where each parameter of a bucket starts in its flat buffer, and where the last ends."""
    return np.cumsum([0] + [int(np.prod(shape)) for shape in shapes]).tolist()


def _overlaps(offsets, begin, end):
    """(k, (low, high)) for each parameter k whose range in the bucket meets [begin, end)."""
    for k in range(len(offsets) - 1):
        low, high = max(begin, offsets[k]), min(end, offsets[k + 1])
        if low < high:
            yield k, (low, high)


def tnq_hook(state: TNQHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: ``bucket``'s gradients averaged over ``state``'s process group,
    each rank's sent as TNQ payloads (see the module docstring and TNQHookState). Register it
    with ``ddp_model.register_comm_hook(TNQHookState(...), tnq_hook)``.

    With ``overrides`` the bucket goes in segments of one setting each, in bucket order on
    every rank (an uncompressed segment by DDP's plain allreduce)."""
    group = state.group()
    tensor = bucket.buffer()
    state._check_settings(group)
    # DDP's new layout: what earlier buckets have left to encode goes before residuals move
    _issue_pending(state, every_round=state._relaid(bucket))
    name = BUCKET_NAME.format(bucket.index())
    if tensor.dtype not in DTYPE_NAMES:
        future = _passthrough(state, tensor, name, group)
    else:
        segments = state._segments(bucket, name, group)
        if len(segments) == 1:
            future = _reduce(state, tensor, segments[0][2], name, group)
        else:
            flat = tensor.view(-1)
            future = _when_all(tensor, [_reduce(state, flat[start:stop], config, segment_name,
                                                group)
                                        for start, stop, config, segment_name in segments],
                               lambda: tensor)
    if bucket.is_last():
        _issue_pending(state, every_round=True)
        state._end_step()
    return future


def _when_all(tensor, futures, result):
    """The future DDP waits on for bucket ``tensor``: ``result()`` once every future of
    ``futures`` has completed, failing with the first one's error (collect_all completes
    whether they failed or not). collect_all's future carries no CUDA devices, so DDP's wait on
    it would not order DDP's stream after the collectives and the decoders: for a CUDA bucket
    each future is waited on (the current stream waits for it) and the result is set on a
    future of the bucket's device (which records the current stream, for DDP's wait)."""
    combined = torch.futures.collect_all(futures)
    if not tensor.is_cuda:
        def complete(done):
            for future in done.value():
                future.value()  # raises where that one failed
            return result()
        return combined.then(complete)
    out = torch.futures.Future(devices=[tensor.device])

    def complete_on_device(done):
        try:
            for future in done.value():
                future.wait()
            out.set_result(result())
        except Exception as error:  # handed to DDP's wait, as a CPU future's would be
            out.set_exception(error)

    combined.add_done_callback(complete_on_device)
    return out


def _reduce(state, tensor, config, name, group):
    """A future of ``tensor`` (a bucket, or a segment of one) averaged over ``group``:
    compressed with ``config`` as payloads ``name``, or by DDP's plain allreduce where
    ``config`` is None or the tensor is smaller than its ``min_numel``."""
    if config is None or tensor.numel() < config.min_numel:
        return _passthrough(state, tensor, name, group)
    size = group.size()
    codec = state.codec_for(tensor, config)
    collectives = _DistCollectives(codec, group)
    job = Job(codec.values(tensor), tensor.numel(), tuple(tensor.shape),
              DTYPE_NAMES[tensor.dtype], config, name, name, name,
              state.state.next_step(name), group, size, state._hosts)
    exchange = Exchange(job, codec, collectives)
    exchange.scale = average_scale(size)
    exchange.target = _decode_target(tensor, codec)
    exchange.start()
    if not state.overlap:
        result = _into_bucket(tensor, codec, run_to_end(exchange, []))
        future = torch.futures.Future()
        future.set_result(result)
        return future
    pending = _Pending(exchange, tensor, codec)
    if pending.exchange.issued_all:
        pending.decode_on_arrival()
    else:
        with state._lock:
            state._pending.append(pending)
    return pending.future


class _Pending:
    """An exchange of a bucket (or segment) in overlap mode, and the future DDP waits on for
    it: once every collective of the exchange has been issued, it decodes into the bucket in a
    callback of the last ones' futures and completes ``future``."""

    def __init__(self, exchange, tensor, codec):
        self.exchange, self.tensor, self.codec = exchange, tensor, codec
        self.future = torch.futures.Future(devices=[tensor.device]) if tensor.is_cuda else \
            torch.futures.Future()

    def decode_on_arrival(self):
        exchange = self.exchange

        def finish():
            return _into_bucket(self.tensor, self.codec,
                                exchange.finish(exchange.scale, exchange.target))

        futures = []
        if not exchange.done and all(handle.future is not None for handle in exchange.waiting):
            # (the earlier rounds' have been waited on; an allgather's parts are all waiting)
            futures = [handle.future for handle in exchange.collectives.handles
                       if handle.future is not None]
        if not futures:
            try:
                self.future.set_result(finish())
            except Exception as error:  # handed to DDP's wait
                self.future.set_exception(error)
            return
        decoded = _when_all(self.tensor, futures, finish)

        def complete(done):
            try:
                self.future.set_result(done.value())
            except Exception as error:  # handed to DDP's wait
                self.future.set_exception(error)

        decoded.add_done_callback(complete)


def _issue_pending(state, every_round):
    """Take the exchanges of earlier buckets that have collectives left to issue (the
    reduce-scatter's second round, the hierarchical exchange's later rounds) one round on:
    their collectives of the round before have had the backward pass's computation since to
    arrive. At the step's last bucket (``every_round``) every round is issued. An exchange
    whose collectives are all issued then decodes when they arrive. The hook calls this at the
    same points on every rank, so every rank issues the same collectives in the same order,
    which is how torch.distributed pairs them."""
    with state._lock:
        pending, state._pending = state._pending, []
    still = []
    for entry in pending:
        exchange = entry.exchange
        round_ = exchange.round
        while not exchange.issued_all and (every_round or exchange.round == round_):
            exchange.advance()
        if exchange.error is not None:
            # this rank cannot issue the exchange's later collectives: going on would pair
            # the next ones with other ranks' collectives of this exchange
            for dropped in pending:
                if not dropped.future.done():
                    dropped.future.set_exception(exchange.error)
            raise exchange.error
        if exchange.issued_all:
            entry.decode_on_arrival()
        else:
            still.append(entry)
    with state._lock:
        state._pending = still + state._pending


def _passthrough(state, tensor, name, group):
    state.state.passthrough(name, tensor.numel(), tensor.numel() * tensor.element_size())
    return _allreduce_average(tensor, group)


def average_scale(size):
    """What the sum over ``size`` ranks is multiplied by: 1 / size rounded to float32, as the
    Horovod adapter reads it from its float32 probe under op=Average (exact for powers of 2)."""
    return float(np.float32(1.0 / size))


def _decode_target(tensor, codec):
    """The bucket itself where the decoder can write the result into it (a contiguous float32
    or float64 bucket on the codec's device), else None (a new array)."""
    work = torch.float32 if tensor.dtype == torch.float32 else torch.float64
    if tensor.dtype != work or tensor.device != codec.device or not tensor.is_contiguous():
        return None
    return codec.from_tensor(tensor.view(-1))


def _into_bucket(tensor, codec, result):
    """The decoded ``result`` (a codec array) in the bucket's buffer, which DDP copies into
    the gradients."""
    result = codec.to_tensor(result)
    if result.data_ptr() != tensor.data_ptr():
        tensor.copy_(result.view(tensor.shape))
    return tensor


def _allreduce_average(tensor, group):
    """DDP's own allreduce hook: the bucket divided by the group's size, then summed."""
    tensor.div_(group.size())
    work = dist.all_reduce(tensor, group=group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


class _Nodes:
    """What protocol.hosts reads of Horovod, from torch.distributed and torchrun: the world,
    this rank's node (its ranks per node), and new groups for process sets."""

    @staticmethod
    def size():
        return dist.get_world_size()

    @staticmethod
    def rank():
        return dist.get_rank()

    @staticmethod
    def local_size():
        return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))

    @staticmethod
    def cross_size():
        return max(dist.get_world_size() // _Nodes.local_size(), 1)

    @staticmethod
    def add_process_set(ranks):
        return dist.new_group(list(ranks))


def _gather_places():
    """(node index, local rank) of every rank: torchrun's GROUP_RANK and LOCAL_RANK, or, where
    a launcher sets neither, the index of the host's name among every rank's."""
    node = os.environ.get("GROUP_RANK")
    place = (int(node) if node is not None else socket.gethostname(),
             int(os.environ.get("LOCAL_RANK", "-1")))
    places = [None] * dist.get_world_size()
    dist.all_gather_object(places, place)
    if node is None:
        names = sorted({name for name, _ in places})
        places = [(names.index(name), local) for name, local in places]
    return places


def _comm_device(group, device):
    """Where tensors of ``group``'s collectives must be: the GPU for NCCL, the host for Gloo,
    ``device`` (the codec's) for a group with a backend for each."""
    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return device


class _Handle:
    """A collective in flight: its torch.distributed work and what it received, once done."""

    def __init__(self, work, received):
        self.work, self._received = work, received
        try:
            self.future = work.get_future()
        except RuntimeError:  # (Gloo's reduce_scatter has none)
            self.future = None

    def result(self):
        # the future's wait where there is one, not the work's: futures run their callbacks,
        # where the driver may decode, before Gloo marks the work itself done
        if self.future is not None:
            self.future.wait()
        else:
            self.work.wait()
        return self._received()


class _DistCollectives:
    """The exchange driver's collectives (protocol/exchange.py) over a torch.distributed
    process group, on a codec's arrays. Each collective is issued when called (its sizes first,
    blocking, where ranks may send different sizes) and waited on in wait(); what it receives
    is what Horovod's collective of the same name would hand the driver."""

    pipelined = True  # parts are decoded as they arrive

    def __init__(self, codec, group):
        self.codec, self.group = codec, group
        self.device = _comm_device(group, codec.device)
        self.handles = []

    @staticmethod
    def compute(function, inputs, dtypes, shapes):
        return list(function(*inputs))

    def _wire(self, array):
        return self.codec.to_tensor(np.ascontiguousarray(array) if isinstance(array, np.ndarray)
                                    else array).reshape(-1).to(self.device)

    def _issued(self, work, received):
        handle = _Handle(work, received)
        self.handles.append(handle)
        return handle

    def allgather(self, array, name, group):
        """Every rank's ``array`` (1-D, of any size) concatenated in rank order: their sizes
        are gathered first, then the arrays padded to the longest."""
        payload = self._wire(array)
        ranks = group.size()
        sizes = torch.empty(ranks, dtype=torch.int64, device=self.device)
        _all_gather_single(
            sizes, torch.tensor([payload.numel()], dtype=torch.int64, device=self.device),
            group=group)
        sizes = sizes.tolist()
        longest = max(sizes)
        if payload.numel() < longest:
            payload = torch.cat([payload, payload.new_zeros(longest - payload.numel())])
        gathered = payload.new_empty(ranks * longest)
        work = _all_gather_single(gathered, payload, group=group, async_op=True)

        def received():
            if all(size == longest for size in sizes):
                return gathered
            return torch.cat([gathered[rank * longest:rank * longest + size]
                              for rank, size in enumerate(sizes)])

        return self._issued(work, received)

    def alltoall(self, array, splits, name, group):
        """What every rank sent this one (``splits``: how many elements of ``array`` go to
        each rank), concatenated in rank order; the counts go first."""
        payload = self._wire(array)
        splits = [int(count) for count in (splits.tolist() if hasattr(splits, "tolist")
                                           else splits)]
        counts = torch.empty(group.size(), dtype=torch.int64, device=self.device)
        dist.all_to_all_single(counts, torch.tensor(splits, dtype=torch.int64,
                                                    device=self.device), group=group)
        counts = counts.tolist()
        received = payload.new_empty(sum(counts))
        work = dist.all_to_all_single(received, payload, output_split_sizes=counts,
                                      input_split_sizes=splits, group=group, async_op=True)
        return self._issued(work, lambda: received)

    def allreduce_sum(self, array, name, group):
        summed = self._wire(array).clone()  # (the driver may still read its array)
        work = dist.all_reduce(summed, group=group, async_op=True)
        return self._issued(work, lambda: summed)

    def reducescatter_sum(self, array, name, group):
        """This rank's slice of the sum over ranks: Horovod's split (the first numel % n ranks
        one element more; protocol.plan.local_bounds)."""
        values = self._wire(array)
        bounds = local_bounds(values.numel(), group.size())
        parts = [values[start:stop] for start, stop in bounds]
        start, stop = bounds[group.rank()]
        out = values.new_empty(stop - start)
        work = dist.reduce_scatter(out, parts, group=group, async_op=True)
        return self._issued(work, lambda: out)

    def wait(self, handle):
        """What the collective received, as the codec's array."""
        return self.codec.from_tensor(handle.result().to(self.codec.device))
