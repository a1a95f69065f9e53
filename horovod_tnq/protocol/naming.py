"""Naming each tensor's collectives identically on every rank (no framework imports)."""

import sys
import threading
import weakref


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

    Where a stock PyTorch optimizer reduces a parameter's gradient (``p`` in its
    ``_allreduce_grad_async`` or in the comprehension of its grouped twin), the name is a
    CallSiteName that also holds the parameter: two models of one compressor may give their
    parameters the same names, and CollectiveNamer keeps their state apart by it.
    """
    frame = sys._getframe(1)
    parameter = None
    for _ in range(max_depth):
        if frame is None:
            break
        module = frame.f_globals.get("__name__", "")
        function = frame.f_code.co_name
        if function.startswith("tf__"):
            function = function[len("tf__"):]
        if module.startswith("horovod."):
            local = frame.f_locals
            if module == "horovod.torch.optimizer":
                parameter = local.get("p", parameter)
            if function in _HOROVOD_CALLERS:
                process_set = local.get("process_set")
                owner = local.get("self")
                if process_set is None and owner is not None:
                    process_set = getattr(owner, "process_set", None)
                name = local.get("name")
                if not isinstance(name, str) or not name:
                    return None, process_set
                return (name if parameter is None else CallSiteName(name, parameter)), \
                    process_set
        frame = frame.f_back
    return None, None


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
