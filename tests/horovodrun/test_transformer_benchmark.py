"""convergence.py --task transformer for a few steps on 2 real Horovod workers: the GPT-style
decoder with AdamW trains, uncompressed and at 2 bits with docs/overrides.md's per-layer
settings, and the per-layer statistics reach convergence_transformer_layers.csv."""

import csv
import math
import os
import subprocess
import sys

import pytest

from launch import ROOT

pytestmark = pytest.mark.horovodrun

OVERRIDDEN = "tnq-rht:bits=2,overrides=docs"


def test_transformer_task_short_run(tmp_path):
    # seeds=1 is taken off the spec before the worker sees it
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.convergence", "--task", "transformer",
         "--baselines", "none", "--schemes", "--extra-configs", OVERRIDDEN + ",seeds=1",
         "--steps", "12", "--eval-every", "4", "--diagnose-every", "4",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    with open(tmp_path / "convergence_transformer.csv") as f:
        points = list(csv.DictReader(f))
    assert [(row["compressor"], int(row["step"])) for row in points] == [
        (spec, step) for spec in ("none", OVERRIDDEN) for step in (4, 8, 12)]
    for spec in ("none", OVERRIDDEN):
        test = [float(row["test_loss"]) for row in points if row["compressor"] == spec]
        train = [float(row["train_loss_window"]) for row in points if row["compressor"] == spec]
        # next-byte cross-entropy starts at chance level's ln(256) = 5.5 and falls under AdamW
        assert all(math.isfinite(loss) for loss in test + train)
        assert test[-1] < test[0] < math.log(256) and train[-1] < train[0], (spec, test, train)
    assert (tmp_path / "convergence_transformer.png").stat().st_size > 10_000
    table = {line.split("|")[2].strip(): [cell.strip() for cell in line.split("|")]
             for line in done.stdout.splitlines()
             if line.startswith("| ") and not line.startswith("| bits")}
    assert set(table) == {"none", OVERRIDDEN}
    assert table["none"][5] == "1.0000"  # the test loss ratio to itself
    # bytes handed to Horovod per step: 4 per parameter uncompressed, far fewer at 2 bits
    # (8-bit embedding and head, a few small tensors uncompressed included)
    none_mb, tnq_mb = float(table["none"][8]), float(table[OVERRIDDEN][8])
    assert none_mb > 0 and tnq_mb < 0.3 * none_mb
    with open(tmp_path / "convergence_transformer_layers.csv") as f:
        layers = {row["parameter"]: row for row in csv.DictReader(f)
                  if row["compressor"] == OVERRIDDEN}
    linear = layers["blocks.layers.0.linear1.weight"]
    # the overrides took: the embedding at 8 bits (less its untouched rows, sent as zero runs),
    # the blocks' matrices at 2, the LayerNorms uncompressed
    assert 0 < float(layers["embed.weight"]["bits_per_element"]) < 8.5
    assert 2 < float(linear["bits_per_element"]) < 2.5
    assert layers["blocks.layers.0.norm1.weight"]["bits_per_element"] == ""
    # the measured error of the averaged gradient: small at 8 bits, 2 bits' order at 2 bits
    assert float(layers["head.weight"]["measured_relative_error"]) < 0.01
    assert 0.01 < float(linear["measured_relative_error"]) < 0.5
    assert float(linear["adam_exp_avg_sq"]) > 0
