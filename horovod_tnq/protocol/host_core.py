"""The host codec's two calls into the core, behind one replaceable object: the seam through which
tools stand in for the core (benchmarks/worker_common.py replays payloads to measure the exchange
without the codec's cost, and times the calls inside TensorFlow's graph).

Every payload the host codec makes goes through ``HOST_CORE.encode``, with ``core.encode``'s
signature (``CompressorState.encode``: the TensorFlow adapter, PyTorch's CPU tensors, the DDP
hook's host path and the GPU codec's fallback to the host), and every sum of received payloads
it decodes through ``HOST_CORE.decode_sum``, with ``core.decode_sum``'s (``NumpyCodec.decode_sum``).
The GPU kernels (gpu/) do not go through it, nor does the decode of a rank's own payload for
its error-feedback residual.

``HOST_CORE.replace(encode=..., decode_sum=...)`` installs other functions for this process (a
replacement usually wraps the one it replaces, read from ``HOST_CORE`` first) and returns a
function that puts back what was there. A tool only: a replacement that makes other bytes than
the core's breaks the ranks' agreement, which the library does not check.
"""

from .. import core


class HostCore:
    """``encode`` and ``decode_sum``: the functions the host codec calls (the core's, unless
    replaced)."""

    def __init__(self):
        self.encode = core.encode
        self.decode_sum = core.decode_sum

    def replace(self, encode=None, decode_sum=None):
        """Use ``encode`` and/or ``decode_sum`` (None: keep the current one) from now on; returns
        a function that restores the two in use before this call."""
        previous = self.encode, self.decode_sum
        if encode is not None:
            self.encode = encode
        if decode_sum is not None:
            self.decode_sum = decode_sum

        def restore():
            self.encode, self.decode_sum = previous
        return restore


HOST_CORE = HostCore()
