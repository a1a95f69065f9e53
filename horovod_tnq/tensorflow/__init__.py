"""TensorFlow adapter: TNQ compression for stock ``horovod.tensorflow`` and its Keras API.

    import horovod.tensorflow as hvd
    from horovod_tnq.tensorflow import TNQCompressor
    tape = hvd.DistributedGradientTape(tape, compression=TNQCompressor(bits=3))
"""

from horovod.tensorflow.compression import Compression as _Compression

from ..protocol import compressor_registry as _compressor_registry
from .compressor import TNQCompressor


get_compressor = _compressor_registry(TNQCompressor, _Compression)

__all__ = ["TNQCompressor", "get_compressor"]
