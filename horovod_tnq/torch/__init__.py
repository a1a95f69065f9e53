"""PyTorch adapter: TNQ compression for stock ``horovod.torch``.

    import horovod.torch as hvd
    from horovod_tnq.torch import TNQCompressor
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=TNQCompressor(bits=3))

or, with gradients fused into a few compressed buckets per step (faster; same signature):

    import horovod_tnq.torch as tnq
    optimizer = tnq.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=TNQCompressor(bits=3))

or, in PyTorch DDP (torchrun), as a communication hook on the same codec (ddp.py):

    from horovod_tnq.torch import TNQHookState, tnq_hook
    ddp_model.register_comm_hook(TNQHookState(bits=3), tnq_hook)
"""

from ..gpu.codec import preload as _preload_triton
from ..protocol import compressor_registry as _compressor_registry
from ..protocol.metrics import scalars as _scalars

_preload_triton()  # before anything imports TensorFlow (gpu/codec.py: preload)

# Horovod is imported with the first name that needs it, so that the DDP hook (ddp.py) works
# where Horovod is not installed.
_LAZY = {"TNQCompressor": "compressor", "DistributedOptimizer": "optimizer",
         "TNQHookState": "ddp", "tnq_hook": "ddp"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_compressor(name, **options):
    from horovod.torch.compression import Compression

    from .compressor import TNQCompressor
    return _compressor_registry(TNQCompressor, Compression)(name, **options)


get_compressor.__doc__ = _compressor_registry(None, None).__doc__


def log_metrics(writer, compressor, step, per_tensor=True):
    """Write ``compressor.metrics()`` to a ``torch.utils.tensorboard.SummaryWriter`` at
    ``step``: the last step's and the running totals' bytes, bits per element, seconds and
    estimated relative error under ``horovod_tnq/step/`` and ``horovod_tnq/total/``, and each
    tensor's bits and error under ``horovod_tnq/tensors/<name>/`` (``per_tensor``). Call it
    after ``optimizer.step()``, on the ranks you log from (each rank's numbers are its own)."""
    for tag, value in _scalars(compressor.metrics(), per_tensor):
        writer.add_scalar(tag, value, step)


__all__ = ["DistributedOptimizer", "TNQCompressor", "TNQHookState", "get_compressor", "log_metrics",
           "tnq_hook"]
