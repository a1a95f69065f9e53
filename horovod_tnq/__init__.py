"""TNQ (Truncated Non-uniform Quantization) gradient compression for Horovod.

``horovod_tnq.core`` is the framework-free numpy core; ``horovod_tnq.torch`` and
``horovod_tnq.tensorflow`` provide Horovod compressors built on it.
"""

from .protocol import CompressorConfig

__version__ = "0.1.0"
__all__ = ["CompressorConfig", "__version__"]
