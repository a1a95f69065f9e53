"""How one tensor's codes travel: which exchange, and the payloads it is cut into."""

from dataclasses import dataclass
from typing import Any

from ..core import get_scheme


def choose_exchange(config, numel, size):
    """The exchange for a tensor of ``numel`` elements among ``size`` ranks.

    Per rank and tensor, with P the bytes of one full payload, the allgather sends and receives
    (size - 1) P, the reduce-scatter about 2 (size - 1) / size P plus a header per chunk. So
    with 2 ranks they move the same bytes and the allgather wins (one round, one quantization);
    from 3 ranks on the reduce-scatter moves fewer, and "auto" takes it for every tensor big
    enough that each rank owns at least one full bucket. All ranks see the same arguments, so
    they all choose the same.
    """
    if config.exchange != "auto":
        return config.exchange
    if get_scheme(config.scheme).body is not None:
        return "allgather"  # see CompressorConfig: such schemes do not re-quantize sums
    if size >= 3 and numel >= size * config.bucket_size:
        return "reduce-scatter"
    return "allgather"


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
    codec: Any = None  # the adapter's codec that encoded it, and decodes what arrives
    label: str = ""  # the tensor's name in the metrics (its parameter's name where known)
