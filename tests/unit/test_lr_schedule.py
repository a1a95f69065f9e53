"""The language-model benchmarks' learning-rate schedule (benchmarks/schedule.py): warm-up,
cosine decay to a floor, the flat tail after --decay-until that the plateau check needs, and
the checks that refuse a schedule before convergence.py starts any run."""

import argparse
import math
import sys

import pytest

from benchmarks import convergence, schedule
from benchmarks.schedule import add_schedule_arguments, check_schedule, learning_rate


def parsed(*argv, defaults=schedule.TRANSFORMER, steps=100):
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=steps)
    add_schedule_arguments(parser, **defaults)
    args = parser.parse_args(list(argv))
    check_schedule(parser, args)
    return args


def test_warm_up_then_cosine_to_the_floor_at_the_last_step():
    args = parsed()
    rates = [learning_rate(step, args) for step in range(1, 101)]
    assert rates[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    # halfway through the decay (steps 6..100): the middle of the cosine
    assert learning_rate(5 + 95 // 2, args) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert rates[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))


@pytest.mark.parametrize("steps", [1, 2, 7, 100, 800, 1600])
def test_the_transformers_default_is_the_schedule_it_had_before_decay_until(steps):
    """Runs measured before --decay-until existed used this formula; their numbers stand."""
    args = parsed(steps=steps)
    warmup = max(1, round(0.05 * steps))
    for step in range(1, steps + 1):
        if step <= warmup:
            before = step / warmup
        else:
            progress = (step - warmup) / max(1, steps - warmup)
            before = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        assert learning_rate(step, args) == pytest.approx(before, abs=1e-15), (step, steps)


def test_decay_until_keeps_the_floor_over_the_tail():
    args = parsed("--decay-until", "0.8")
    assert learning_rate(80, args) == pytest.approx(0.1)
    assert learning_rate(79, args) > 0.1
    assert [learning_rate(step, args) for step in range(80, 101)] == pytest.approx([0.1] * 21)
    # the decay is the same curve, compressed into steps 6..80
    assert learning_rate(5 + 75 // 2, args) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 37 / 75)))


def test_char_lm_defaults_keep_the_rate_constant():
    args = parsed(defaults=schedule.CHAR_LM)
    assert {learning_rate(step, args) for step in range(1, 101)} == {1.0}


@pytest.mark.parametrize("argv, first", [
    (["--decay-until", "0.04"], "--decay-until"), (["--decay-until", "1.5"], "--decay-until"),
    (["--min-lr", "-0.1"], "--min-lr"), (["--min-lr", "2"], "--min-lr"),
    (["--lr-warmup", "1"], "--lr-warmup"),
    (["--lr-warmup", "0.9", "--decay-until", "0.8"], "--decay-until"),
    (["--min-lr", "1", "--decay-until", "0.8"], "--decay-until ends a decay")])
def test_bad_schedules_are_refused_naming_the_option(argv, first, capsys):
    with pytest.raises(SystemExit):
        parsed(*argv)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.split("error: ", 1)[1].startswith(first), error


def convergence_args(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["convergence.py", *argv])
    return convergence.parse_args()


def test_convergence_checks_the_schedule_with_each_tasks_defaults(monkeypatch, capsys):
    # the default task (digits) takes no schedule, and runs without one
    assert set(convergence.schedule_options(convergence_args(monkeypatch)).values()) == {None}
    for argv, message in ((["--task", "digits", "--min-lr", "0.1"], "language models'"),
                          (["--task", "char-lm", "--decay-until", "0.8"], "--min-lr below 1"),
                          (["--task", "transformer", "--decay-until", "0.03"],
                           "(0.05, 1]")):
        with pytest.raises(SystemExit):
            convergence_args(monkeypatch, *argv)
        assert message in capsys.readouterr().err, argv
    args = convergence_args(monkeypatch, "--task", "char-lm", "--min-lr", "0.1",
                            "--decay-until", "0.8")
    assert convergence.schedule_options(args) == {"--lr-warmup": None, "--min-lr": 0.1,
                                                  "--decay-until": 0.8}
