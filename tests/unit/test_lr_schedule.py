"""The language-model benchmarks' learning-rate schedule (benchmarks/lm_worker.py): warm-up,
cosine decay to a floor, and the flat tail after --decay-until that the plateau check needs."""

import argparse
import math

import pytest

from benchmarks.lm_worker import add_schedule_arguments, check_schedule, learning_rate


def schedule(*argv, warmup=0.05, floor=0.1):
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=100)
    add_schedule_arguments(parser, warmup=warmup, floor=floor)
    args = parser.parse_args(list(argv))
    check_schedule(parser, args)
    return args


def test_warm_up_then_cosine_to_the_floor_at_the_last_step():
    args = schedule()
    rates = [learning_rate(step, args) for step in range(1, 101)]
    assert rates[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    # halfway through the decay (steps 6..100): the middle of the cosine
    assert learning_rate(5 + 95 // 2, args) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert rates[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))


def test_decay_until_keeps_the_floor_over_the_tail():
    args = schedule("--decay-until", "0.8")
    assert learning_rate(80, args) == pytest.approx(0.1)
    assert learning_rate(79, args) > 0.1
    assert [learning_rate(step, args) for step in range(80, 101)] == pytest.approx([0.1] * 21)
    # the decay is the same curve, compressed into steps 6..80
    assert learning_rate(5 + 75 // 2, args) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 37 / 75)))


def test_char_lm_defaults_keep_the_rate_constant():
    args = schedule(warmup=0.0, floor=1.0)
    assert {learning_rate(step, args) for step in range(1, 101)} == {1.0}


@pytest.mark.parametrize("argv", [["--decay-until", "0.04"], ["--decay-until", "1.5"],
                                  ["--min-lr", "-0.1"], ["--min-lr", "2"],
                                  ["--lr-warmup", "0.9", "--decay-until", "0.8"]])
def test_bad_schedules_are_refused_naming_the_options(argv, capsys):
    with pytest.raises(SystemExit):
        schedule(*argv)
    assert "--decay-until" in capsys.readouterr().err
