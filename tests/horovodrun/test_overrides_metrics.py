"""Per-tensor overrides and live metrics on real Horovod workers (horovodrun, Gloo, 2 ranks):
PyTorch's stock and fused optimizers, TensorFlow's DistributedGradientTape in tf.function."""

import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch import run_workers, same_on_all_ranks


@pytest.fixture(scope="module")
def torch_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("overrides_torch")
    return run_workers("overrides_torch.py", 2, out), out


@pytest.fixture(scope="module")
def tf_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("overrides_tf")
    return run_workers("overrides_tf.py", 2, out), out


def events(out, rank):
    accumulator = EventAccumulator(str(out / "tb" / f"rank{rank}"))
    accumulator.Reload()
    return accumulator


@pytest.mark.parametrize("optimizer", ["stock", "fused"])
def test_torch_overrides_pick_each_tensor_settings(torch_job, optimizer):
    reports, _ = torch_job
    reduced = same_on_all_ranks(reports, optimizer)
    # "norm.*": None: Horovod's own uncompressed average, exactly
    assert reduced["norm.weight"]["exact"] and reduced["norm.bias"]["exact"]
    # "embed.*": 8 bits, far more accurate than the 2 bits of the rest
    assert reduced["embed.weight"]["relative_error"] < 1e-3
    for name in ("fc.weight", "fc.bias"):
        assert 0.01 < reduced[name]["relative_error"] < 0.3
    assert same_on_all_ranks(reports, "resolved") == {
        "embed.weight": 8, "norm.weight": None, "norm.bias": None, "fc.weight": 2,
        "fc.bias": 2}


def test_fused_optimizer_buckets_tensors_by_their_settings(torch_job):
    reports, _ = torch_job
    assert sorted(same_on_all_ranks(reports, "fused_buckets"), key=str) == \
        sorted([[2, 2], [None, 2], [8, 1]], key=str)
    for report in reports:  # each bucket a tensor of the metrics, the uncompressed one counted
        tensors = report["fused_metrics"]["tensors"]
        assert len(tensors) == 3
        assert sum(t["passthrough_elements"] for t in tensors.values()) == 128


def test_ranks_with_different_overrides_fail_loudly(torch_job):
    reports, _ = torch_job
    for rank, report in enumerate(reports):
        assert f"overrides: [['embed.*', {{'bits': {6 if rank == 0 else 8}}}]] on rank " \
            f"{1 - rank}" in report["mismatch"]


def test_fused_ranks_resolving_other_settings_fail_loudly(torch_job):
    for report in torch_job[0]:
        assert "built the fused DistributedOptimizer differently" in report["fused_mismatch"]


def test_torch_metrics_count_what_was_sent(torch_job):
    for report in torch_job[0]:
        metrics = report["stock_metrics"]
        embed, fc = metrics["tensors"]["embed.weight"], metrics["tensors"]["fc.weight"]
        # 8 bits on the embedding, less the rows no token touched (they travel as zero runs,
        # core/codec.py: about 28% of its 200 rows for 256 random tokens), 2 bits on fc
        assert 5 < embed["bits_per_element"] < 8.5 and 2 < fc["bits_per_element"] < 2.5
        assert metrics["tensors"]["norm.weight"]["passthrough_bytes"] == 64 * 4
        step = metrics["last_step"]
        assert step["tensors"] == 5 and step["passthrough_elements"] == 128
        assert step["compressed_elements"] == 200 * 64 + 64 * 512 + 512
        assert step["payload_bytes"] == sum(t["payload_bytes"]
                                            for t in metrics["tensors"].values())
        assert step["encode_seconds"] > 0 and step["decode_seconds"] > 0
        assert metrics["total"]["exchanges"] == 5


def test_error_estimate_matches_the_true_error_of_the_average(torch_job):
    """Each rank estimates its own quantization error from its payloads' headers; with
    unbiased independent errors the average's squared error is their sum over N^2."""
    for name, check in same_on_all_ranks(torch_job[0], "stock_estimates").items():
        assert 0.7 < check["estimated"] / check["true"] < 1.4, (name, check)


def test_torch_log_metrics_writes_tensorboard_scalars(torch_job):
    _, out = torch_job
    tags = events(out, 0).Tags()["scalars"]
    for tag in ("horovod_tnq/step/bits_per_element", "horovod_tnq/step/relative_error",
                "horovod_tnq/total/payload_bytes", "horovod_tnq/step/encode_seconds",
                "horovod_tnq/tensors/embed.weight/relative_error",
                "horovod_tnq/tensors/fc.weight/bits_per_element"):
        assert tag in tags, tags
    bits = events(out, 0).Scalars("horovod_tnq/tensors/embed.weight/bits_per_element")
    assert bits[0].step == 1 and 5 < bits[0].value < 8.5  # (untouched rows: zero runs)


def test_tf_tape_overrides_match_variable_names(tf_job):
    reports, _ = tf_job
    assert same_on_all_ranks(reports, "resolved") == {"embed": 8, "norm_scale": None,
                                                      "fc_kernel": 2}
    tape = same_on_all_ranks(reports, "tape")
    assert tape["norm_scale"]["exact"]
    assert tape["embed"]["relative_error"] < 1e-3
    assert 0.01 < tape["fc_kernel"]["relative_error"] < 0.3


def test_keras3_optimizer_overrides_match_variable_paths(tf_job):
    resolved = same_on_all_ranks(tf_job[0], "keras3")
    assert resolved == {"sequential/embed/embeddings": 8, "sequential/norm/gamma": None,
                        "sequential/norm/beta": None, "sequential/out/kernel": 2,
                        "sequential/out/bias": 2}, resolved


@pytest.mark.parametrize("setting", ["exchange", "part_elements"])
def test_tf_graph_ranks_with_different_exchanges_fail_at_tracing(tf_job, setting):
    for report in tf_job[0]:
        message = report["mismatch"][setting]
        assert message and "ranks use different compressor settings" in message, message
        assert f"{setting}: " in message


def test_tf_graph_traced_before_a_reset_refuses_to_run(tf_job):
    for report in tf_job[0]:
        assert "traced before the compressor's reset()" in report["stale_graph"]


def test_variables_sharing_one_gradient_tensor_keep_their_own_settings(tf_job):
    assert same_on_all_ranks(tf_job[0], "shared_gradient") == {"shared_a": None,
                                                               "shared_b": 8}


def test_tf_metrics_count_each_graph_run(tf_job):
    for report in tf_job[0]:
        metrics = report["metrics"]
        # the graph ran twice: the last step counts each tensor once, the total its payloads
        # twice; uncompressed tensors are counted once, when traced (docs/overrides.md)
        assert metrics["last_step"]["passthrough_elements"] == 64
        assert metrics["total"]["passthrough_elements"] == 64
        assert metrics["total"]["payload_bytes"] == 2 * metrics["last_step"]["payload_bytes"]
        assert 0.05 < metrics["tensors"]["fc_kernel"]["relative_error"] < 0.3
        assert metrics["tensors"]["embed"]["bits_per_element"] > 5  # 8 bits, but zero runs


def test_tf_log_metrics_writes_summaries(tf_job):
    _, out = tf_job
    accumulator = events(out, 1)
    tags = accumulator.Tags()["tensors"]
    assert "horovod_tnq/step/relative_error" in tags, tags
    assert "horovod_tnq/tensors/fc_kernel/bits_per_element" in tags
    assert os.listdir(out / "tb" / "rank0")
