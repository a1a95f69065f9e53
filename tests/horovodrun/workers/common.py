"""What several workers share (imported as a sibling module; tests/unit/test_gpu_fallback.py
imports it as horovodrun.workers.common): checking that a call raises, a relative error, and a
GPU kernel made to fail."""


def expect_error(function):
    """What ``function()`` raised: its type's name and message (what the tests check)."""
    try:
        function()
    except Exception as exc:  # the message is what the test checks
        return {"raised": type(exc).__name__, "message": str(exc)}
    return {"raised": None}


def relative_error(result, reference):
    """||result - reference|| / ||reference|| of two torch tensors, in float64."""
    return float((result.double() - reference.double()).norm() /
                 reference.double().norm().clamp_min(1e-30))


class FailingKernel:
    """A kernel whose launch raises, as Triton does when it cannot compile for a device."""

    def __init__(self, kernel):
        self.fn = kernel.fn

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("forced: PTX assembly failed")
        return launch
