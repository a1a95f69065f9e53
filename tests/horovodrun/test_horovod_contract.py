"""Horovod's own DistributedOptimizer contract, kept by horovod_tnq: Horovod 0.28.1's optimizer
tests (workers/horovod_optimizer_tests.py, pinned from its test/parallel/test_torch.py with its
license) run under `horovodrun -np 2 --gloo` in one launch, uncompressed, with the stock
hvd.DistributedOptimizer given a TNQCompressor, and with horovod_tnq's fused DistributedOptimizer
substituted (workers/horovod_contract.py). Each must end as it does uncompressed, except for the
differences listed in EXPECTED_DIFFERENCES, each with its reason."""

import json
import os

import pytest

from launch import run_workers


HOROVOD_OPTIMIZER_TESTS = [
    "test_broadcast_state", "test_broadcast_state_options", "test_broadcast_state_no_grad",
    "test_force_allreduce", "test_duplicate_names", "test_dynamic_requires_grad",
    "test_gradient_clipping", "test_synchronize_step_warning", "test_no_named_parameters",
    "test_missing_named_parameters", "test_optimizer_no_named_parameters",
    "test_sparse_embeddings", "test_optimizer_process_sets",
]
VARIANTS = ["stock", "fused"]
# (variant, test): (the outcome's beginning, why it differs from uncompressed Horovod's)
EXPECTED_DIFFERENCES = {}
NUM_PROC = 2
# one test's limit inside the launch (a hang ends the launch with "timeout" for it); the tests
# take seconds each, the longest (broadcast_state) about a minute on 2 loaded cores
TEST_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{variant: {test: outcome}} of rank 0, checked equal on every rank; a launch that failed
    (a test hung) keeps the outcomes written before it, the failure under "launch"."""
    out = tmp_path_factory.mktemp("horovod_contract")
    failure = None
    try:
        run_workers("horovod_contract.py", NUM_PROC, out, timeout=3000,
                    args=[str(TEST_TIMEOUT_S)])
    except AssertionError as error:
        failure = str(error)
    reports = []
    for rank in range(NUM_PROC):
        path = os.path.join(out, f"rank{rank}.json")
        with open(path) if os.path.exists(path) else open(os.devnull) as f:
            reports.append(json.loads(f.read() or "{}"))
    return {"ranks": reports, "launch": failure}


def outcome_of(outcomes, variant, test):
    """The test's outcome on every rank (one string when they agree)."""
    found = [report.get(variant, {}).get(test, "not run") for report in outcomes["ranks"]]
    if outcomes["launch"] and "not run" in found:
        found.append(f"(the launch failed: {outcomes['launch'][-3000:]})")
    return found[0] if len(set(found)) == 1 else found


@pytest.mark.parametrize("test", HOROVOD_OPTIMIZER_TESTS)
def test_horovod_passes_its_own_test_uncompressed(outcomes, test):
    assert outcome_of(outcomes, "uncompressed", test) == "passed"


@pytest.mark.parametrize("test", HOROVOD_OPTIMIZER_TESTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_horovod_tnq_ends_as_uncompressed(outcomes, variant, test):
    got = outcome_of(outcomes, variant, test)
    if (variant, test) in EXPECTED_DIFFERENCES:
        expected, reason = EXPECTED_DIFFERENCES[variant, test]
        assert isinstance(got, str) and got.startswith(expected), (got, reason)
    else:
        assert got == outcome_of(outcomes, "uncompressed", test)


def test_expected_differences_name_their_reason():
    for (variant, test), (outcome, reason) in EXPECTED_DIFFERENCES.items():
        assert variant in VARIANTS and test in HOROVOD_OPTIMIZER_TESTS and outcome and reason
