"""GPU backend of the codec (Triton): "tnq-rht" and "tnq" payloads encoded and decode-summed on the
device, byte for byte what core.codec produces (see codec.py and kernels.py).

Importable without triton or torch: ``available()`` is then False and encode / decode_sum raise
a RuntimeError saying what is missing. A kernel that fails to compile or launch raises
KernelError (a RuntimeError). Kernels run compiled on CUDA tensors, or on CPU tensors
under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported).
"""

from .codec import SCHEMES, KernelError, available, decode_sum, encode

__all__ = ["SCHEMES", "KernelError", "available", "decode_sum", "encode"]
