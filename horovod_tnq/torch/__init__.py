"""PyTorch adapter: TNQ compression for stock ``horovod.torch``.

    import horovod.torch as hvd
    from horovod_tnq.torch import TNQCompressor
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=TNQCompressor(bits=3))
"""

from .compressor import TNQCompressor

__all__ = ["TNQCompressor"]
