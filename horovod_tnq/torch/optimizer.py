"""A DistributedOptimizer that compresses gradients in a few fused buckets per step.

Stock ``hvd.DistributedOptimizer(compression=TNQCompressor(...))`` works, but it runs the
compressor once per parameter: an encode, an allgather and a small probe allreduce each,
every one negotiated by Horovod on its own. Uncompressed Horovod fuses all gradients into one
allreduce; measured on the 10.8M-parameter benchmark model (docs/benchmarks.md, "Training
over a slow network"), the per-tensor collectives alone cost more than the compressed bytes
save.

This optimizer has the same signature and contract as Horovod's (Horovod 0.28.1's own optimizer
tests pass with it: tests/horovodrun/test_horovod_contract.py). It lays the parameters out in
buckets (PyTorch DDP's idea: reverse registration order, which is roughly the order backward
produces gradients, up to ``bucket_elements`` each, one dtype per bucket); when the last gradient
of a bucket is ready, a hook flattens the bucket and starts its exchange with the compressor
(TNQCompressor.start), so communication overlaps the rest of backward as with stock Horovod.
step() waits for every bucket (TNQCompressor.finish), writes the reduced gradients back and
steps. No probe is needed: the optimizer knows its op. Ranks check at the first step, and
again after reset(), that they agree on the compressor settings and the bucket layout, so a
mismatch is an error on every rank instead of collectives that never pair up.

Elastic Horovod: register ``optimizer.reset`` as a reset callback of the elastic state; after a
worker joins or leaves it re-reads the world size for Average, resets the compressor's state
(names, steps, residuals) and checks the ranks again, together with the newcomers.
"""

import contextlib
import itertools
import os
import warnings
import zlib

import horovod.torch as hvd
import horovod.torch.optimizer as horovod_optimizer
import torch
from horovod.torch.compression import Compressor

from ..core import PayloadError
from ..protocol import cached_exchange_under_join, exchange_refused_by_join
from .compressor import TNQCompressor, wait

DEFAULT_BUCKET_ELEMENTS = 1 << 22  # 16 MiB of float32 gradients per bucket
# fused optimizers made in this process, in order (the same on every rank): the first names its
# buckets fused.N, the k-th fusedk.N, so that two optimizers' collectives never share a name
_INSTANCES = itertools.count()


class _FusedDistributedOptimizer(torch.optim.Optimizer):
    def __init__(self, params, named_parameters, compression, backward_passes_per_step, op,
                 gradient_predivide_factor, groups, sparse_as_dense, process_set,
                 bucket_elements):
        super(self.__class__, self).__init__(params)
        self._compression = compression
        self.backward_passes_per_step = backward_passes_per_step
        self._op = op
        self._sparse_as_dense = sparse_as_dense
        self._process_set = process_set
        # as Horovod's: the names of every parameter, refused if duplicated or partial
        self._parameter_names = _parameter_names(self.param_groups, named_parameters)
        names = self._parameter_names if named_parameters is not None else {}
        parameters = [p for group in self.param_groups for p in group["params"]
                      if p.requires_grad]
        # per-tensor settings (the compressor's overrides), resolved once by parameter name
        if compression.settings.rules and not names:
            warnings.warn("the compressor's overrides match parameter names: pass "
                          "named_parameters=model.named_parameters() to DistributedOptimizer",
                          stacklevel=3)
        configs = {p: compression.config_for(names.get(p), list(names.values()))
                   for p in parameters}
        self._buckets = _layout(parameters, groups, bucket_elements, configs.get)
        self._configs = [configs[bucket[0]] for bucket in self._buckets]
        self._bucket_of = {p: index for index, bucket in enumerate(self._buckets)
                           for p in bucket}
        instance = next(_INSTANCES)
        self._prefix = "fused" if instance == 0 else f"fused{instance}"
        # where each parameter sits in the per-step "who has a gradient" allreduce
        self._slot = {p: slot for slot, p in enumerate(p for bucket in self._buckets
                                                       for p in bucket)}
        self._agreed = False  # the ranks' check runs at the first synchronize()
        self._clear_step()
        self._synchronized = False
        self._should_synchronize = True
        # As Horovod: ranks outside the process set, and a single process outside Elastic
        # Horovod, reduce nothing (step() applies the local gradients).
        self._reduces = process_set.included() and (
            hvd.size() > 1 or os.environ.get("HOROVOD_ELASTIC") == "1")
        if self._reduces:
            for p in parameters:
                p.register_post_accumulate_grad_hook(self._gradient_ready)

    @property
    def _scale(self):
        """What the sum of the ranks' gradients is multiplied by (the world may change size)."""
        return 1.0 / self._process_set.size() if self._op == hvd.Average else 1.0

    def reset(self):
        """After an elastic reset (workers joined or left): forget the step in progress, reset
        the compressor's state, and check the ranks again at the next step."""
        self._compression.reset()
        self._clear_step()
        self._agreed = False
        self._synchronized = False

    def load_state_dict(self, *args, **kwargs):
        """As Horovod's: forgets the step in progress, then loads the wrapped optimizer's state."""
        self._clear_step()
        self._synchronized = False
        self._should_synchronize = True
        return super(self.__class__, self).load_state_dict(*args, **kwargs)

    def set_backward_passes_per_step(self, passes):
        """As Horovod's."""
        self.backward_passes_per_step = passes
        self._delay = {p: passes for p in self._bucket_of}

    def _clear_step(self):
        self._delay = {p: self.backward_passes_per_step for p in self._bucket_of}
        self._waiting = [len(bucket) for bucket in self._buckets]
        self._handles = {}
        self._sparse = {}  # sparse gradients (without sparse_as_dense): Horovod's allgathers
        # per parameter: 1 where this rank sends a gradient that may be nonzero, 0 where it
        # sends zeros (no gradient this step, or one that goes sparse)
        self._has_gradient = torch.zeros(len(self._bucket_of), dtype=torch.int32)

    def _check_ranks_agree(self):
        """One allgather before the first step's buckets are waited on: every rank must have
        the same compressor settings and bucket layout, or the buckets' collectives would never
        pair up (this collective pairs up whatever they hold). True once checked; False where a
        rank has called hvd.join(), which refuses allgathers (checked at a later step)."""
        layout = [(str(p.dtype), tuple(p.shape)) for bucket in self._buckets for p in bucket]
        digest = zlib.crc32(repr((sorted(self._compression.config.__dict__.items()),
                                  self._compression.settings.describe(),
                                  # each bucket's resolved settings: ranks naming parameters
                                  # differently would resolve them differently
                                  [None if c is None else sorted(c.__dict__.items())
                                   for c in self._configs],
                                  [len(b) for b in self._buckets], layout,
                                  str(self._op), self._prefix)).encode())
        try:
            digests = hvd.allgather(torch.tensor([digest], dtype=torch.int64),
                                    name="horovod_tnq.fused.layout",
                                    process_set=self._process_set).tolist()
        except Exception as error:  # Horovod's HorovodInternalError
            if exchange_refused_by_join(error):
                return False
            raise
        if len(set(digests)) > 1:
            raise ValueError(f"ranks built the fused DistributedOptimizer differently (settings, "
                             f"parameters, or the number of fused optimizers made before it; "
                             f"digests by rank {digests}): every rank must use the same model, "
                             "compressor settings and options")
        return True

    def _gradient_ready(self, p):
        if self._delay[p] <= 0:
            raise AssertionError("Gradients were computed more than backward_passes_per_step "
                                 "times before call to step(). Increase "
                                 "backward_passes_per_step to accumulate gradients locally.")
        self._delay[p] -= 1
        if self._delay[p] == 0:
            index = self._bucket_of[p]
            self._waiting[index] -= 1
            if self._waiting[index] == 0:
                self._launch(index)

    def _gradient(self, p):
        """The dense gradient this rank sends for ``p`` (and whether it may be nonzero). As
        Horovod: a missing gradient is sent as zeros (other ranks may have one), and becomes
        the reduced one; a sparse gradient goes by Horovod's sparse allreduce (allgathers of
        its indices and values, uncompressed) unless ``sparse_as_dense``."""
        if p.grad is None:
            p.grad = torch.zeros_like(p)
            return p.grad, False
        grad = p.grad
        if grad.is_sparse:
            if not self._sparse_as_dense:
                self._sparse[p] = hvd.sparse_allreduce_async(
                    grad, name=f"horovod_tnq.{self._prefix}.sparse.{self._parameter_names[p]}",
                    op=self._op, process_set=self._process_set)
                return torch.zeros(p.shape, dtype=p.dtype, device=p.device), False
            grad = grad.to_dense()
        # A gradient that backward produced this step is taken as nonzero; any other (set by
        # hand, or left from an earlier step, as for a parameter frozen after this optimizer
        # was built) is looked at.
        return grad, self._delay[p] < self.backward_passes_per_step or bool(grad.any())

    def _launch(self, index):
        grads = []
        for p in self._buckets[index]:
            grad, nonzero = self._gradient(p)
            self._has_gradient[self._slot[p]] = int(nonzero)
            grads.append(grad.reshape(-1))
        flat = grads[0] if len(grads) == 1 else torch.cat(grads)  # a lone tensor: no copy
        name, config = f"{self._prefix}.{index}", self._configs[index]
        if config is None or flat.numel() < config.min_numel:  # uncompressed: plain Sum
            handle = hvd.allreduce_async(flat, name=name, op=hvd.Sum,
                                         process_set=self._process_set)
            self._compression.state.passthrough(name, flat.numel(),
                                                flat.numel() * flat.element_size())
        else:
            handle = self._compression.start(flat, name, self._process_set, config)
        self._handles[index] = handle, flat

    def synchronize(self):
        """Wait for every bucket's reduced gradients and write them into ``p.grad``; buckets
        whose gradients did not all arrive are sent now, missing gradients as zeros.

        One small allreduce per step counts, for each parameter, the ranks that had a gradient
        for it (a rank in hvd.join() adds zeros), so that a parameter no rank had a gradient for
        gets exactly zero, as in Horovod, instead of the quantization noise of its bucket's
        other gradients; it also marks each rank that took part, which names the joined ranks
        where Horovod ran a bucket's allgather from its response cache under join."""
        if not self._reduces:
            self._synchronized = True
            return
        if not self._agreed:
            self._agreed = self._check_ranks_agree()
        for index in range(len(self._buckets)):
            if index not in self._handles:
                self._launch(index)
        marks = torch.zeros(self._process_set.size(), dtype=torch.int32)
        marks[self._process_set.rank()] = 1
        counts = hvd.allreduce_async(torch.cat([self._has_gradient, marks]), op=hvd.Sum,
                                     name=f"horovod_tnq.{self._prefix}.has_gradient",
                                     process_set=self._process_set)
        reduced, unreadable = {}, None
        for index, (handle, sent) in sorted(self._handles.items()):
            if isinstance(handle, int):
                reduced[index] = wait(handle) * self._scale
                continue
            try:
                # the gradients were encoded when sent: their memory takes the result
                reduced[index] = self._compression.finish(handle, self._scale, out=sent)
            except PayloadError as error:
                unreadable = unreadable or error
        counts = wait(counts).tolist()
        has_gradient, marks = counts[:len(self._slot)], counts[len(self._slot):]
        if unreadable is not None:
            joined = [rank for rank, mark in enumerate(marks) if not mark]
            if joined:
                # Horovod's response cache ran the allgather with a joined rank's zeros (and
                # Horovod 0.28.1's joined rank crashes in any cached allgather, compressed or
                # not): the cache must be off under join
                raise RuntimeError(cached_exchange_under_join(joined, "allgather")) \
                    from unreadable
            raise unreadable
        for index, flat in reduced.items():
            self._write_back(self._buckets[index], flat, has_gradient)
        for p, handle in self._sparse.items():
            p.grad.zero_().add_(handle())
        self._clear_step()
        self._synchronized = True

    def _write_back(self, bucket, flat, has_gradient):
        """The reduced gradients of ``bucket`` (``flat``) into its parameters' ``.grad``; zero
        for those no rank had a gradient for (``has_gradient``: the summed counts)."""
        lone = bucket[0].grad if len(bucket) == 1 else None
        if lone is not None and not lone.is_sparse and has_gradient[self._slot[bucket[0]]]:
            if flat.data_ptr() == lone.data_ptr():
                return  # decoded into the gradient itself
            if flat.dtype == lone.dtype:
                lone.set_(flat.view_as(lone))
                return
        offset = 0
        for p in bucket:
            if p in self._sparse:
                pass  # its own allgathers
            elif not has_gradient[self._slot[p]]:
                p.grad.zero_()
            elif p.grad.is_sparse:
                # sparse_as_dense: back to sparse for the wrapped optimizer, as Horovod does
                # (SparseAdam takes nothing else)
                reduced = flat[offset: offset + p.numel()].view(p.shape).to(p.dtype)
                p.grad.zero_().add_(reduced.to_sparse())
            else:
                p.grad.copy_(flat[offset: offset + p.numel()].view(p.shape))
            offset += p.numel()

    @contextlib.contextmanager
    def skip_synchronize(self):
        """As Horovod's: step() inside this block does not synchronize (call synchronize()
        yourself first, e.g. to clip the reduced gradients)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        if self._should_synchronize:
            if self._synchronized:
                # Horovod's warning, word for word; the gradients are then reduced again
                warnings.warn("optimizer.step() called without "
                              "optimizer.skip_synchronize() context after "
                              "optimizer.synchronize(). This can cause training "
                              "slowdown. You may want to consider using "
                              "optimizer.skip_synchronize() context if you use "
                              "optimizer.synchronize() in your code.")
            self.synchronize()
        self._synchronized = False
        return super(self.__class__, self).step(closure)

    def zero_grad(self, *args, **kwargs):
        if self._handles:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but "
                                 "before optimizer.step() or optimizer.synchronize()")
        return super(self.__class__, self).zero_grad(*args, **kwargs)


def _parameter_names(param_groups, named_parameters):
    """{parameter: name} as Horovod's DistributedOptimizer makes it, refusing what it refuses:
    ``named_parameters`` that are not (name, parameter) tuples, duplicate names, and names for
    only some of the parameters. Without names, parameters are named by position
    (``allreduce.noname.<group>.<index>``), as in Horovod."""
    if named_parameters is None:
        return {p: f"allreduce.noname.{i}.{j}" for i, group in enumerate(param_groups)
                for j, p in enumerate(group["params"])}
    named_parameters = list(named_parameters)
    if any(not isinstance(pair, tuple) for pair in named_parameters):
        raise ValueError("named_parameters should be a sequence of tuples (name, parameter), "
                         "usually produced by model.named_parameters().")
    seen, duplicates = set(), set()
    for name, _ in named_parameters:
        (duplicates if name in seen else seen).add(name)
    if duplicates:
        raise ValueError(f"Parameter names in named_parameters must be unique. Found "
                         f"duplicates: {', '.join(sorted(duplicates))}")
    named = {id(p) for _, p in named_parameters}
    unnamed = [id(p) for group in param_groups for p in group["params"] if id(p) not in named]
    if unnamed:
        raise ValueError(f"named_parameters was specified, but one or more model parameters "
                         f"were not named. Python object ids: {', '.join(map(str, unnamed))}")
    return {p: name for name, p in named_parameters}


def _layout(parameters, groups, bucket_elements, config_of):
    """Buckets of parameters: the user's ``groups`` (a number, or lists of parameters), else
    reverse order (about the order backward produces gradients) cut every ``bucket_elements``
    elements; one dtype per bucket, so each is one flat tensor, and one setting
    (``config_of(p)``: the compressor's overrides), so each is one payload. A group of
    parameters with different settings is split by setting."""
    if isinstance(groups, list):
        buckets = []
        for group in groups:
            by_setting = {}
            for p in group:
                if p.requires_grad:
                    by_setting.setdefault(config_of(p), []).append(p)
            buckets += by_setting.values()
        grouped = {p for bucket in buckets for p in bucket}
        buckets += [[p] for p in reversed(parameters) if p not in grouped]
    else:
        if groups:
            bucket_elements = -(-sum(p.numel() for p in parameters) // groups)
        buckets, sizes = {}, {}
        for p in reversed(parameters):
            key = p.dtype, config_of(p)
            open_bucket = buckets.setdefault(key, [[]])
            if open_bucket[-1] and sizes[key] + p.numel() > bucket_elements:
                open_bucket.append([])
                sizes[key] = 0
            open_bucket[-1].append(p)
            sizes[key] = sizes.get(key, 0) + p.numel()
        buckets = [bucket for by_key in buckets.values() for bucket in by_key]
    for bucket in buckets:
        if len({p.dtype for p in bucket}) > 1:
            raise ValueError("every parameter group of the fused DistributedOptimizer must hold "
                             "a single dtype")
    return [bucket for bucket in buckets if bucket]


def DistributedOptimizer(optimizer, named_parameters=None, compression=TNQCompressor,
                         backward_passes_per_step=1, op=hvd.Average,
                         gradient_predivide_factor=1.0, num_groups=0, groups=None,
                         sparse_as_dense=False, process_set=hvd.global_process_set,
                         bucket_elements=DEFAULT_BUCKET_ELEMENTS):
    """Horovod's DistributedOptimizer, with gradients compressed in fused buckets (see the
    module docstring). Arguments as ``hvd.DistributedOptimizer``, plus ``bucket_elements``;
    ``num_groups`` / ``groups`` set the buckets instead. ``compression`` is a TNQCompressor
    (class or instance; ``get_compressor`` names too); Horovod's own compressors (none, fp16)
    get Horovod's optimizer."""
    if isinstance(compression, type) and issubclass(compression, TNQCompressor):
        compression = compression.default_instance()
    if not isinstance(compression, TNQCompressor):
        if isinstance(compression, Compressor) or (isinstance(compression, type) and
                                                   issubclass(compression, Compressor)):
            return horovod_optimizer.DistributedOptimizer(
                optimizer, named_parameters=named_parameters, compression=compression,
                backward_passes_per_step=backward_passes_per_step, op=op,
                gradient_predivide_factor=gradient_predivide_factor, num_groups=num_groups,
                groups=groups, sparse_as_dense=sparse_as_dense, process_set=process_set)
        raise TypeError(f"compression must be a TNQCompressor or a Horovod compressor, got "
                        f"{compression!r}")
    if op not in (hvd.Average, hvd.Sum):
        raise ValueError("the fused DistributedOptimizer supports op=Average and op=Sum only")
    if op != hvd.Average and gradient_predivide_factor != 1.0:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    if isinstance(backward_passes_per_step, bool) or not isinstance(backward_passes_per_step,
                                                                    int) \
            or backward_passes_per_step < 1:
        raise ValueError(f"backward_passes_per_step must be a positive int, got "
                         f"{backward_passes_per_step!r}")
    if isinstance(bucket_elements, bool) or not isinstance(bucket_elements, int) or \
            bucket_elements < 1:
        raise ValueError(f"bucket_elements must be a positive int, got {bucket_elements!r}")
    # gradient_predivide_factor only splits Average's 1/N between before and after the sum;
    # the compressed exchange scales once, after decoding, so the result is the same.
    #
    # Horovod's broadcast_optimizer_state() recognizes a distributed optimizer by its class's
    # __module__, and then initializes an empty optimizer state with the wrapped optimizer's
    # step() instead of this one's: only the ranks without a loaded state take that step, so
    # the collectives of this step() would never pair up. This class says it is Horovod's kind.
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,),
               dict(_FusedDistributedOptimizer.__dict__,
                    __module__=horovod_optimizer.DistributedOptimizer.__module__))
    return cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step,
               op, gradient_predivide_factor, groups or num_groups, sparse_as_dense,
               process_set, bucket_elements)
