"""The scale simulator (benchmarks/scale_simulator.py) at small sizes: the hierarchical exchange
as protocol/plan.py lays it out keeps the averaged error of the flat exchanges, and what crosses
between hosts stays about one host's payload per host whatever the ranks per host."""

import pytest

from benchmarks.scale_simulator import (BUCKET, SCHEME, Traffic, elements_at, host_layouts,
                                        measure)
from horovod_tnq.protocol import host_bits

ELEMENTS = 1 << 16


def rows_by_exchange(rows, local_size):
    return {row.exchange.split(",")[0] + (" same" if "same" in row.exchange else ""): row
            for row in rows if row.local_size == local_size}


@pytest.fixture(scope="module")
def eight_ranks():
    """8 ranks at 2 bits: every rank its own host, and 2 hosts of 4."""
    rows = measure(8, 2, (1, 4), ELEMENTS)
    return rows_by_exchange(rows, 1), rows_by_exchange(rows, 4)


def test_hierarchical_error_stays_near_n_independent_quantizations(eight_ranks):
    """Host sums at host_bits (3 bits for 4 ranks) among 2 hosts: about 1.06x the flat error
    (NMSE(3) L / NMSE(2) = 0.034 * 4 / 0.128). Far below 1 would mean the host sums skipped
    quantization; far above, a slice summed or scaled wrongly."""
    flat, hosts = eight_ranks
    hierarchical = hosts["hierarchical"]
    assert 0.8 < hierarchical.ratio <= 1.6
    assert hierarchical.nmse < 2 * flat["allgather"].nmse
    assert "3-bit allgather among 2 hosts" in hierarchical.exchange


def test_hierarchical_sends_less_between_hosts_than_the_flat_exchanges(eight_ranks):
    flat, hosts = eight_ranks
    hierarchical = hosts["hierarchical"]
    assert hierarchical.between < 0.5 * hosts["reduce-scatter"].between
    assert hierarchical.between < 0.2 * hosts["allgather"].between
    # each rank sends its host's float32 slices inside the host, 2 (L - 1) / L * 32 bits per
    # element, and its compressed slice only to other hosts: all of the host's payloads cross
    assert hierarchical.sent == pytest.approx(2 * 3 / 4 * 32 + hierarchical.between / 4)


def test_flat_bytes_between_hosts_follow_the_ranks_addressed(eight_ranks):
    """The allgather addresses each payload to every other rank: N - L of them on other hosts,
    for each of a host's L ranks; with one rank per host, everything crosses."""
    flat, hosts = eight_ranks
    per_rank = flat["allgather"].sent
    assert flat["allgather"].between == pytest.approx(per_rank)
    assert hosts["allgather"].between == pytest.approx(per_rank * 4 * (8 - 4) / (8 - 1))
    for name in ("allgather", "reduce-scatter", "reduce-scatter same"):
        assert (hosts[name].nmse, hosts[name].sent) == (flat[name].nmse, flat[name].sent)


def test_bytes_between_hosts_stay_flat_in_ranks_per_host():
    """Two hosts of 4 and two hosts of 8 ranks: the hierarchical exchange puts one host's
    compressed slices across, so per host it grows only by the wider host code (host_bits: 3
    bits for 4 ranks, 4 for 8; 1.33x), where the flat allgather's grows like L (N - L) (4x)."""
    four = rows_by_exchange(measure(8, 2, (4,), ELEMENTS), 4)
    eight = rows_by_exchange(measure(16, 2, (8,), ELEMENTS), 8)
    growth = eight["hierarchical"].between / four["hierarchical"].between
    widths = host_bits(SCHEME, 2, 8) / host_bits(SCHEME, 2, 4)
    assert 1.0 < growth <= 1.01 * widths
    assert eight["allgather"].between > 3.5 * four["allgather"].between
    # 4-bit host sums of 8 ranks: below the flat error (two more bits, NMSE / 16, for L = 8)
    assert eight["hierarchical"].ratio < 1.0


def test_uneven_slices_are_summed_and_counted_whole():
    """3 ranks per host and a tensor that neither L nor the bucket divides: local_bounds gives
    uneven slices, every element must still come back averaged, and the float32 inside the host
    is 2 (L - 1) / L * 32 bits per element on average."""
    numel = 3 * 5 * BUCKET + 7
    rows = rows_by_exchange(measure(6, 2, (3,), numel), 3)
    hierarchical = rows["hierarchical"]
    assert hierarchical.ratio <= 1.6
    assert hierarchical.sent == pytest.approx(2 * 2 / 3 * 32 + hierarchical.between / 3)


def test_traffic_and_layouts():
    traffic = Traffic(4)
    traffic.send(0, range(4), 10)  # not to itself
    traffic.send(3, [2], 5)
    assert traffic.per_rank() == 35 / 4
    assert traffic.between_hosts(2) == (20 + 0) / 2  # 0 -> 2, 3; 3 -> 2 stays on host 1
    assert host_layouts(8, (1, 4, 8)) == [1, 4]  # 8 ranks per host would be one host
    assert host_layouts(12, (1, 3, 4, 8)) == [1, 3, 4]
    assert elements_at(8, 1 << 20) == 1 << 20
    assert elements_at(512, 1 << 20) == 1 << 19
    assert elements_at(1 << 12, 1 << 20, 1 << 20) == (1 << 12) * BUCKET  # a bucket per rank
