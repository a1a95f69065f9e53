"""The names stock ``horovod.tensorflow`` does not pass to ``compress(tensor)``, read from its
frames.

This is the one place where the TensorFlow adapter reads Horovod's private frames, and only for
the stock path: ``hvd.DistributedGradientTape``, the DistributedOptimizers of
``horovod.tensorflow`` and ``horovod.tensorflow.keras`` (Keras 2), and
``hvd.allreduce(..., compression=...)``. horovod_tnq's own Keras 3 DistributedOptimizer
(keras.py) passes each gradient's names with ``compressor.named(...)``.

What is read, from Horovod 0.28.1 (protocol.naming.HOROVOD_VERSION):

- the collective's name and process set: the locals ``name`` and ``process_set`` (or
  ``self.process_set``) of the Horovod function that called compress() (_HOROVOD_CALLERS);
  inside tf.function AutoGraph runs converted copies of them (``tf__allreduce``) a few frames
  further up;
- the variable whose gradient it is: ``allreduce_grads(grads, vars)`` (behind
  DistributedGradientTape and the DistributedOptimizers) holds the gradients beside their
  variables, some 40 frames up inside tf.function, and its comprehension over the gradients
  holds the gradient's position ``i``, which tells apart variables that TF gave one gradient
  tensor (a and b of (a + b) * x).

With another Horovod installed the first read warns once, naming both versions; the
stock-tape test (tests/unit/test_horovod_frames.py) fails when these frames change shape,
instead of leaving the gradients silently unnamed.
"""

import sys

from ..protocol.naming import TensorName, check_horovod_version, collective_in, variable_name


# Functions of stock horovod.tensorflow that call compress(), or whose converted copies do;
# each holds the collective's name in a local variable ``name`` and its process set in
# ``process_set`` or ``self.process_set``.
_HOROVOD_CALLERS = {
    "allreduce", "grouped_allreduce", "_allreduce_cond", "_grouped_allreduce_cond",
    "allreduce_grads",
}


def tensor_name(tensor):
    """The TensorName of ``tensor`` (before any conversion: it is found by identity), handed to
    compress() by stock Horovod (call it from compress(): the frames read start at its
    caller)."""
    check_horovod_version()
    frame = sys._getframe(1)
    parameter, names = _gradient_owner(tensor, frame)
    collective, process_set = _call_site(frame)
    return TensorName(collective, parameter, tuple(names or ()), process_set)


def _call_site(frame, max_depth=12):
    """(name, process_set) of the Horovod collective that called compress(), or (None, None).

    Reading the name is what lets the allgather be named like the allreduce it accompanies, so
    ranks that reach their tensors in different orders still pair them correctly. Where nothing
    is found the caller falls back to Horovod's own convention (the graph tensor name in
    graphs, an unnamed tensor eagerly: naming.CollectiveNamer), and payload headers still catch
    mismatched shapes."""
    for _ in range(max_depth):
        if frame is None:
            break
        if frame.f_globals.get("__name__", "").startswith("horovod."):
            function = frame.f_code.co_name
            if function.startswith("tf__"):
                function = function[len("tf__"):]
            if function in _HOROVOD_CALLERS:
                return collective_in(frame.f_locals)
        frame = frame.f_back
    return None, None


def _gradient_owner(tensor, frame, max_depth=80):
    """(name, every name) of the variable whose gradient ``tensor`` is, as Horovod's
    ``allreduce_grads(grads, vars)`` names them (naming.variable_name); (None, None) outside
    it."""
    position = variable = None
    for _ in range(max_depth):
        if frame is None:
            break
        if frame.f_globals.get("__name__", "").startswith("horovod."):
            local = frame.f_locals
            if local.get("grad") is tensor:
                # the comprehension over the gradients: its position tells apart variables
                # that TF gave one gradient tensor, e.g. a and b of (a + b) * x
                position = local.get("i") if isinstance(local.get("i"), int) else position
                variable = local.get("var", variable)
            grads, variables = local.get("grads"), local.get("vars")
            if isinstance(grads, (list, tuple)) and isinstance(variables, (list, tuple)):
                matches = [j for j, grad in enumerate(grads[:len(variables)]) if grad is tensor]
                if matches:
                    if variable is None:
                        variable = variables[position if position in matches else matches[0]]
                    return variable_name(variable), [variable_name(v) for v in variables]
        frame = frame.f_back
    return None, None
