"""How one tensor's codes travel: which exchange, and the payloads it is cut into."""

from dataclasses import dataclass
from typing import Any

from ..core import MAX_BITS, get_scheme, supports


def second_bits(scheme, bits, size):
    """The width at which the reduce-scatter's second round quantizes each owner's chunk sum
    among ``size`` ranks, for a tensor sent at ``bits`` with ``scheme``.

    The first round's errors are unbiased and independent across ranks, so the average of N
    ranks keeps 1/N of one rank's: NMSE(b) / N. The second round quantizes the chunk's sum once
    more, and that error does not average away: at the same width it is as large as one rank's
    whole error, N times the averaged one (measured, 8 ranks at 2 bits: the averaged gradient
    9x worse than the allgather's). Each bit quarters these schemes' error (tnq-rht's NMSE
    0.128, 0.034, 0.0092, 0.0024 at 2 to 5 bits: 4^-b), so asking the second error to stay
    under a sixteenth of the averaged first, NMSE(b2) <= NMSE(b) / (16 N), gives
    4^(b2 - b) >= 16 N: b2 = b + 2 + ceil(log4 N), at most 8 bits (from 65 ranks at 2 bits the
    cap holds the second error to about 1/6 of the averaged first at 512 ranks; wider first
    codes reach the cap earlier). A quarter (b + 1 + ceil(log4 N)) measured 1.26x the
    allgather's averaged error at 64 ranks and 2 bits, a sixteenth 1.05-1.1x, for one more bit
    in the second round (benchmarks/scale_simulator.py). A scheme without that width takes its
    widest one in between.
    """
    extra = 2
    while 4 ** (extra - 2) < size:
        extra += 1
    for wide in range(min(bits + extra, MAX_BITS), bits, -1):
        if supports(scheme, wide):
            return wide
    return bits


def choose_exchange(config, numel, size):
    """The exchange for a tensor of ``numel`` elements among ``size`` ranks.

    Per rank and element, the allgather sends (size - 1) b bits (every other rank gets this
    rank's payload), the reduce-scatter (size - 1) / size (b + b2) (one chunk to each owner,
    then the owner's sum at b2 = second_bits(...) to every rank), plus headers. Their errors
    are alike: the allgather's averaged one, NMSE(b) / N, and the reduce-scatter's about a
    sixteenth more (second_bits). So "auto" takes the reduce-scatter where it sends fewer bits,
    for tensors big enough that each rank owns at least one full bucket: from 4 ranks at 2 and
    3 bits (at 3 ranks the bits are no fewer, and the allgather needs one round and one
    quantization fewer), from 3 ranks at 4 bits and more. All ranks see the same arguments, so
    they all choose the same.
    """
    if config.exchange != "auto":
        return config.exchange
    if get_scheme(config.scheme).body is not None:
        return "allgather"  # see CompressorConfig: such schemes do not re-quantize sums
    fewer_bits = config.bits + second_bits(config.scheme, config.bits, size) < \
        size * config.bits
    if size >= 3 and numel >= size * config.bucket_size and fewer_bits:
        return "reduce-scatter"
    return "allgather"


def second_round_config(config, size):
    """``config`` with the second round's width (second_bits) among ``size`` ranks: the
    settings that each owner's chunk sum is quantized with, and decoded with."""
    bits = second_bits(config.scheme, config.bits, size)
    return config if bits == config.bits else config.with_bits(bits)


# Names of a tensor's payloads, appended to its base name: they key the random stream and the
# error-feedback residual of each part, so no two parts share either.
WHOLE = ""  # the whole tensor (allgather exchange)
REDUCED = "#reduced"  # an owner's reduced chunk (second round of the reduce-scatter)


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


def plan(config, numel, size):
    """(exchange kind, (start, stop) of each payload, each payload's name suffix) of a tensor of
    ``numel`` elements among ``size`` ranks."""
    kind = choose_exchange(config, numel, size)
    if kind == "allgather":
        bounds = part_bounds(numel, config.part_elements, config.bucket_size)
    else:
        bounds = chunk_bounds(numel, size, config.bucket_size)
    return kind, bounds, part_names(kind, bounds)


@dataclass(eq=False)  # compared by identity: contexts in flight are kept in a list
class Pending:
    """compress()'s context for decompress(): the collective in flight (a Horovod handle in
    PyTorch, the gathered tensor in TF) and what this rank sent."""

    exchange: Any
    header: Any
    base_name: str
    shape: Any
    dtype: Any
    process_set: Any
    device: Any = None
    kind: str = "allgather"  # or "reduce-scatter"
    bounds: Any = None  # reduce-scatter: chunk_bounds(...)
    collective_name: str = ""
    step: int = 0
    second_round: Any = None  # reduce-scatter: the allgather of the reduced chunks
    second_header: Any = None  # reduce-scatter: this rank's reduced chunk's header
    codec: Any = None  # the adapter's codec that encoded it, and decodes what arrives
    label: str = ""  # the tensor's name in the metrics (its parameter's name where known)
