"""Shared by tests/unit and tests/horovodrun.

Triton is loaded first, before any test module imports TensorFlow: both carry LLVM, and Triton
loaded after TensorFlow aborts the process (the other order works). Without a GPU the kernels
run under Triton's interpreter, which must be chosen before triton is imported."""

import os

try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton  # noqa: F401
except ImportError:  # the GPU kernels' tests skip themselves
    pass
