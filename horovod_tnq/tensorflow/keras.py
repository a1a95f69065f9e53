"""TNQ for Keras 3 ``model.fit`` (TensorFlow 2.21's default Keras), which
``horovod.tensorflow.keras`` does not support: it was written for Keras 2 (``tf-keras`` with
``TF_USE_LEGACY_KERAS=1``), and there the stock
``hvd.DistributedOptimizer(opt, compression=TNQCompressor(...))`` works as is.

    from horovod_tnq.tensorflow import TNQCompressor, keras as tnq_keras
    optimizer = tnq_keras.DistributedOptimizer(keras.optimizers.SGD(0.1),
                                               compression=TNQCompressor(bits=3))
    model.compile(optimizer=optimizer, loss=..., jit_compile=False)  # Horovod ops are not XLA
    tnq_keras.broadcast_variables(model, root_rank=0)               # after the model is built
    model.fit(...)
"""

import re

import horovod.tensorflow as hvd

from ..protocol.naming import variable_name
from .compressor import TNQCompressor


def _collective_name(variable):
    return "keras3." + re.sub(r"[^A-Za-z0-9_.]", "_", variable.path)


def _named(compression, variable, names):
    """``compression`` told the names of ``variable``'s gradient: its collective's, its own
    (which overrides match) and every variable's; Horovod's own compressors as they are."""
    if isinstance(compression, TNQCompressor) or (isinstance(compression, type) and
                                                  issubclass(compression, TNQCompressor)):
        return compression.named(_collective_name(variable), variable_name(variable), names)
    return compression


def DistributedOptimizer(optimizer, compression=None, op=hvd.Average):
    """Wrap a Keras 3 optimizer so every gradient is reduced across Horovod ranks (with TNQ by
    default) before the update. Returns an optimizer of a subclass of the original's class, with
    the same configuration."""
    compression = compression or TNQCompressor()
    base = type(optimizer)

    class _Distributed(base):
        def apply(self, grads, trainable_variables=None):
            # each gradient's names passed to the compressor (no frames read)
            variables = trainable_variables if trainable_variables is not None else \
                self._trainable_variables
            names = tuple(variable_name(variable) for variable in variables)
            grads = list(grads)
            reduced = [None if grad is None else
                       hvd.allreduce(grad, name=_collective_name(variable), op=op,
                                     compression=_named(compression, variable, names))
                       for grad, variable in zip(grads, variables)]
            return super().apply(reduced, trainable_variables)

    _Distributed.__name__ = f"Distributed{base.__name__}"
    return _Distributed.from_config(optimizer.get_config())


def broadcast_variables(model, root_rank=0):
    """Copy root_rank's weights (and optimizer state, if built) to every rank."""
    variables = list(model.variables)
    if getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    for variable in variables:
        variable.assign(hvd.broadcast(variable.value, root_rank,
                                      name="broadcast." + _collective_name(variable)))
