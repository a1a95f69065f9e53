"""How one tensor's codes travel: which exchange, and the payloads it is cut into."""

from dataclasses import dataclass
from typing import Any

from ..core import MAX_BITS, get_scheme, supports


def second_widths(scheme, bits, size):
    """The widths at which the reduce-scatter's second round quantizes each owner's chunk sum
    among ``size`` ranks, for a tensor sent at ``bits`` with ``scheme``: one width, or two
    stages where it needs more than 8 bits (the second stage quantizes what the first left).

    The first round's errors are unbiased and independent across ranks, so the average of N
    ranks keeps 1/N of one rank's: NMSE(b) / N. The second round quantizes the chunk's sum once
    more, and that error does not average away: at the same width it is as large as one rank's
    whole error, N times the averaged one (measured, 8 ranks at 2 bits: the averaged gradient
    9x worse than the allgather's). Each bit quarters these schemes' error (tnq-rht's NMSE
    0.128, 0.034, 0.0092, 0.0024 at 2 to 5 bits: 4^-b), so asking the second error to stay
    under a sixteenth of the averaged first, NMSE(b2) <= NMSE(b) / (16 N), gives
    4^(b2 - b) >= 16 N: b2 = b + 2 + ceil(log4 N). A quarter (b + 1 + ceil(log4 N)) measured
    1.26x the allgather's averaged error at 64 ranks and 2 bits, a sixteenth 1.05-1.1x, for one
    more bit in the second round (benchmarks/scale_simulator.py).

    Codes stop at 8 bits (core.MAX_BITS), which 2 bits reach from 65 ranks and 4 bits from 17.
    Capped there the second error grew to 1.60x (2 bits) and 3.24x (4 bits) the allgather's at
    512 ranks. So past 8 bits the owner sends two payloads: its sum at 8 bits, then the
    residual (the sum minus what the first payload decodes to) at b2 - 8 bits; the errors
    multiply (4^-8 4^-(b2-8) = 4^-b2), and every rank adds both. A scheme without that width
    takes its widest one in between, in one stage.
    """
    extra = 2
    while 4 ** (extra - 2) < size:
        extra += 1
    want = bits + extra
    first = _widest(scheme, bits + 1, min(want, MAX_BITS)) or bits
    widths = [first]
    if want > MAX_BITS and first == MAX_BITS:
        second = _widest(scheme, 1, want - MAX_BITS)
        if second:
            widths.append(second)
    return widths


def _widest(scheme, low, high):
    """The widest width from ``low`` to ``high`` that ``scheme`` runs at, or None."""
    return next((wide for wide in range(high, low - 1, -1) if supports(scheme, wide)), None)


def second_bits(scheme, bits, size):
    """The second round's bits per element, all stages (second_widths)."""
    return sum(second_widths(scheme, bits, size))


def host_bits(scheme, bits, local_size):
    """The width at which the hierarchical exchange quantizes each host's sum, for a tensor sent
    at ``bits`` with ``scheme`` by hosts of ``local_size`` ranks.

    Inside a host the ranks sum in full precision, so a host's L gradients are quantized once,
    not L times: the average of N = H L ranks carries H independent errors of the host sums
    (each about L^2 times one rank's squared norm), NMSE(b_h) / H, where the flat exchanges
    carry N errors of one rank's, NMSE(b) / N. Keeping the flat error asks NMSE(b_h) <=
    NMSE(b) / L, and each bit quarters it (second_bits): b_h = b + ceil(log4 L), at most 8 (one
    more bit for 2 to 4 ranks per host, two for 5 to 16). Each rank then encodes only 1/L of
    the tensor, and what crosses between hosts grows with hosts, not ranks
    (benchmarks/scale_simulator.py)."""
    extra = 0
    while 4 ** extra < local_size:
        extra += 1
    for wide in range(min(bits + extra, MAX_BITS), bits, -1):
        if supports(scheme, wide):
            return wide
    return bits


@dataclass(frozen=True)
class Hosts:
    """Where a job's ranks run, for the hierarchical exchange: ``local_size`` ranks on each of
    ``cross_size`` hosts, this rank ``local_index``-th of its host; ``local`` and ``cross`` are
    the adapter's process sets of this rank's host and of the ranks of the same local index on
    every host (framework objects; this module only reads the sizes)."""

    local_size: int
    cross_size: int
    local_index: int
    local: Any = None
    cross: Any = None


def choose_exchange(config, numel, size, hosts=None):
    """The exchange for a tensor of ``numel`` elements among ``size`` ranks; ``hosts``: a Hosts
    where the hierarchical exchange is available (several hosts of several ranks each, process
    sets registered), else None.

    Per rank and element, the allgather sends (size - 1) b bits (every other rank gets this
    rank's payload), the reduce-scatter (size - 1) / size (b + b2) (one chunk to each owner,
    then the owner's sum at b2 = second_bits(...) to every rank), plus headers. Their errors
    are alike: the allgather's averaged one, NMSE(b) / N, and the reduce-scatter's about a
    sixteenth more (second_bits). So "auto" takes the reduce-scatter where it sends fewer bits,
    for tensors big enough that each rank owns at least one full bucket: from 4 ranks at 2 and
    3 bits (at 3 ranks the bits are no fewer, and the allgather needs one round and one
    quantization fewer), from 3 ranks at 4 bits and more. All ranks see the same arguments, so
    they all choose the same.

    Where ``hosts`` is given, "auto" takes the hierarchical exchange for tensors of at least a
    bucket per rank of a host: its error is the flat exchanges' (host_bits) and what crosses
    between hosts is about 1/L of theirs per host. "hierarchical" without ``hosts`` (one host,
    or no process sets) is the flat "auto" choice; the adapters warn once.
    """
    if config.exchange not in ("auto", "hierarchical"):
        return config.exchange
    if get_scheme(config.scheme).body is not None:
        return "allgather"  # see CompressorConfig: such schemes do not re-quantize sums
    if hosts is not None and numel >= hosts.local_size * config.bucket_size:
        return "hierarchical"
    fewer_bits = config.bits + second_bits(config.scheme, config.bits, size) < \
        size * config.bits
    if size >= 3 and numel >= size * config.bucket_size and fewer_bits:
        return "reduce-scatter"
    return "allgather"


def cross_config(config, hosts):
    """The settings of the hierarchical exchange between hosts: ``config`` at host_bits(...),
    its exchange among the hosts chosen as "auto" would (allgather or reduce-scatter)."""
    return config.with_bits(host_bits(config.scheme, config.bits, hosts.local_size),
                            exchange="auto")


def local_bounds(numel, local_size):
    """(start, stop) of the slice of a flat tensor that each rank of a host owns in the
    hierarchical exchange: Horovod's reducescatter's split of the first dimension (the first
    numel % L ranks one element more), in local order."""
    base, extra = divmod(numel, local_size)
    bounds, start = [], 0
    for index in range(local_size):
        stop = start + base + (index < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def second_round_configs(config, size):
    """``config`` at each of the second round's widths (second_widths) among ``size`` ranks:
    the settings each owner's chunk sum is quantized with, stage by stage, and decoded with.
    With two stages only the last keeps error feedback: the second quantizes what the first
    left, so a residual kept by the first would only be cancelled by the second."""
    widths = second_widths(config.scheme, config.bits, size)
    stages = [config if bits == config.bits else config.with_bits(bits) for bits in widths]
    return [stage.with_bits(stage.bits, error_feedback=0.0) if index + 1 < len(stages) and
            stage.error_feedback else stage for index, stage in enumerate(stages)]


# Names of a tensor's payloads, appended to its base name: they key the random stream and the
# error-feedback residual of each part, so no two parts share either.
WHOLE = ""  # the whole tensor (allgather exchange)
REDUCED = "#reduced"  # an owner's reduced chunk (second round of the reduce-scatter)
STAGE = "#s"  # + the stage: the residual payloads of a second round in two stages


def part_names(kind, bounds):
    """The name of each payload of a tensor: its parts in the allgather exchange (the whole tensor
    when there is one), its owners' chunks in the reduce-scatter."""
    if kind == "allgather":
        return [WHOLE] if len(bounds) == 1 else [f"#p{index}" for index in range(len(bounds))]
    return [f"#{owner}" for owner in range(len(bounds))]


def part_bounds(numel, part_elements, bucket_size):
    """(start, stop) of each payload of a tensor in the allgather exchange: one for tensors of at
    most ``part_elements`` elements (or when it is 0), else consecutive parts of that many
    elements rounded down to whole buckets (at least one). Each part is encoded and sent on its
    own as soon as it is encoded, and decoded as soon as it arrives, so encoding, transfer and
    decoding of a large tensor overlap instead of following each other."""
    if not part_elements or numel <= part_elements:
        return [(0, numel)]
    step = max(part_elements // bucket_size, 1) * bucket_size
    return [(start, min(start + step, numel)) for start in range(0, numel, step)]


def chunk_bounds(numel, size, bucket_size):
    """(start, stop) of the chunk each rank owns in the reduce-scatter: whole buckets, as even
    as possible, in rank order (the last may be short; with fewer buckets than ranks, the
    first ranks' chunks are empty)."""
    buckets = -(-numel // bucket_size)
    bounds = []
    for rank in range(size):
        first, last = buckets * rank // size, buckets * (rank + 1) // size
        bounds.append((min(first * bucket_size, numel), min(last * bucket_size, numel)))
    return bounds


def plan(config, numel, size, hosts=None):
    """(exchange kind, (start, stop) of each payload, each payload's name suffix) of a tensor of
    ``numel`` elements among ``size`` ranks (``hosts``: see choose_exchange). For the
    hierarchical exchange, the bounds are the host's slices (local_bounds) and the one name
    is this rank's slice's; its exchange between hosts is plan(cross_config(...), slice, H)."""
    kind = choose_exchange(config, numel, size, hosts)
    if kind == "allgather":
        bounds = part_bounds(numel, config.part_elements, config.bucket_size)
    elif kind == "reduce-scatter":
        bounds = chunk_bounds(numel, size, config.bucket_size)
    else:
        bounds = local_bounds(numel, hosts.local_size)
        # the layout is in the name: error-feedback residuals of a checkpoint from hosts of
        # other sizes (other slices, other chunks) are not read as this one's
        return kind, bounds, [f"#h{hosts.local_index}.{hosts.local_size}x{hosts.cross_size}"]
    return kind, bounds, part_names(kind, bounds)
