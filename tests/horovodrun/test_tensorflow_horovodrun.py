"""TNQCompressor for horovod.tensorflow on real Horovod workers: eager, tf.function,
DistributedGradientTape, Keras 2 (horovod.tensorflow.keras) and Keras 3 model.fit. The checks
run over Gloo and over MPI (`horovodrun --mpi`, skipped where Horovod has no MPI); model.fit
over Gloo only."""

import pytest

from horovod_tnq import core

from launch import run_workers, same_on_all_ranks, worker_runs


@pytest.fixture(scope="module", params=worker_runs(("gloo", 2), ("mpi", 2)))
def checks(request, tmp_path_factory):
    controller, num_proc = request.param
    return run_workers("tf_checks.py", num_proc, tmp_path_factory.mktemp("tf_checks"),
                       controller=controller)


@pytest.mark.parametrize("case", ["average", "sum", "scaled", "graph"])
def test_reduced_gradient_is_within_the_quantizer_bound(checks, case):
    for report in checks:
        entry = report[case]
        assert entry["error"] <= entry["bound"], entry
        assert entry["error"] < 0.2 * entry["truth_norm2"], entry


@pytest.mark.parametrize("case", ["average", "sum", "graph"])
def test_all_ranks_hold_bit_identical_results(checks, case):
    same_on_all_ranks(checks, case, "digest")


def test_each_graph_run_draws_fresh_noise(checks):
    graph = same_on_all_ranks(checks, "graph")
    assert graph["digest"] != graph["second_digest"]
    assert graph["second_error"] <= graph["bound"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_dtype_and_shape_are_kept(checks, dtype):
    entry = same_on_all_ranks(checks, "dtypes", dtype)
    assert entry["dtype"] == dtype and entry["shape"] == [200, 300]
    assert entry["error"] <= 1.2 * entry["bound"]


def test_small_tensors_pass_through_exactly(checks):
    assert all(report["passthrough_equal"] for report in checks)


def test_nan_and_inf_propagate_like_uncompressed_horovod(checks):
    entry = same_on_all_ranks(checks, "nonfinite")
    assert entry["nan_at_5"] and entry["inf_at_7"] == float("inf") and entry["finite_elsewhere"]


# each compressor's first use compares every rank's settings (eagerly, also while a graph is
# traced), before any exchange
@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_ranks_with_different_bits_fail_loudly_without_hanging(checks, mode):
    for report in checks:
        entry = report[f"mismatched_bits_{mode}"]
        assert entry["raised"] == "ValueError"
        mine, other = 3 + report["rank"] % 2, 4 - report["rank"] % 2
        assert f"bits: {other} on rank {1 - report['rank']}, {mine} here" in entry["message"]


def test_ranks_with_different_exchanges_fail_loudly_without_hanging(checks):
    for report in checks:
        assert report["mixed_exchanges_eager"]["raised"] == "ValueError"
        assert "exchange: " in report["mixed_exchanges_eager"]["message"]


def test_ranks_cutting_a_tensor_differently_fail_loudly_without_hanging(checks):
    for report in checks:
        assert report["mixed_parts_eager"]["raised"] == "ValueError"
        assert "cut or send this tensor differently" in report["mixed_parts_eager"]["message"]


def test_differentiating_through_a_compressed_allreduce_raises(checks):
    for report in checks:  # TF would return None without a word
        assert report["gradient_through"]["raised"] == "ValueError"
        assert "gradients do not flow" in report["gradient_through"]["message"]


def test_subnormal_gradients_survive_inside_graphs_as_uncompressed(checks):
    for report in checks:
        entry = report["subnormals"]
        assert entry["graph_nonzero"] == entry["uncompressed_nonzero"] > 0


def test_unsupported_op_is_refused_in_graphs(checks):
    for report in checks:
        assert report["op_max_graph"]["raised"] == "InvalidArgumentError"
        assert "op=Average and op=Sum" in report["op_max_graph"]["message"]


def test_gradient_tape_training_stays_in_sync(checks):
    digests = same_on_all_ranks(checks, "tape", "digests")
    assert len(set(digests)) == len(digests)
    losses = checks[0]["tape"]["losses"]
    assert sum(losses[-5:]) < 0.4 * sum(losses[:5]), losses


@pytest.mark.parametrize("flavour", ["keras2", "keras3"])
def test_keras_fit(tmp_path, flavour):
    env = {"TF_USE_LEGACY_KERAS": "1"} if flavour == "keras2" else {}
    reports = run_workers("keras_fit.py", 2, tmp_path, extra_env=env, args=[flavour])
    same_on_all_ranks(reports, "weights")
    assert reports[0]["accuracy"] > 0.8


def test_every_registered_scheme_matches_across_ranks(checks):
    schemes = same_on_all_ranks(checks, "schemes")
    assert set(schemes) == set(core.SCHEMES)
    tnq_family = min(schemes[s]["nmse"] for s in ("tnq", "tnq-fit", "tnq-opt"))
    assert tnq_family < min(e["nmse"] for s, e in schemes.items() if not s.startswith("tnq"))
    for scheme, entry in schemes.items():  # what each rank hands to Horovod's allgather
        if core.SCHEMES[scheme].body is None and core.SCHEMES[scheme].choose_bits is None:
            assert entry["payload_bytes"] == core.encoded_size(60_000, entry["bits"], 512,
                                                               scheme=scheme), scheme


@pytest.mark.parametrize("case", ["error_feedback", "error_feedback_reduce_scatter"])
def test_error_feedback_trains_and_resumes_exactly(checks, case):
    for report in checks:
        entry = report[case]
        assert entry["residuals"], "error feedback kept no residual"
        assert entry["resumed"] == entry["continued"]
    entry = checks[0][case]
    assert sum(entry["losses"][-5:]) < sum(entry["losses_without"][-5:]) + 0.1
    assert sum(entry["losses"][-5:]) < 0.4 * sum(entry["losses"][:5])


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("kind", ["allgather", "reduce-scatter", "parts"])
def test_each_exchange_reduces_within_its_bound(checks, kind, mode):
    for report in checks:
        entry = report[kind][mode]
        assert entry["exchange"] == kind.replace("parts", "allgather")
        assert entry["error"] <= entry["bound"], entry
        assert entry["error"] < 0.2 * entry["truth_norm2"], entry
    same_on_all_ranks(checks, kind, mode, "digest")


@pytest.mark.parametrize("scheme", ["topk", "tnq-sparse", "dqsgd", "dp-binomial"])
def test_adaptive_schemes_reduce_exactly_as_the_core_decodes(checks, scheme):
    entry = same_on_all_ranks(checks, "adaptive", scheme)
    assert entry["exact"] == [True] * 4  # eager and tf.function, two steps each
    assert entry["traces"] == 1  # payload sizes vary, the graph is traced once


def test_dp_accounting_counts_eager_calls_and_graph_runs(checks):
    for report in checks:
        eager, graph, core_account = report["adaptive"]["dp-binomial"]["privacy"]
        assert eager == graph == core_account


@pytest.mark.parametrize("scheme", ["topk", "tnq-sparse"])
def test_sparsifying_schemes_tape_training_with_default_error_feedback(checks, scheme):
    digests = same_on_all_ranks(checks, f"tape_{scheme}", "digests")
    assert len(set(digests)) == len(digests)
    losses = checks[0][f"tape_{scheme}"]["losses"]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses
