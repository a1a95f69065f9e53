"""The names stock ``horovod.torch`` does not pass to ``compress(tensor)``, read from its frames.

This is the one place where the PyTorch adapter reads Horovod's private frames, and only for the
stock path: ``hvd.DistributedOptimizer(compression=TNQCompressor(...))`` and
``hvd.allreduce(..., compression=...)``. horovod_tnq's own callers pass names: the fused
DistributedOptimizer (optimizer.py) and the DDP hook (ddp.py) name their buckets, and
``compressor.named(...)`` hands a TensorName to compress() for any Horovod collective.

What is read, from Horovod 0.28.1 (protocol.naming.HOROVOD_VERSION):

- the collective's name and process set: the locals ``name`` and ``process_set`` (or
  ``self.process_set``) of the Horovod function that called compress() (_HOROVOD_CALLERS);
- the parameter whose gradient it is: ``p`` in ``_allreduce_grad_async(self, p)`` or in the
  comprehension of its grouped twin (whose optimizer is one frame up), named by the
  optimizer's ``self._parameter_names``.

With another Horovod installed the first read warns once, naming both versions; the
stock-optimizer test (tests/unit/test_horovod_frames.py) fails when these frames change shape,
instead of leaving the gradients silently unnamed.
"""

import sys

from ..protocol.naming import CallSiteName, TensorName, check_horovod_version, collective_in


# Functions of stock horovod.torch that call compress(); each holds the collective's name in a
# local variable ``name`` and its process set in ``process_set`` or ``self.process_set``.
_HOROVOD_CALLERS = {
    "_allreduce_grad_async", "_grouped_allreduce_grad_async", "allreduce", "grouped_allreduce",
}
_OPTIMIZER_MODULE = "horovod.torch.optimizer"


def tensor_name(tensor):
    """The TensorName of ``tensor``, handed to compress() by stock Horovod (call it from
    compress(): the frames read start at its caller)."""
    check_horovod_version()
    frame = sys._getframe(1)
    collective, process_set = _call_site(frame)
    parameter, names = _gradient_owner(tensor, frame)
    return TensorName(collective, parameter, tuple(names or ()), process_set)


def _call_site(frame, max_depth=12):
    """(name, process_set) of the Horovod collective that called compress(), or (None, None).

    Reading the name is what lets the allgather be named like the allreduce it accompanies, so
    ranks that reach their tensors in different orders still pair them correctly. Where nothing
    is found the tensor is unnamed (naming.CollectiveNamer), and payload headers still catch
    mismatched shapes.

    Where a stock optimizer reduces a parameter's gradient (``p`` in its
    ``_allreduce_grad_async`` or in the comprehension of its grouped twin), the name is a
    CallSiteName that also holds the parameter: two models of one compressor may give their
    parameters the same names, and CollectiveNamer keeps their state apart by it.
    """
    parameter = None
    for _ in range(max_depth):
        if frame is None:
            break
        module = frame.f_globals.get("__name__", "")
        if module.startswith("horovod."):
            local = frame.f_locals
            if module == _OPTIMIZER_MODULE:
                parameter = local.get("p", parameter)
            if frame.f_code.co_name in _HOROVOD_CALLERS:
                name, process_set = collective_in(local)
                if name is None or parameter is None:
                    return name, process_set
                return CallSiteName(name, parameter), process_set
        frame = frame.f_back
    return None, None


def _gradient_owner(tensor, frame, max_depth=80):
    """(name, every name) of the parameter whose gradient ``tensor`` is, as the stock optimizer
    that called compress() names them; (None, None) outside one: its
    ``_allreduce_grad_async(self, p)`` (or the comprehension over ``p`` of its grouped twin,
    whose optimizer is one frame up) holds the parameter and ``self._parameter_names``."""
    for _ in range(max_depth):
        if frame is None:
            break
        if frame.f_globals.get("__name__", "") == _OPTIMIZER_MODULE:
            local = frame.f_locals
            parameter = local.get("p")
            if parameter is not None and (getattr(parameter, "grad", None) is tensor or
                                          local.get("tensor") is tensor):
                for scope in (local, frame.f_back.f_locals if frame.f_back else {}):
                    names = getattr(scope.get("self"), "_parameter_names", None)
                    if isinstance(names, dict) and parameter in names:
                        return names[parameter], list(names.values())
        frame = frame.f_back
    return None, None
