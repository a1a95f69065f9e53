"""The probe: how a compressor learns, from inside Horovod's allreduce, what Horovod would
have done to an uncompressed tensor.

Stock Horovod hands ``compress(tensor)`` to an *allreduce*, but packed codes cannot be summed.
So each compressor returns a small probe instead of the gradient; Horovod allreduces the probe
with the caller's op, prescale and postscale factors, and ``read_probe`` reads from the result
the factor to apply to the sum of the decoded payloads, and which ranks contributed. op=Average,
op=Sum, ``gradient_predivide_factor``, pre/postscale factors and ``hvd.join()`` (a joined rank
contributes zeros to every allreduce) then come out exactly as Horovod applies them to an
uncompressed tensor.

``probe_values`` is the one description of the probe's elements (HEAD + N float32 for N ranks);
docs/design.md ("The probe") and the package's other docstrings agree with it
(tests/unit/test_docs_probe.py checks them).
"""

import zlib
from typing import NamedTuple

# The probe's code c for how this rank cuts and sends the tensor, sent as c and c**2.
# Codes are small integers, so their sums are exact in float32.
PLAN_CODES = 16
# Elements before the per-rank marks: 1, -1, rank + 1, c, c**2.
HEAD = 5


def plan_code(kind, bounds):
    """The code of a tensor's exchange ``kind`` and payload ``bounds`` (plan.plan): ranks whose
    settings cut or send it differently (exchange, part_elements, bucket_size) get different
    codes, except for a 1-in-16 collision."""
    layout = repr((kind, [tuple(bound) for bound in bounds])).encode()
    return 1 + zlib.crc32(layout) % PLAN_CODES


def probe_values(rank, code, size=None):
    """What rank ``rank`` of ``size`` contributes to the probe allreduce (``code``: plan_code):
    [1, -1, rank + 1, c, c**2] (HEAD elements), then a mark per rank, 1 in its own slot (``size``
    None: as many slots as this rank needs, for single-process callers)."""
    marks = [0.0] * (rank + 1 if size is None else size)
    marks[rank] = 1.0
    return [1.0, -1.0, float(rank + 1), float(code), float(code * code)] + marks


UNSUPPORTED_OP = "horovod_tnq compressors support op=Average and op=Sum only"
PROBE_TOLERANCE = 1e-3
MISMATCH = ("ranks cut or send this tensor differently (exchange, part_elements or "
            "bucket_size differ): all ranks must use the same compressor settings")


class ProbeReading(NamedTuple):
    """What an allreduced probe says: ``scale``, the factor to multiply the sum of the
    contributing ranks' decoded payloads by, and ``ranks``, those ranks (all but the ones
    that called hvd.join())."""

    scale: float
    ranks: tuple


def read_probe(probe, size, code):
    """The ProbeReading of an allreduced ``probe`` among ``size`` ranks, on a rank whose plan
    code is ``code``; raises on any op but Sum and Average and on ranks whose plans differ.

    Horovod returns postscale * reduce(prescale * probe), and a joined rank contributes zeros.
    For op=Sum and op=Average that is u * (the sum of the contributing ranks' probes), with u
    the product of the scale factors, divided by N for Average (Horovod divides by the full
    size under join too): exactly the factor Horovod applies to the sum of the contributing
    ranks' gradients. Each rank's mark comes back as u or 0, so the marks tell u and which
    ranks contributed (a joined rank's mark stays 0), and the head must then be u times the sum
    of the contributors' heads. Min, Max, Product and Adasum do not give that shape (Max over
    a joined rank's zeros turns the -1 into 0; Adasum weighs ranks by their probes' norms,
    which rank + 1 makes unequal) and are refused.

    The codes check that every contributing rank planned the same exchange and payloads (c,
    plan_code): ranks configured differently could otherwise wait forever, one in an
    allgather and another in an alltoall, or in allgathers of parts the others never send,
    which Horovod sees as unrelated collectives. The mean of c must be this rank's c and the
    spread mean(c**2) - mean(c)**2 zero (a rank off by one among n moves it by about 1/n).
    The probe's allreduce completes either way, so this raises on every rank before any waits.
    """
    values = [float(value) for value in probe]
    if len(values) != HEAD + size:
        raise ValueError(f"the allreduced probe has {len(values)} elements, expected "
                         f"{HEAD + size} for {size} ranks: ranks run different horovod_tnq "
                         "versions")
    head, marks = values[:HEAD], values[HEAD:]
    ranks = tuple(rank for rank, mark in enumerate(marks) if mark != 0)
    unit = marks[ranks[0]] if ranks else 0.0
    expected = [unit * len(ranks), -unit * len(ranks), unit * sum(r + 1 for r in ranks)]
    if not ranks or not all(_close(marks[r], unit) for r in ranks) or \
            not all(_close(got, want) for got, want in zip(head, expected)):
        raise ValueError(f"{UNSUPPORTED_OP} (the allreduced probe {values} matches neither "
                         f"for {size} ranks)")
    contributors = len(ranks)
    mean, spread = head[3] / head[0], head[4] / head[0] - (head[3] / head[0]) ** 2
    # Codes are integers: one rank off by d among n moves the mean by d / n and the spread by
    # about d**2 / n, so the bound shrinks with n (float32 rounding stays near 1e-5 here).
    tolerance = min(PROBE_TOLERANCE * code, 0.5 / contributors)
    if abs(mean - code) > tolerance or spread > tolerance:
        raise ValueError(f"{MISMATCH} (this rank's plan code {code}, mean across ranks "
                         f"{mean:.4f}, spread {spread:.4f})")
    return ProbeReading(head[0] / contributors, ranks)


def reduction_scale(probe, size, code):
    """read_probe(...).scale: the factor to multiply the sum of decoded payloads by."""
    return read_probe(probe, size, code).scale


# While a rank has called hvd.join(), Horovod refuses every allgather and alltoall ("Allgather
# is not supported with Join at this time", "Alltoall ..."), on every rank that started it, and
# runs allreduces with the joined ranks' zeros. A tensor whose exchange was refused is summed by
# an allreduce of each contributing rank's decoded payloads, named with this suffix.
JOINED = "#joined"
_JOIN_REFUSAL = "is not supported with Join"


def exchange_refused_by_join(error):
    """Whether ``error`` (raised by waiting on a collective) is Horovod refusing it because a
    rank has joined."""
    return _JOIN_REFUSAL in str(error)


def cached_exchange_under_join(joined, exchange):
    """The error where Horovod ran a tensor's ``exchange`` although ranks ``joined`` had
    joined: it answers collectives it has seen before from its response cache, and a joined
    rank then contributes zeros, even to an allgather (of a size that fits only by chance)."""
    return (f"hvd.join(): rank(s) {list(joined)} have joined, and Horovod ran this tensor's "
            f"{exchange} from its response cache (the joined ranks sending zeros; a cached "
            "alltoall can crash them) instead of refusing it as it refuses new allgathers "
            "and alltoalls under join; run with HOROVOD_CACHE_CAPACITY=0 to use hvd.join() "
            "with horovod_tnq compressors (docs/limits.md)")


def _close(got, want):
    return abs(got - want) <= PROBE_TOLERANCE * abs(want)
