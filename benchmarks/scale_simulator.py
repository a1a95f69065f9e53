"""N ranks in one process: the averaged gradient's error and the bytes each rank sends, and each
host sends to other hosts, for every exchange, from 2 to 512 ranks, with the core's real
payloads (no horovodrun).

    python -m benchmarks.scale_simulator [--ranks 2 3 4 8 16 64 512] [--bits 2 3 4]
                                         [--ranks-per-host 1 4 8] [--elements 1048576]
                                         [--max-values 268435456] [--noise 0.01] [--seed 0]
                                         [--plot docs/images/scale_simulator.png]

Every rank holds the same gradient g plus its own noise (g_i = g + noise * n_i; g and n_i
Student-t(3)), as in data-parallel training, and the job averages them (op=Average). Each
exchange runs as protocol/plan.py lays it out (plan(), chunk_bounds, second_bits, local_bounds,
cross_config), on payloads encoded and decoded by horovod_tnq.core with each rank's own random
stream:

* allgather: every rank decodes the sum of the N payloads of the whole tensor;
* reduce-scatter: each owner decodes and sums its chunk of every rank's payload, quantizes the
  sum again at plan.second_bits(...) bits ("same bits": at the first width, the exchange before
  second_bits), and every rank decodes the owners' payloads;
* hierarchical (hosts of L ranks, H = N / L >= 2 hosts, ranks r = h L + i): inside each host
  the L ranks sum their gradients in float32 (a reduce-scatter: local rank j gets the host's
  sum of the slice local_bounds(numel, L)[j]); the H ranks of local index j, one per host,
  exchange their hosts' sums of that slice compressed with cross_config(...) (host_bits wide,
  allgather or reduce-scatter as plan(cross, slice, H) chooses); then each host allgathers its
  slices in float32.

Reported per (bits, N, L): NMSE of the averaged result against the true average; "x N / single",
that NMSE times N over one rank's own NMSE at the first width (1.0: the ranks' errors average
away like 1/N); bits sent per rank and gradient element (payload bytes * 8 / elements, and for
the hierarchical exchange the float32 bytes inside the host; Horovod's ring allreduce of float32
sends 2 (N - 1) / N * 32); and bits per gradient element that one host's ranks send to ranks of
other hosts (the mean over hosts), against float32 Horovod's: its hierarchical allreduce sends
2 (H - 1) / H * 32 between hosts per host, and so does its ring allreduce at L = 1 (H = N).

Bytes are counted as each payload is addressed, sender to receiver: an allgather delivers each
rank's payload to every other rank. A ring allgather that relays payloads from host to host
would put about (N - 1) payloads on each host's link instead of L (N - L); the alltoall of the
reduce-scatter is point to point either way. Payloads are counted as sent, not timed.

Large jobs hold N gradients at once: from N * elements > --max-values each rank holds
max(--max-values // N, N * bucket) elements instead (524288 at 512 ranks by default), so that
the reduce-scatter still gives every rank a whole bucket.
"""

import argparse
from dataclasses import dataclass

import numpy as np

from horovod_tnq import CompressorConfig, core
from horovod_tnq.protocol import (Hosts, chunk_bounds, cross_config, plan,
                                  second_round_configs)
from horovod_tnq.protocol.exchange import encode_in_stages

SCHEME, BUCKET = "tnq-rht", 512
FLOAT32 = 4  # bytes of one full-precision element, as the hierarchical exchange sends inside hosts


def gradients(ranks, elements, noise, seed):
    rng = np.random.default_rng(seed)
    shared = rng.standard_t(3, elements)
    return [(shared + noise * rng.standard_t(3, elements)).astype(np.float32)
            for _ in range(ranks)]


def elements_at(ranks, elements, max_values=1 << 28):
    """The gradient size simulated at ``ranks``: ``elements``, or fewer where N copies would
    pass ``max_values``, in whole buckets and never under one bucket per rank."""
    if ranks * elements <= max_values:
        return elements
    return max(max_values // ranks // BUCKET * BUCKET, ranks * BUCKET)


class Traffic:
    """Bytes that each rank addresses to each rank (sender x receiver), so that one run gives
    the bytes between hosts for any number of ranks per host."""

    def __init__(self, ranks):
        self.bytes = np.zeros((ranks, ranks))

    def copy(self):
        other = Traffic(0)
        other.bytes = self.bytes.copy()
        return other

    def send(self, sender, receivers, size):
        receivers = [r for r in receivers if r != sender]
        self.bytes[sender, receivers] += size

    def per_rank(self):
        return self.bytes.sum() / len(self.bytes)

    def between_hosts(self, local_size):
        """Bytes that one host's ranks send to other hosts' ranks (the mean over hosts), ranks
        r = h * local_size + i."""
        host = np.arange(len(self.bytes)) // local_size
        return self.bytes[host[:, None] != host[None, :]].sum() / (host[-1] + 1)


def _encode(values, config, rank, name):
    return core.encode(values, scheme=config.scheme, bits=config.bits,
                       bucket_size=config.bucket_size, key=core.stream_key(0, rank, name))


def _sum(payloads, numel, config, factor=1.0):
    expect = core.PayloadHeader.describe(config.scheme, config.bits, "float32", numel,
                                         config.bucket_size, (numel,))
    return core.decode_sum(np.concatenate(payloads), expect, factor, np.float64)[0]


def _allgather(values, ranks, config, name, factor, traffic, payloads=None):
    """``factor`` times the sum that every rank of ``ranks`` decodes from their payloads of
    ``values`` (``payloads``: already encoded)."""
    if payloads is None:
        payloads = [_encode(v, config, rank, name) for rank, v in zip(ranks, values)]
    for rank, payload in zip(ranks, payloads):
        traffic.send(rank, ranks, payload.size)
    return _sum(payloads, values[0].size, config, factor)


def _first_round(values, ranks, config, name, traffic):
    """The reduce-scatter's first round among ``ranks``: (chunk_bounds, each owner's sum of its
    chunk, float32). Shared by the second rounds at either width: same keys, same payloads."""
    numel = values[0].size
    bounds = chunk_bounds(numel, len(ranks), config.bucket_size)
    sums = []
    for index, (start, stop) in enumerate(bounds):
        owner = ranks[index]
        chunks = [_encode(v[start:stop], config, rank, f"{name}#{index}")
                  for rank, v in zip(ranks, values)]
        for rank, chunk in zip(ranks, chunks):
            traffic.send(rank, [owner], chunk.size)
        sums.append(_sum(chunks, stop - start, config).astype(np.float32))
    return bounds, sums


def _second_round(bounds, sums, ranks, stages, name, factor, traffic):
    """Each owner quantizes its chunk's sum with the settings ``stages`` (plan.second_widths:
    one width, or two where the second quantizes what the first left) and every rank decodes
    and adds them all."""
    result = np.empty(bounds[-1][1])
    for index, ((start, stop), chunk_sum) in enumerate(zip(bounds, sums)):
        owner, numel = ranks[index], stop - start

        def encode(values, stage, config):
            return _encode(values, config, owner, f"{name}#reduced" + (f"#s{stage}" if stage
                                                                       else ""))

        def decode(payload, config):
            return _sum([payload], numel, config).astype(np.float32)

        payloads = encode_in_stages(encode, decode, chunk_sum, stages)
        for payload in payloads:
            traffic.send(owner, ranks, payload.size)
        result[start:stop] = sum(_sum([payload], numel, config, factor)
                                 for payload, config in zip(payloads, stages))
    return result


def widths(stages):
    """The second round's width as the tables print it: "6", or "8+1" in two stages."""
    return "+".join(str(config.bits) for config in stages)


def allgather(grads, config, traffic=None):
    """(the averaged result, bytes each rank sends)."""
    traffic = traffic or Traffic(len(grads))
    ranks = list(range(len(grads)))
    return _allgather(grads, ranks, config, "t", 1.0 / len(grads), traffic), traffic.per_rank()


def reduce_scatter(grads, config, second, traffic=None):
    """(the averaged result, bytes each rank sends (the mean over ranks)), the owners' sums
    quantized with ``second`` (the settings of each stage: plan.second_round_configs)."""
    traffic = traffic or Traffic(len(grads))
    ranks = list(range(len(grads)))
    bounds, sums = _first_round(grads, ranks, config, "t", traffic)
    result = _second_round(bounds, sums, ranks, second, "t", 1.0 / len(grads), traffic)
    return result, traffic.per_rank()


def hierarchical(grads, config, local_size, traffic=None):
    """(the averaged result, bytes each rank sends (the mean over ranks), what crossed between
    hosts: a description) with hosts of ``local_size`` ranks, as plan() lays it out."""
    ranks, numel = len(grads), grads[0].size
    hosts = ranks // local_size
    traffic = traffic or Traffic(ranks)
    result, crossings = np.empty(numel), set()
    for index in range(local_size):
        where = Hosts(local_size, hosts, index)
        kind, bounds, names = plan(config, numel, ranks, where)
        if kind != "hierarchical":
            raise ValueError(f"plan() chose {kind} for {numel} elements on hosts of {local_size}")
        start, stop = bounds[index]
        size = stop - start
        members = [host * local_size + index for host in range(hosts)]
        host_sums = []
        for host, member in enumerate(members):
            local = range(host * local_size, (host + 1) * local_size)
            for rank in local:  # the float32 reduce-scatter: this slice to its local owner
                traffic.send(rank, [member], FLOAT32 * size)
            host_sums.append(np.sum([grads[rank][start:stop] for rank in local], axis=0,
                                    dtype=np.float32))
        cross = cross_config(config, where)
        cross_kind = plan(cross, size, hosts)[0]
        name = "t" + names[0]
        if cross_kind == "allgather":
            result[start:stop] = _allgather(host_sums, members, cross, name, 1.0 / ranks,
                                            traffic)
            crossings.add(f"{cross.bits}-bit allgather")
        else:
            second = second_round_configs(cross, hosts)
            split, sums = _first_round(host_sums, members, cross, name, traffic)
            result[start:stop] = _second_round(split, sums, members, second, name,
                                               1.0 / ranks, traffic)
            crossings.add(f"{cross.bits}-bit reduce-scatter, second round {widths(second)} "
                          "bits")
        for host, member in enumerate(members):  # the float32 allgather of the slices
            traffic.send(member, range(host * local_size, (host + 1) * local_size),
                         FLOAT32 * size)
    return result, traffic.per_rank(), " / ".join(sorted(crossings))


def nmse(result, truth):
    return float(((result - truth) ** 2).sum() / (truth ** 2).sum())


@dataclass
class Row:
    """One exchange at N ranks with hosts of ``local_size`` ranks; ``sent``: bits per gradient
    element that each rank sends (the mean over ranks), ``between``: that one host's ranks send
    to other hosts (the mean over hosts)."""

    exchange: str
    local_size: int
    nmse: float
    ratio: float
    sent: float
    between: float


def host_layouts(ranks, local_sizes):
    """The ranks per host that ``ranks`` ranks fill: 1, and every L that gives at least two
    hosts of L ranks."""
    return [size for size in local_sizes
            if size == 1 or (size >= 2 and ranks % size == 0 and ranks // size >= 2)]


def measure(ranks, bits, local_sizes=(1,), elements=1 << 20, noise=0.01, seed=0):
    """Rows at ``ranks``: the flat exchanges once per layout of host_layouts(...) (their error
    does not depend on it, their bytes between hosts do), the hierarchical one per L >= 2."""
    grads = gradients(ranks, elements, noise, seed)
    truth = np.zeros(elements)
    for g in grads:
        truth += g
    truth /= ranks
    config = CompressorConfig(scheme=SCHEME, bits=bits, bucket_size=BUCKET)
    # the allgather's payloads are each rank's own compression of its gradient
    payloads = [_encode(g, config, rank, "t") for rank, g in enumerate(grads)]
    single = np.mean([nmse(core.decode(p)[0], g.astype(np.float64))
                      for p, g in zip(payloads[:4], grads)])
    everyone = list(range(ranks))
    runs = {}
    traffic = Traffic(ranks)
    runs["allgather"] = (_allgather(grads, everyone, config, "t", 1.0 / ranks, traffic,
                                    payloads), traffic)
    if elements >= ranks * BUCKET:
        first = Traffic(ranks)
        bounds, sums = _first_round(grads, everyone, config, "t", first)
        wide = second_round_configs(config, ranks)
        seconds = {f"reduce-scatter, second round {widths(wide)} bits": wide}
        if widths(wide) != str(bits):
            seconds[f"reduce-scatter, same bits ({bits})"] = [config]
        for name, second in seconds.items():
            traffic = first.copy()
            runs[name] = (_second_round(bounds, sums, everyone, second, "t", 1.0 / ranks,
                                        traffic), traffic)
    layouts = host_layouts(ranks, local_sizes)
    rows = []
    for name, (result, traffic) in runs.items():
        error = nmse(result, truth)
        rows += [Row(name, size, error, error * ranks / single, traffic.per_rank() * 8 / elements,
                     traffic.between_hosts(size) * 8 / elements) for size in layouts]
    for size in layouts:
        if size == 1:
            continue
        traffic = Traffic(ranks)
        result, _, crossing = hierarchical(grads, config, size, traffic)
        error = nmse(result, truth)
        rows.append(Row(f"hierarchical, L={size}: {crossing} among {ranks // size} hosts", size,
                        error, error * ranks / single, traffic.per_rank() * 8 / elements,
                        traffic.between_hosts(size) * 8 / elements))
    return rows


def simulate(ranks, bits, elements=1 << 20, noise=0.01, seed=0):
    """Rows of (exchange, NMSE, NMSE x N / single, bits per element sent) at ``ranks``: the flat
    exchanges, all ranks on their own hosts."""
    return [(row.exchange, row.nmse, row.ratio, row.sent)
            for row in measure(ranks, bits, (1,), elements, noise, seed)]


def fp32_between_hosts(ranks, local_size):
    """Bits per element that float32 Horovod sends between hosts per host: its hierarchical
    allreduce's ring among H hosts, 2 (H - 1) / H * 32 (the ring allreduce at L = 1)."""
    hosts = ranks // local_size
    return 2 * (hosts - 1) / hosts * 32


def plot(results, path):
    """results: {(bits, N): rows}. For each width, the averaged error against N independent
    quantizations, and the bits between hosts per host, against N."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    widths = sorted({bits for bits, _ in results})
    fig, axes = plt.subplots(len(widths), 2, figsize=(13, 4.8 * len(widths)), squeeze=False)
    colors = {"allgather": "tab:blue", "reduce-scatter": "tab:orange",
              "hierarchical": "tab:green"}
    styles = {1: ("-", "o"), 2: ("-.", "v"), 4: ("--", "s"), 8: (":", "^"), 16: ("-", "D")}
    for (error_ax, bytes_ax), bits in zip(axes, widths):
        lines = {}
        for (width, ranks), rows in sorted(results.items()):
            if width != bits:
                continue
            for row in rows:
                if "same bits" in row.exchange:
                    continue  # the ablation's error grows like N; it would flatten the rest
                kind = row.exchange.split(",")[0]
                lines.setdefault((kind, row.local_size), []).append(
                    (ranks, row.ratio, row.between))
        layouts = sorted({size for _, size in lines})
        order = list(colors)
        for (kind, size), points in sorted(lines.items(),
                                           key=lambda item: (order.index(item[0][0]), item[0][1])):
            ranks, ratio, between = zip(*points)
            line, marker = styles.get(size, ("-", "x"))
            if kind == "hierarchical" or size == min(layouts):  # flat errors ignore L
                label = {"hierarchical": f"hierarchical, L={size}",
                         "reduce-scatter": "reduce-scatter (wider second round)"}.get(kind, kind)
                error_ax.plot(ranks, ratio, line, marker=marker, color=colors[kind], label=label)
            bytes_ax.plot(ranks, between, line, marker=marker, color=colors[kind],
                          label=f"{kind}, L={size}")
        for size in layouts:
            ranks = sorted({n for (width, n) in results if width == bits
                            and size in host_layouts(n, [size])})
            line, _ = styles.get(size, ("-", "x"))
            bytes_ax.plot(ranks, [fp32_between_hosts(n, size) for n in ranks], line,
                          color="gray", linewidth=1,
                          label=f"fp32 Horovod, L={size}" + (" (ring)" if size == 1 else ""))
        error_ax.axhline(1.0, color="black", linewidth=0.6)
        error_ax.set(xlabel="ranks N", ylabel="NMSE of the average x N / single",
                     title=f"{SCHEME}, {bits} bits: averaged error vs N independent ones")
        bytes_ax.set(yscale="log", xlabel="ranks N",
                     ylabel="bits per element a host sends to other hosts",
                     title=f"{bits} bits: between hosts, per host (L ranks per host)")
        for ax in (error_ax, bytes_ax):
            ax.set_xscale("log", base=2)
        error_ax.legend(fontsize=8)
        bytes_ax.legend(fontsize=7, ncol=2)
        error_ax.grid(alpha=0.3)
        bytes_ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 3, 4, 8, 16, 64, 512])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--ranks-per-host", type=int, nargs="+", default=[1, 4, 8],
                        help="host layouts L (ranks r = h L + i); the hierarchical exchange "
                             "runs at each L >= 2 that gives at least two hosts")
    parser.add_argument("--elements", type=int, default=1 << 20)
    parser.add_argument("--max-values", type=int, default=1 << 28,
                        help="gradient elements held across all ranks, at most (fewer "
                             "elements per rank at large N)")
    parser.add_argument("--noise", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", metavar="PATH", help="save a plot (PNG) here")
    args = parser.parse_args()
    print(f"{SCHEME}, bucket {BUCKET}, {args.elements} elements, g_i = g + {args.noise} n_i")
    smaller = {n: elements_at(n, args.elements, args.max_values) for n in args.ranks}
    smaller = {n: e for n, e in smaller.items() if e != args.elements}
    if smaller:
        print("fewer elements at " + ", ".join(f"N = {n}: {e}" for n, e in smaller.items()))
    print("| bits | N | L | exchange | NMSE of the average | x N / single | bits sent per rank "
          "and element | vs ring allreduce (fp32) | bits between hosts per host and element | "
          "vs fp32 Horovod between hosts |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = {}
    for bits in args.bits:
        for ranks in args.ranks:
            ring = 2 * (ranks - 1) / ranks * 32
            elements = elements_at(ranks, args.elements, args.max_values)
            rows = measure(ranks, bits, args.ranks_per_host, elements, args.noise, args.seed)
            results[bits, ranks] = rows
            for row in sorted(rows, key=lambda row: row.local_size):
                fp32 = fp32_between_hosts(ranks, row.local_size)
                print(f"| {bits} | {ranks} | {row.local_size} | {row.exchange} | "
                      f"{row.nmse:.4g} | {row.ratio:.2f} | {row.sent:.2f} | "
                      f"{row.sent / ring:.3f} | {row.between:.2f} | {row.between / fp32:.3f} |",
                      flush=True)
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
