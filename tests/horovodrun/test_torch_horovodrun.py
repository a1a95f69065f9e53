"""TNQCompressor on real Horovod workers (horovodrun): over Gloo at 2 and 3 ranks, and over MPI
(`horovodrun --mpi`) once each, the checks at 3 ranks (both exchanges, uneven chunks) and the
training at 2 (stock and fused optimizers); the MPI runs skip where Horovod has no MPI."""

import pytest

from horovod_tnq import core
from launch import run_workers, same_on_all_ranks, worker_runs


@pytest.fixture(scope="module", params=worker_runs(("gloo", 2), ("gloo", 3), ("mpi", 3)))
def checks(request, tmp_path_factory):
    controller, num_proc = request.param
    return run_workers("torch_checks.py", num_proc, tmp_path_factory.mktemp("checks"),
                       controller=controller)


@pytest.fixture(scope="module", params=worker_runs(("gloo", 2), ("gloo", 3), ("mpi", 2)))
def training(request, tmp_path_factory):
    controller, num_proc = request.param
    return run_workers("torch_train.py", num_proc, tmp_path_factory.mktemp("train"),
                       controller=controller)


@pytest.mark.parametrize("case", ["average", "sum", "class", "scaled", "anonymous"])
def test_reduced_gradient_is_within_the_quantizer_bound(checks, case):
    for report in checks:
        entry = report[case]
        assert entry["error"] <= entry["bound"], entry
        # and it is a real reduction, not noise: the error is far below the signal
        assert entry["error"] < 0.2 * entry["truth_norm2"], entry


@pytest.mark.parametrize("case", ["average", "sum", "class"])
def test_all_ranks_hold_bit_identical_results(checks, case):
    same_on_all_ranks(checks, case, "digest")


def test_sum_is_size_times_average(checks):
    for report in checks:
        size = report["size"]
        assert report["sum"]["truth_norm2"] == pytest.approx(
            size ** 2 * report["average"]["truth_norm2"])
        assert report["sum"]["error"] <= report["sum"]["bound"]


@pytest.mark.parametrize("dtype", ["torch.float16", "torch.bfloat16", "torch.float64"])
def test_dtype_and_shape_are_kept(checks, dtype):
    entry = same_on_all_ranks(checks, "dtypes", dtype)
    assert entry["dtype"] == dtype and entry["shape"] == [200, 300]
    # fp16 / bf16 rounding of the result adds a little on top of the quantizer's bound
    assert entry["error"] <= 1.2 * entry["bound"]


def test_small_and_integer_tensors_pass_through_exactly(checks):
    for report in checks:
        passthrough = report["passthrough"]
        assert passthrough["small_equal"] and passthrough["int_equal"]
        assert passthrough["stats"]["compressed_tensors"] == 0
        assert passthrough["stats"]["passthrough_tensors"] == 2


def test_nan_and_inf_propagate_like_uncompressed_horovod(checks):
    entry = same_on_all_ranks(checks, "nonfinite")
    assert entry["nan_at_5"] and entry["inf_at_7"] == float("inf") and entry["finite_elsewhere"]


def test_ranks_with_different_bits_fail_loudly(checks):
    for report in checks:  # at the first step, naming the setting and the rank
        assert report["mismatched_bits"]["raised"] == "ValueError"
        assert "ranks use different compressor settings (bits:" in \
            report["mismatched_bits"]["message"]


def test_unsupported_op_is_refused(checks):
    for report in checks:
        assert report["op_max"]["raised"] == "ValueError"
        assert "op=Average and op=Sum" in report["op_max"]["message"]


def test_unsupported_device_is_refused(checks):
    for report in checks:
        assert report["meta_device"]["raised"] == "TypeError"
        assert "device meta" in report["meta_device"]["message"]


def test_seed_reproduces_and_changes_the_result(checks):
    for report in checks:
        assert report["seeds"]["same_seed_same_result"]
        assert report["seeds"]["other_seed_other_result"]


@pytest.mark.parametrize("config", ["named", "class_accumulate_predivide", "grouped",
                                    "error_feedback", "reduce_scatter", "uncompressed", "topk",
                                    "tnq_sparse", "dqsgd", "fused", "fused_accumulate_sum",
                                    "fused_reduce_scatter"])
def test_parameters_stay_in_sync_and_training_progresses(training, config):
    digests = same_on_all_ranks(training, config, "digests")
    assert len(set(digests)) == len(digests)  # the weights change every step
    losses = training[0][config]["losses"]
    assert sum(losses[-3:]) < 0.6 * sum(losses[:3]), losses


@pytest.mark.parametrize("config", ["named", "grouped", "reduce_scatter", "fused",
                                    "fused_reduce_scatter"])
def test_compressed_training_tracks_uncompressed(training, config):
    final = sum(training[0][config]["losses"][-3:]) / 3
    reference = sum(training[0]["uncompressed"]["losses"][-3:]) / 3
    assert abs(final - reference) < 0.1, (final, reference)


def test_every_registered_scheme_reduces_correctly(checks):
    schemes = same_on_all_ranks(checks, "schemes")
    for scheme, entry in schemes.items():
        # Averaging N independent compressions of independent inputs keeps the NMSE of one;
        # the reduce-scatter adds a second quantization of about the same NMSE.
        passes = 2 if entry["exchange"] == "reduce-scatter" else 1
        assert entry["nmse"] <= 2 * passes * entry["single_nmse"], (scheme, entry)
    # on this Laplace data TNQ beats every scheme that reached the ranks the same way
    kind = schemes["tnq"]["exchange"]
    tnq_family = min(schemes[s]["nmse"] for s in ("tnq", "tnq-fit", "tnq-opt"))
    assert tnq_family < min(e["nmse"] for s, e in schemes.items()
                            if not s.startswith("tnq") and e["exchange"] == kind)
    for scheme, entry in schemes.items():  # what each rank hands to Horovod's allgather
        if entry["exchange"] == "allgather" and entry["fixed_size"]:
            assert entry["payload_bytes"] == core.encoded_size(60_000, entry["bits"], 512,
                                                               scheme=scheme), scheme


def test_finish_decodes_into_the_gradient_it_was_given(checks):
    for report in checks:
        entry = report["decode_into"]
        for kind in ("allgather", "reduce-scatter"):
            float32, bfloat16 = f"{kind}.torch.float32", f"{kind}.torch.bfloat16"
            assert entry[f"{float32}.same.shares"] and entry[f"{float32}.same.equal"], kind
            # float64 memory cannot hold a float32 result, numpy has no bfloat16: both ignored
            assert not entry[f"{float32}.float64.shares"], kind
            assert entry[f"{float32}.float64.equal"], kind
            assert not entry[f"{bfloat16}.same.shares"] and entry[f"{bfloat16}.same.equal"]
            for dtype in (float32, bfloat16):
                error = entry[f"{dtype}.error"]
                # bfloat16 rounding of the result adds a little on top of the quantizer's bound
                assert error["error"] <= 1.2 * error["bound"], (dtype, error)


def test_fused_optimizer_reduces_into_gradients_of_any_kind(checks):
    for report in checks:
        fused = report["decode_into"]["fused"]
        assert fused["lone"]["keeps_memory"]  # decoded into the gradient backward made
        assert fused["bfloat16"]["dtype"] == "torch.bfloat16"
        # sparse_as_dense=True: reduced dense, handed back sparse, as Horovod does
        assert not fused["sparse"]["dense"]
    for key in ("allgather.torch.float32.digest", "reduce-scatter.torch.float32.digest",
                "allgather.torch.bfloat16.digest", "reduce-scatter.torch.bfloat16.digest"):
        assert len({report["decode_into"][key] for report in checks}) == 1, key
    for case in ("lone", "bucket", "bfloat16", "sparse"):
        assert len({report["decode_into"]["fused"][case]["digest"] for report in checks}) == 1


def test_error_feedback_helps_2bit_training(training):
    def final(config):
        return sum(training[0][config]["losses"][-5:]) / 5
    assert final("error_feedback") < final("no_feedback_2bit") + 0.02, (
        final("error_feedback"), final("no_feedback_2bit"))


@pytest.mark.parametrize("case", ["checkpoint", "checkpoint_reduce_scatter"])
def test_checkpoint_restores_error_feedback_exactly(training, case):
    for report in training:
        entry = report[case]
        assert entry["residuals"], "error feedback kept no residual"
        assert entry["resumed"] == entry["continued"]


@pytest.mark.parametrize("kind", ["allgather", "reduce-scatter"])
def test_each_exchange_reduces_within_its_bound_at_any_size(checks, kind):
    for report in checks:
        entry = report[kind]
        assert entry["exchange"] == kind and entry["stats"][kind] == 1
        assert entry["error"] <= entry["bound"], entry
        assert entry["error"] < 0.2 * entry["truth_norm2"], entry
    same_on_all_ranks(checks, kind, "digest")


def test_auto_takes_the_reduce_scatter_where_it_sends_fewer_bits(checks):
    """Per element the allgather sends (N - 1) b bits, the reduce-scatter (N - 1) / N (b + b2)
    with b2 = b + 2 + ceil(log4 N) (protocol/plan.py): at 3 ranks fewer at 4 bits (2/3 * 11 <
    8), not at 3 bits (2/3 * 9 = 6); at 2 ranks never."""
    for report in checks:
        size = report["size"]
        expected = "reduce-scatter" if size >= 3 else "allgather"
        stats = report["auto_stats"]  # 4 bits
        assert stats[expected] == 1 and stats["compressed_tensors"] == 1
        expected = "reduce-scatter" if size >= 4 else "allgather"
        assert report["average"]["exchange"] == expected  # 3 bits


@pytest.mark.parametrize("case", ["mixed_exchanges", "mixed_parts", "mixed_two_tensors"])
def test_ranks_with_different_settings_fail_loudly_without_hanging(checks, case):
    for report in checks:
        assert report[case]["raised"] == "ValueError"
        assert "ranks use different compressor settings" in report[case]["message"]


def test_reduce_scatter_survives_ranks_decompressing_in_different_orders(checks):
    for index in range(2):
        entry = same_on_all_ranks(checks, "out_of_order", index)
        assert entry["error"] <= entry["bound"], entry


@pytest.mark.parametrize("scheme", ["topk", "tnq_sparse"])
def test_sparsifying_schemes_train_with_their_default_error_feedback(training, scheme):
    def final(config):
        return sum(training[0][config]["losses"][-5:]) / 5
    # Top-K and sparse TNQ drop most of the gradient each step at 1 bit; what error feedback
    # puts back is what makes them train like the uncompressed run
    assert final(scheme) < final(f"{scheme}_no_feedback"), (
        final(scheme), final(f"{scheme}_no_feedback"))
    assert final(scheme) < final("uncompressed") + 0.1


@pytest.mark.parametrize("scheme", ["topk", "tnq-sparse", "dqsgd", "dp-binomial"])
def test_adaptive_schemes_reduce_exactly_as_the_core_decodes(checks, scheme):
    entry = same_on_all_ranks(checks, "adaptive", scheme)
    assert all(entry["exact"]) and len(entry["exact"]) == 2
    assert entry["digests"][0] != entry["digests"][1]  # fresh rounding (and noise) each step
    if scheme in ("topk", "tnq-sparse", "dqsgd"):  # each rank chose its own K / width
        assert len(set(entry["payload_sizes"][0])) > 1
    if scheme == "dqsgd":
        assert len(set(entry["widths"])) > 1


@pytest.mark.parametrize("scheme", ["topk", "tnq-sparse"])
def test_sparse_payloads_stay_within_the_budget(checks, scheme):
    entry = same_on_all_ranks(checks, "adaptive", scheme)
    for sizes in entry["payload_sizes"]:
        assert max(sizes) <= 2 * 60_000 // 8
    for report in checks:  # the compressor's byte count is what it handed to Horovod
        for sent, reconstructed in report["adaptive"]["bytes_sent"].values():
            assert sent == reconstructed


def test_dp_accounting_on_every_rank_matches_the_core(checks):
    for report in checks:
        entry = report["adaptive"]["dp-binomial"]
        assert entry["privacy"] == entry["privacy_core"]
        assert entry["privacy"]["steps"] == 2
        assert entry["privacy"]["epsilon"] <= 2 * 4.0 and entry["privacy"]["epsilon"] > 0


@pytest.mark.parametrize("scheme", ["topk", "tnq-sparse"])
def test_sparsifying_schemes_keep_residuals_by_default_and_ranks_agree(checks, scheme):
    entry = same_on_all_ranks(checks, "adaptive", f"{scheme}_feedback")
    assert entry["error_feedback"] == 1.0
    assert entry["residuals"] == [f"adaptive.{scheme}.feedback"]


def test_ranks_with_different_schemes_fail_loudly(checks):
    for report in checks:
        assert report["adaptive"]["mixed_schemes"]["raised"] == "ValueError"
        assert "scheme: " in report["adaptive"]["mixed_schemes"]["message"]


@pytest.mark.parametrize("config, buckets", [("fused", 2), ("fused_reduce_scatter", 1)])
def test_fused_optimizer_compresses_one_payload_per_bucket(training, config, buckets):
    # fused: buckets of at most 5000 elements, the smallest (324 elements) below min_numel;
    # default bucket size: the whole 12,740-element model in one bucket
    for report in training:
        assert report[config]["compressed_per_step"] == buckets


def test_fused_optimizer_sends_zeros_for_parameters_a_rank_did_not_use(training):
    digests = same_on_all_ranks(training, "fused_edge_cases", "unused_digests")
    assert len(set(digests)) == len(digests)


def test_fused_optimizer_refuses_ranks_with_different_settings(training):
    for report in training:
        entry = report["fused_edge_cases"]["mismatch"]
        assert entry["raised"] == "ValueError" and "differently" in entry["message"]


def test_a_tensor_sent_in_parts_reduces_like_a_whole_one(checks):
    entry = same_on_all_ranks(checks, "parts", "digest")
    for report in checks:
        entry = report["parts"]
        assert entry["error"] <= entry["bound"], entry
        assert entry["stats"]["compressed_tensors"] == 1
        # 8 payloads of at most 7,680 elements (15 buckets of 512), each with its own header
        per_part = 32 + 15 * 4 + 7680 * 3 // 8
        assert 7 * per_part < entry["stats"]["payload_bytes"] <= 8 * per_part
