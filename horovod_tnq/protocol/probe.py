"""The probe: how a compressor learns, from inside Horovod's allreduce, what Horovod would
have done to an uncompressed tensor.

Stock Horovod hands ``compress(tensor)`` to an *allreduce*, but packed codes cannot be summed.
So each compressor returns a three-element probe instead of the gradient; Horovod allreduces
the probe with the caller's op, prescale and postscale factors, and ``reduction_scale`` reads
from the result the factor to apply to the sum of the decoded payloads. op=Average, op=Sum,
``gradient_predivide_factor`` and pre/postscale factors then come out exactly as Horovod
applies them to an uncompressed tensor.
"""


# The probe's third element: which exchange this rank started for the tensor.
EXCHANGE_CODES = {"allgather": 1.0, "reduce-scatter": 2.0}


def probe_values(rank, kind="allgather"):
    """What each rank contributes to the probe allreduce."""
    return [1.0, float(rank + 1), EXCHANGE_CODES[kind]]


UNSUPPORTED_OP = "horovod_tnq compressors support op=Average and op=Sum only"
PROBE_TOLERANCE = 1e-3


def reduction_scale(probe, size, kind="allgather"):
    """Factor to multiply the *sum* of decoded payloads by, from the allreduced probe.

    Horovod returns postscale * reduce(prescale * probe). With probe = [1, rank + 1, c]:
    op=Sum gives k * [N, N (N + 1) / 2, N c] and op=Average k * [1, (N + 1) / 2, c], with k the
    product of the scale factors. Both have ratio (N + 1) / 2, and probe[0] / N is k / N for
    Average and k for Sum: exactly the factor Horovod would apply to the summed gradients. Min,
    Max, Product and Adasum give other ratios (for N > 1) and are refused.

    The third element checks that every rank started the same exchange (c its code): ranks
    configured differently could otherwise wait forever, one in an allgather and another in an
    alltoall, which Horovod sees as two unrelated collectives. The probe's allreduce completes
    either way, so this raises on every rank before any waits for its exchange.
    """
    first, second, third = (float(value) for value in probe)
    expected_ratio = (size + 1) / 2.0
    if size > 1 and (first == 0 or
                     abs(second / first - expected_ratio) > PROBE_TOLERANCE * expected_ratio):
        raise ValueError(f"{UNSUPPORTED_OP} (the allreduced probe {[first, second]} matches "
                         f"neither for {size} ranks)")
    code = EXCHANGE_CODES[kind]
    if abs(third / first - code) > PROBE_TOLERANCE * code:
        raise ValueError(f"ranks started different exchanges for this tensor (this rank: {kind}; "
                         f"mean exchange code {third / first:.3f} across ranks, "
                         f"{EXCHANGE_CODES}): all ranks must use the same compressor settings")
    return first / size
