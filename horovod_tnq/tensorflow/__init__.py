"""TensorFlow adapter: TNQ compression for stock ``horovod.tensorflow`` and its Keras API.

    import horovod.tensorflow as hvd
    from horovod_tnq.tensorflow import TNQCompressor
    tape = hvd.DistributedGradientTape(tape, compression=TNQCompressor(bits=3))
"""

from horovod.tensorflow.compression import Compression as _Compression

from ..protocol import compressor_registry as _compressor_registry
from ..protocol.metrics import scalars as _scalars
from .compressor import TNQCompressor


get_compressor = _compressor_registry(TNQCompressor, _Compression)


def log_metrics(compressor, step, writer=None, per_tensor=True):
    """Write ``compressor.metrics()`` with ``tf.summary.scalar`` at ``step``, to ``writer`` (a
    ``tf.summary.create_file_writer(...)``) or the default writer: the tags of
    horovod_tnq.torch.log_metrics. Call it eagerly, after the training step (in graphs the
    numbers would be those of tracing time)."""
    import tensorflow as tf

    def write():
        for tag, value in _scalars(compressor.metrics(), per_tensor):
            tf.summary.scalar(tag, value, step=step)

    if writer is None:
        write()
    else:
        with writer.as_default():
            write()


__all__ = ["TNQCompressor", "get_compressor", "log_metrics"]
