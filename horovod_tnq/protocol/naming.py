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
