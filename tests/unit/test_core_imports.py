"""The core and the protocol import numpy only (docs/design.md's layout): no framework, no Triton,
no Horovod, so a process that uses neither framework (the simulator, a new adapter) pays for
none and cannot have its library loading changed by them (horovod_tnq.gpu's Triton preload is
the PyTorch adapter's, made when it is imported)."""

import subprocess
import sys

HEAVY = ("torch", "triton", "tensorflow", "horovod", "jax")


def test_core_and_protocol_import_no_framework():
    code = ("import sys, horovod_tnq, horovod_tnq.core, horovod_tnq.protocol, "
            "horovod_tnq.protocol.exchange, horovod_tnq.protocol.hosts\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_the_gpu_codec_imports_without_triton_as_a_module_of_its_own():
    """horovod_tnq.gpu is beside the core, not in it: importing the core never imports it."""
    code = ("import sys, horovod_tnq.core\n"
            "print('horovod_tnq.gpu' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, check=True)
    assert result.stdout.strip() == "False", result.stdout + result.stderr


def test_the_ddp_hook_imports_without_horovod():
    """A DDP user need not install Horovod: horovod_tnq.torch imports Horovod with the first name
    that needs it (TNQCompressor, DistributedOptimizer, get_compressor), the hook never."""
    code = ("import sys\n"
            "sys.modules['horovod'] = None  # as if not installed: importing it fails\n"
            "import horovod_tnq.torch as tnq\n"
            "from horovod_tnq.torch import TNQHookState, tnq_hook\n"
            "state = TNQHookState(bits=3)\n"
            "try:\n"
            "    tnq.TNQCompressor\n"
            "except ImportError as error:\n"
            "    print('refused:', 'horovod' in str(error))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "refused: True", result.stdout + result.stderr[-2000:]
