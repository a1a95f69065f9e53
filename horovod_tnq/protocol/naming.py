"""Naming each tensor's collectives identically on every rank (no framework imports)."""

import sys
import threading


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


# modules whose optimizers reduce gradients next to their parameters (see gradient_owner)
_OPTIMIZER_MODULES = ("horovod.", "horovod_tnq.tensorflow.keras")


def gradient_owner(tensor, max_depth=80):
    """(name, every name) of the parameter or variable whose gradient ``tensor`` is, as the
    Horovod optimizer that called compress() names them; (None, None) outside one.

    Per-tensor settings (overrides.py) match these names, which Horovod does not pass to
    compress() either: PyTorch's ``_allreduce_grad_async(self, p)`` (and the comprehension over
    ``p`` of its grouped twin, whose optimizer is one frame up) holds the parameter and
    ``self._parameter_names``; TensorFlow's ``allreduce_grads(grads, vars)`` (behind
    DistributedGradientTape and the DistributedOptimizers) holds the gradients beside their
    variables, some 40 frames up inside tf.function (AutoGraph's converted calls), as does
    horovod_tnq's Keras 3 optimizer. Tested against Horovod 0.28.1.
    """
    frame = sys._getframe(1)
    position = variable = None
    for _ in range(max_depth):
        if frame is None:
            break
        if frame.f_globals.get("__name__", "").startswith(_OPTIMIZER_MODULES):
            local = frame.f_locals
            parameter = local.get("p")
            if parameter is not None and (getattr(parameter, "grad", None) is tensor or
                                          local.get("tensor") is tensor):
                for scope in (local, frame.f_back.f_locals if frame.f_back else {}):
                    names = getattr(scope.get("self"), "_parameter_names", None)
                    if isinstance(names, dict) and parameter in names:
                        return names[parameter], list(names.values())
            if local.get("grad") is tensor:
                # the comprehension over the gradients: its position, or (Keras 3 wrapper) its
                # variable, tells apart variables that TF gave one gradient tensor, e.g. a and
                # b of (a + b) * x
                position = local.get("i") if isinstance(local.get("i"), int) else position
                variable = local.get("var", variable)
            grads, variables = local.get("grads"), local.get("vars")
            if isinstance(grads, (list, tuple)) and isinstance(variables, (list, tuple)):
                matches = [j for j, grad in enumerate(grads[:len(variables)]) if grad is tensor]
                if matches:
                    if variable is None:
                        variable = variables[position if position in matches else matches[0]]
                    return _variable_name(variable), [_variable_name(v) for v in variables]
        frame = frame.f_back
    return None, None


def _variable_name(variable):
    """A TF variable's name without its ":0" (Keras 3 variables: their path)."""
    name = getattr(variable, "path", None) or getattr(variable, "name", "")
    return name.rsplit(":", 1)[0] if ":" in name else name


class CollectiveNamer:
    """Names allgathers uniquely among those in flight, identically on every rank.

    A grouped allreduce compresses several tensors under one Horovod name, so each gets the index
    of its turn among the tensors of that name still in flight; names then repeat from step to
    step (Horovod's response cache stays useful). Tensors Horovod did not name are numbered in
    the order this rank compresses them (``anonymous``, saved with the compressor's state).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._in_flight = {}
        self.anonymous = 0

    def acquire(self, name):
        """(base name, collective name) for a tensor Horovod calls ``name`` (or None)."""
        with self._lock:
            if name is None:
                name = f"noname.{self.anonymous}"
                self.anonymous += 1
            index = self._in_flight.get(name, 0)
            self._in_flight[name] = index + 1
            return name, f"tnq.{name}.{index}"

    def release(self, name):
        with self._lock:
            left = self._in_flight.get(name, 0) - 1
            if left > 0:
                self._in_flight[name] = left
            else:
                self._in_flight.pop(name, None)

    def __getstate__(self):  # picklable: the lock and what is in flight stay behind
        return {"anonymous": self.anonymous}

    def __setstate__(self, state):
        self.__init__()
        self.anonymous = state["anonymous"]
