"""What the PyTorch DistributedDataParallel workers share (digits_worker_ddp.py, and lm_worker.py
for a ``framework=ddp`` spec): the process group, the communication hook a spec names, a count of
the bytes the hooks hand to allreduce, and the collectives the benchmark loop needs.

This is what a PyTorch user who does not use this project runs on a slow network: DDP over Gloo
(CPU), started by torchrun on every host, with one of PyTorch's own hooks (jobs.DDP_HOOKS):

- ``none``: no hook, DDP's built-in C++ reducer (fp32 bucket allreduce);
- ``fp16``: ``default_hooks.fp16_compress_hook`` (buckets cast to float16 and allreduced);
- ``powersgd[:rank=R,...]``: ``powerSGD_hook`` with a ``PowerSGDState`` of
  matrix_approximation_rank R (default 1), error feedback and warm start on (PyTorch's
  defaults and its docs' advice), and start_powerSGD_iter = the caller's ``start_iter``: plain
  allreduce before it, as the docs recommend for the first steps, and at least 2, the
  smallest PyTorch allows with error feedback (DDP rebuilds its buckets after step 1). Any
  other option is passed to PowerSGDState as is (e.g. ``min_compression_rate=1``);
- ``noop``: ``debugging_hooks.noop_hook``, which hands each bucket back unsent: every rank
  trains alone, so its accuracy means nothing, but its step is DDP's with no communication,
  the fastest any hook could make it (the ceiling a hook's samples/s can reach).

and this project's codec on the same engine, so that codecs are compared on one engine
(issue 26): any horovod_tnq scheme name (``tnq-rht:bits=2``, ``tnq:bits=4``, ...) registers
``horovod_tnq.torch.ddp.tnq_hook`` with a ``TNQHookState`` of those settings (DDP's default
buckets: the hook issues its collectives from the hook itself, in bucket order).
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import (debugging_hooks, default_hooks,
                                                        powerSGD_hook)

from benchmarks.jobs import DDP_HOOKS


# PowerSGD's hook issues its second and third allreduce from its futures' callbacks, which run on
# Gloo's threads as each bucket's previous collective completes; with several buckets those calls
# can reach the process group in a different order on each rank, and Gloo pairs collectives by
# call order: measured here, DDP's default buckets crash the first PowerSGD step with "Received
# data size doesn't match expected size" (524 vs 512 bytes). One bucket for the whole model keeps
# one chain of collectives per step, the same order everywhere; what a Gloo user has to do.
ONE_BUCKET_MB = 4096
# PyTorch's hooks that take no state and no options
STATELESS_HOOKS = {"fp16": default_hooks.fp16_compress_hook, "noop": debugging_hooks.noop_hook}


def init_from_env():
    """Join the Gloo process group that torchrun describes (MASTER_ADDR, MASTER_PORT, RANK,
    WORLD_SIZE); (rank, world size)."""
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def end_process():
    """End a torch.distributed worker whose results are written: flush its output and leave
    without the interpreter's finalization.

    Why: with Gloo, PyTorch 2.13 aborts a process about 1 exit in 40 here (more on a loaded
    machine), after everything it had to do is done, with "terminate called without an active
    exception". The backtrace (gdb, tests/horovodrun/workers/ddp_hook_nodes.py): a
    ``pt_gloo_runloop`` thread drops a finished allgather's work; releasing its tensor, which
    Python has seen, releases the tensor's Python object too (c10's intrusive_ptr, on its count
    going from 2 to 1), which takes the GIL; while the interpreter finalizes that ends the
    thread, and the unwinding through a noexcept destructor calls std::terminate.
    ``destroy_process_group()`` does not stop Gloo's threads (still running after it, with or
    without a communication hook), so it does not help; PyTorch's own fix (an exit handler,
    pytorch/pytorch PR 179291) was withdrawn and issue 190489 is open. Skipping finalization
    removes the race; a job's outcome is its reports, which are closed before this."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class HandedBytes:
    """Bytes handed to ``dist.all_reduce`` from Python, so far: what fp16_compress_hook and
    powerSGD_hook send (they call it through the module at call time, from the hook and from
    its future's callbacks). DDP's built-in reducer allreduces in C++, unseen here."""

    def __init__(self):
        self.total = 0
        all_reduce = dist.all_reduce

        def counted(tensor, *args, **kwargs):
            self.total += tensor.numel() * tensor.element_size()
            return all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counted


class HookBytes:
    """Bytes ``tnq_hook`` handed to torch.distributed so far: its payloads and the buckets it
    passed through uncompressed, as its metrics()["counters"] count them."""

    def __init__(self, state):
        self._state = state

    @property
    def total(self):
        counters = self._state.metrics()["counters"]
        return counters["payload_bytes"] + counters["passthrough_bytes"]


def wrap(model, name, options, start_iter=2):
    """(``model`` in DistributedDataParallel with the hook of spec ``name``/``options``, a
    HandedBytes or HookBytes, or None where the built-in reducer sends: 4 bytes a parameter
    per step).
    DDP broadcasts rank 0's parameters, so every rank starts from the same model."""
    options = dict(options)
    bucket_mb = options.pop("bucket_mb", ONE_BUCKET_MB if name == "powersgd" else None)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_mb)
    if name == "none":
        if options:
            raise ValueError(f"DDP without a hook takes no options, got {options}")
        return ddp_model, None
    if name not in DDP_HOOKS:  # horovod_tnq's
        from horovod_tnq.torch.ddp import TNQHookState, tnq_hook

        # (the unwrapped model's names: what overrides' patterns match on Horovod's workers)
        state = TNQHookState(scheme=name, named_parameters=model.named_parameters(), **options)
        ddp_model.register_comm_hook(state, tnq_hook)
        return ddp_model, HookBytes(state)
    handed = HandedBytes()
    if name in STATELESS_HOOKS:
        if options:
            raise ValueError(f"{name} takes no options, got {options}")
        ddp_model.register_comm_hook(None, STATELESS_HOOKS[name])
    elif name == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=options.pop("rank", 1),
            start_powerSGD_iter=max(2, start_iter), use_error_feedback=True, warm_start=True,
            **options)
        ddp_model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    return ddp_model, handed


def barrier(_name):
    dist.barrier()


def allgather_object(value):
    """Every rank's ``value``, in rank order."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone
