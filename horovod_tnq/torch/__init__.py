"""PyTorch adapter: TNQ compression for stock ``horovod.torch``.

    import horovod.torch as hvd
    from horovod_tnq.torch import TNQCompressor
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=TNQCompressor(bits=3))

or, with gradients fused into a few compressed buckets per step (faster; same signature):

    import horovod_tnq.torch as tnq
    optimizer = tnq.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=TNQCompressor(bits=3))
"""

from horovod.torch.compression import Compression as _Compression

from ..protocol import compressor_registry as _compressor_registry
from .compressor import TNQCompressor
from .optimizer import DistributedOptimizer


get_compressor = _compressor_registry(TNQCompressor, _Compression)

__all__ = ["DistributedOptimizer", "TNQCompressor", "get_compressor"]
