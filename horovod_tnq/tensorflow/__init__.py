"""TensorFlow adapter: TNQ compression for stock ``horovod.tensorflow`` and its Keras API.

    import horovod.tensorflow as hvd
    from horovod_tnq.tensorflow import TNQCompressor
    tape = hvd.DistributedGradientTape(tape, compression=TNQCompressor(bits=3))
"""

import warnings

from horovod.tensorflow.compression import Compression as _Compression

from ..protocol import compressor_registry as _compressor_registry
from ..protocol.metrics import scalars as _scalars
from .compressor import TNQCompressor


get_compressor = _compressor_registry(TNQCompressor, _Compression)


def log_metrics(writer, compressor, step=None, per_tensor=True):
    """Write ``compressor.metrics()`` with ``tf.summary.scalar`` at ``step``, to ``writer`` (a
    ``tf.summary.create_file_writer(...)``; None: the default writer): the tags and the
    argument order of horovod_tnq.torch.log_metrics. Call it eagerly, after the training step
    (in graphs the numbers would be those of tracing time).

    The positional order before, ``log_metrics(compressor, step[, writer])``, still works with
    a DeprecationWarning."""
    import tensorflow as tf

    if hasattr(writer, "metrics"):  # (compressor, step[, writer])
        warnings.warn("log_metrics(compressor, step, writer) is deprecated: call "
                      "log_metrics(writer, compressor, step), as horovod_tnq.torch's",
                      DeprecationWarning, stacklevel=2)
        writer, compressor, step = step, writer, compressor
    if step is None:
        raise TypeError("log_metrics(writer, compressor, step) needs the step")

    def write():
        for tag, value in _scalars(compressor.metrics(), per_tensor):
            tf.summary.scalar(tag, value, step=step)

    if writer is None:
        write()
    else:
        with writer.as_default():
            write()


__all__ = ["TNQCompressor", "get_compressor", "log_metrics"]
