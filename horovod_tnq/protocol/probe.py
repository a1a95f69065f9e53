"""The probe: how a compressor learns, from inside Horovod's allreduce, what Horovod would
have done to an uncompressed tensor.

Stock Horovod hands ``compress(tensor)`` to an *allreduce*, but packed codes cannot be summed.
So each compressor returns a three-element probe instead of the gradient; Horovod allreduces
the probe with the caller's op, prescale and postscale factors, and ``reduction_scale`` reads
from the result the factor to apply to the sum of the decoded payloads. op=Average, op=Sum,
``gradient_predivide_factor`` and pre/postscale factors then come out exactly as Horovod
applies them to an uncompressed tensor.
"""


import zlib

# The probe's last two elements: a code c for how this rank cuts and sends the tensor, and c**2.
# Codes are small integers, so their sums are exact in float32.
PLAN_CODES = 16


def plan_code(kind, bounds):
    """The code of a tensor's exchange ``kind`` and payload ``bounds`` (plan.plan): ranks whose
    settings cut or send it differently (exchange, part_elements, bucket_size) get different
    codes, except for a 1-in-16 collision."""
    layout = repr((kind, [tuple(bound) for bound in bounds])).encode()
    return 1 + zlib.crc32(layout) % PLAN_CODES


def probe_values(rank, code):
    """What each rank contributes to the probe allreduce (``code``: plan_code)."""
    return [1.0, float(rank + 1), float(code), float(code * code)]


UNSUPPORTED_OP = "horovod_tnq compressors support op=Average and op=Sum only"
PROBE_TOLERANCE = 1e-3
MISMATCH = ("ranks cut or send this tensor differently (exchange, part_elements or "
            "bucket_size differ): all ranks must use the same compressor settings")


def reduction_scale(probe, size, code):
    """Factor to multiply the *sum* of decoded payloads by, from the allreduced probe.

    Horovod returns postscale * reduce(prescale * probe). With probe = [1, rank + 1, c, c**2]:
    op=Sum gives k * [N, N (N + 1) / 2, ...] and op=Average k * [1, (N + 1) / 2, ...], with k
    the product of the scale factors. Both have ratio (N + 1) / 2, and probe[0] / N is k / N
    for Average and k for Sum: exactly the factor Horovod would apply to the summed gradients.
    Min, Max, Product and Adasum give other ratios (for N > 1) and are refused.

    The last two elements check that every rank planned the same exchange and payloads (c,
    plan_code): ranks configured differently could otherwise wait forever, one in an allgather
    and another in an alltoall, or in allgathers of parts the others never send, which Horovod
    sees as unrelated collectives. The mean of c must be this rank's c and the spread
    mean(c**2) - mean(c)**2 zero (a rank off by one among N moves it by about 1/N). The
    probe's allreduce completes either way, so this raises on every rank before any waits.
    """
    first, second, third, fourth = (float(value) for value in probe)
    expected_ratio = (size + 1) / 2.0
    if size > 1 and (first == 0 or
                     abs(second / first - expected_ratio) > PROBE_TOLERANCE * expected_ratio):
        raise ValueError(f"{UNSUPPORTED_OP} (the allreduced probe {[first, second]} matches "
                         f"neither for {size} ranks)")
    mean, spread = third / first, fourth / first - (third / first) ** 2
    # Codes are integers: one rank off by d among N moves the mean by d / N and the spread by
    # about d**2 / N, so the bound shrinks with N (float32 rounding stays near 1e-5 here).
    tolerance = min(PROBE_TOLERANCE * code, 0.5 / max(size, 1))
    if abs(mean - code) > tolerance or spread > tolerance:
        raise ValueError(f"{MISMATCH} (this rank's plan code {code}, mean across ranks "
                         f"{mean:.4f}, spread {spread:.4f})")
    return first / size
