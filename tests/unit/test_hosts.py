"""Which ranks share a host, and the process sets of the hierarchical exchange
(protocol/hosts.py), with a stand-in for Horovod's module (tests/horovodrun/ runs the real one on
emulated hosts)."""

import warnings

import pytest

from horovod_tnq.protocol import Hosts
from horovod_tnq.protocol import hosts as hosts_module
from horovod_tnq.protocol.hosts import host_groups, hosts_of_job


class FakeHorovod:
    """One rank of a job: ``places`` (cross_rank, local_rank) of every rank."""

    def __init__(self, rank, places):
        self._rank, self.places = rank, places
        self.added = []

    def rank(self):
        return self._rank

    def size(self):
        return len(self.places)

    def local_size(self):
        return sum(1 for host, _ in self.places if host == self.places[self._rank][0])

    def cross_size(self):
        return len({host for host, _ in self.places})

    def add_process_set(self, ranks):
        self.added.append(list(ranks))
        return ("set", tuple(ranks))


def test_host_groups_read_the_places_of_every_rank():
    # ranks placed round-robin over 2 hosts (not consecutive), 2 per host
    places = [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert host_groups(places) == ([[0, 2], [1, 3]], [[0, 1], [2, 3]])
    assert host_groups([(0, 0), (0, 1), (1, 0)]) is None  # 2 and 1 ranks


def test_every_rank_adds_every_set_in_one_order_and_takes_its_own(monkeypatch):
    monkeypatch.setenv("HOROVOD_DYNAMIC_PROCESS_SETS", "1")
    places = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]  # 3 hosts of 2
    orders, found = [], []
    for rank in range(6):
        hvd = FakeHorovod(rank, places)
        found.append(hosts_of_job(hvd, lambda: places, Hosts))
        orders.append(hvd.added)
    assert all(order == orders[0] for order in orders)  # the same calls on every rank
    assert orders[0] == [[0, 1], [2, 3], [4, 5], [0, 2, 4], [1, 3, 5]]
    rank3 = found[3]
    assert (rank3.local_size, rank3.cross_size, rank3.local_index) == (2, 3, 1)
    assert rank3.local == ("set", (2, 3)) and rank3.cross == ("set", (1, 3, 5))


def test_without_dynamic_process_sets_a_warning_says_how_and_the_flat_exchange_runs(monkeypatch):
    monkeypatch.delenv("HOROVOD_DYNAMIC_PROCESS_SETS", raising=False)
    hvd = FakeHorovod(0, [(0, 0), (0, 1), (1, 0), (1, 1)])
    with pytest.warns(RuntimeWarning, match=r'process_sets="dynamic"'):
        assert hosts_of_job(hvd, pytest.fail, Hosts) is None  # (nothing gathered)
    assert hvd.added == []


@pytest.mark.parametrize("places", [[(0, 0), (0, 1), (0, 2), (0, 3)],
                                    [(0, 0), (1, 0), (2, 0), (3, 0)], [(0, 0), (0, 1)]],
                         ids=["one host", "one rank per host", "two ranks"])
def test_it_applies_only_to_several_hosts_of_several_ranks(monkeypatch, places):
    monkeypatch.setenv("HOROVOD_DYNAMIC_PROCESS_SETS", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and quietly
        hvd = FakeHorovod(0, places)
        assert hosts_of_job(hvd, lambda: places, Hosts) is None
        assert hvd.added == []


def test_hosts_of_unequal_sizes_decide_alike(monkeypatch):
    """A job of 2 + 2 + 1 ranks (an elastic job that lost one): the ranks see local_size 2 or
    1 and cross_size 3 or 2, yet all must decide alike, or some would wait in a gather or an
    add_process_set that the others never start: all gather, and all read the same places."""
    monkeypatch.setenv("HOROVOD_DYNAMIC_PROCESS_SETS", "1")
    places = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    gathered = []
    for rank in range(len(places)):
        hvd = FakeHorovod(rank, places)
        with pytest.warns(RuntimeWarning, match="different numbers of ranks"):
            assert hosts_of_job(hvd, lambda: gathered.append(1) or places, Hosts) is None
        assert hvd.added == []
    assert len(gathered) == len(places)


def test_a_set_that_exists_already_is_reused(monkeypatch):
    monkeypatch.setenv("HOROVOD_DYNAMIC_PROCESS_SETS", "1")
    hvd = FakeHorovod(0, [(0, 0), (0, 1), (1, 0), (1, 1)])

    def duplicate(ranks):
        raise ValueError(f"Attempted to add a duplicate process set: {ranks}")

    hvd.add_process_set = duplicate
    monkeypatch.setattr(hosts_module, "_registered_set", lambda ranks: ("old", tuple(ranks)))
    hosts = hosts_of_job(hvd, lambda: hvd.places, Hosts)
    assert hosts.local == ("old", (0, 1)) and hosts.cross == ("old", (0, 2))
