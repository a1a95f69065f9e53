"""examples/train_transformer.py for a few steps on 2 real Horovod workers: per-layer settings
and TensorBoard metrics as a user would run them."""

import json
import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch import ROOT, horovodrun_command, worker_env
from launch import run as run_command


@pytest.fixture(scope="module", params=["stock", "fused"])
def run(request, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("transformer") / "tb"
    command = horovodrun_command(2, None, [os.path.join(ROOT, "examples", "train_transformer.py"),
                                           "--steps", "20", "--log-every", "5", "--logdir",
                                           str(logdir)])
    if request.param == "fused":
        command.append("--fused")
    done = run_command(command, worker_env(tf_log_level="2"), timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if '"example"' in line)
    report = json.loads(line[line.index("{"):])
    events = EventAccumulator(str(logdir))
    events.Reload()
    return request.param, report, events


def test_the_transformer_learns(run):
    _, report, _ = run
    assert report["last_loss"] < report["first_loss"] < report["uniform_loss"]


def test_event_file_holds_the_loss_and_the_compressor_metrics(run):
    optimizer, _, events = run
    tags = events.Tags()["scalars"]
    for tag in ("train/loss", "horovod_tnq/step/wire_bits_per_element",
                "horovod_tnq/step/relative_error", "horovod_tnq/step/encode_seconds",
                "horovod_tnq/total/payload_bytes"):
        assert [s.step for s in events.Scalars(tag)] == [5, 10, 15, 20], tag
    per_tensor = {tag.split("/")[2] for tag in tags if tag.startswith("horovod_tnq/tensors/")}
    if optimizer == "stock":  # one entry per compressed parameter, by its name
        assert {"embed.weight", "head.weight", "blocks.layers.0.linear1.weight"} <= per_tensor
        assert not any("norm" in name for name in per_tensor)  # sent uncompressed
        embed = events.Scalars("horovod_tnq/tensors/embed.weight/bits_per_element")[-1]
        linear = events.Scalars(
            "horovod_tnq/tensors/blocks.layers.0.linear1.weight/bits_per_element")[-1]
        # 8 bits on the embedding, less its untouched rows (zero runs, core/codec.py), 3 bits
        # on the rest: the embedding's error far below theirs
        assert 0 < embed.value < 8.5 and 3 < linear.value < 3.5
        embed_error, linear_error = (events.Scalars(f"horovod_tnq/tensors/{name}/relative_error")
                                     [-1].value for name in ("embed.weight",
                                                             "blocks.layers.0.linear1.weight"))
        assert embed_error < 0.05 * linear_error
    else:  # one per bucket: buckets hold tensors of one setting each
        assert per_tensor and all(name.startswith("fused.") for name in per_tensor)
    error = events.Scalars("horovod_tnq/step/relative_error")[-1].value
    assert 0 < error < 0.1
