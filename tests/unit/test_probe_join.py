"""The probe under hvd.join(): joined ranks contribute zeros to its allreduce, and the probe
still gives Horovod's factor, which ranks contributed, and refuses other ops and mismatched
plans (horovod_tnq/protocol/probe.py)."""

import itertools

import numpy as np
import pytest

from horovod_tnq.protocol import (MISMATCH, UNSUPPORTED_OP, plan_code, probe_values,
                                  read_probe, reduction_scale)

CODE = plan_code("allgather", [(0, 4096)])


def reduced(size, joined=(), op="sum", scale=1.0, codes=None):
    """What Horovod's allreduce of every rank's probe returns with ranks ``joined`` (their
    zeros) and ``op`` (average divides by the full size, as Horovod does under join)."""
    rows = np.array([np.zeros(5 + size) if rank in joined else
                     probe_values(rank, (codes or {}).get(rank, CODE), size)
                     for rank in range(size)], np.float32)
    rows = rows * np.float32(scale)
    if op in ("sum", "average"):
        total = rows.sum(axis=0, dtype=np.float32) / (size if op == "average" else 1)
    else:
        total = {"max": rows.max, "min": rows.min, "product": rows.prod}[op](axis=0)
    return total.tolist()


@pytest.mark.parametrize("op", ["sum", "average"])
@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_every_set_of_joined_ranks_gives_horovods_factor(op, size):
    for count in range(size):
        for joined in itertools.combinations(range(size), count):
            reading = read_probe(reduced(size, joined, op, 0.5), size, CODE)
            assert reading.ranks == tuple(r for r in range(size) if r not in joined)
            assert reading.scale == pytest.approx(0.5 / size if op == "average" else 0.5)


@pytest.mark.parametrize("op", ["max", "min", "product"])
@pytest.mark.parametrize("size", [2, 3, 4])
def test_other_ops_are_refused_with_and_without_joined_ranks(op, size):
    for count in range(size):
        for joined in itertools.combinations(range(size), count):
            with pytest.raises(ValueError, match=UNSUPPORTED_OP):
                read_probe(reduced(size, joined, op), size, CODE)


def test_adasum_of_two_ranks_is_refused():
    a, b = (np.array(probe_values(rank, CODE, 2)) for rank in (0, 1))
    dot = a @ b
    adasum = (1 - dot / (2 * a @ a)) * a + (1 - dot / (2 * b @ b)) * b
    with pytest.raises(ValueError, match=UNSUPPORTED_OP):
        reduction_scale(adasum.tolist(), 2, CODE)


def test_plans_that_differ_among_the_ranks_still_active_are_caught():
    other = plan_code("reduce-scatter", [(0, 2048), (2048, 4096), (4096, 4096)])
    assert other != CODE
    probe = reduced(4, joined=(3,), codes={1: other})
    with pytest.raises(ValueError, match="cut or send this tensor differently"):
        read_probe(probe, 4, CODE)
    assert MISMATCH.startswith("ranks cut or send")
    # a joined rank's plan does not matter: it sends nothing
    assert read_probe(reduced(4, joined=(1,), codes={1: other}), 4, CODE).ranks == (0, 2, 3)


def test_a_probe_of_another_length_is_refused():
    with pytest.raises(ValueError, match="elements"):
        read_probe(probe_values(0, CODE, 3), 2, CODE)
