"""TensorFlow adapter: TNQ compression for stock ``horovod.tensorflow`` and its Keras API.

    import horovod.tensorflow as hvd
    from horovod_tnq.tensorflow import TNQCompressor
    tape = hvd.DistributedGradientTape(tape, compression=TNQCompressor(bits=3))
"""

from .compressor import TNQCompressor

__all__ = ["TNQCompressor"]
