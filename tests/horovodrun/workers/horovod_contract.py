"""Runs under `horovodrun -np N --gloo`: Horovod 0.28.1's own DistributedOptimizer tests
(horovod_optimizer_tests.py, pinned from Horovod's test/parallel/test_torch.py) three times in
one launch: as Horovod ships them ("uncompressed"), with every hvd.DistributedOptimizer given
``compression=TNQCompressor(...)`` ("stock"), and with horovod_tnq's fused DistributedOptimizer
in its place ("fused"), each optimizer with a compressor of its own.

Each rank writes OUT_DIR/rank<r>.json, {variant: {test: outcome}} with outcome "passed",
"skipped: ...", "failed: ..." or "error: ...", after every test, so that the results so far
survive a test that hangs: a watchdog then records "timeout" for it, writes the report and ends
the process (the remaining tests are missing from the report).

Usage: horovod_contract.py OUT_DIR [TEST_TIMEOUT_S [VARIANTS [TESTS]]] (comma-separated lists
to run fewer; all by default).
"""

import faulthandler
import json
import os
import sys
import threading
import traceback
import unittest

import horovod.torch as hvd
import horovod.torch.optimizer as horovod_optimizer
import torch

import horovod_optimizer_tests  # sets Horovod's environment before hvd.init(), as in Horovod
import horovod_tnq.torch as tnq

OUT_DIR = sys.argv[1]
TEST_TIMEOUT_S = float(sys.argv[2]) if len(sys.argv) > 2 else 300.0
RANK = int(os.environ["HOROVOD_RANK"])  # set by horovodrun; hvd is not initialized between tests

TESTS = [
    "test_broadcast_state", "test_broadcast_state_options", "test_broadcast_state_no_grad",
    "test_force_allreduce", "test_duplicate_names", "test_dynamic_requires_grad",
    "test_gradient_clipping", "test_synchronize_step_warning", "test_no_named_parameters",
    "test_missing_named_parameters", "test_optimizer_no_named_parameters",
    "test_sparse_embeddings", "test_optimizer_process_sets",
]


# Adaptations to this environment, the same for every variant:
# - Horovod 0.28.1 predates torch.optim.Muon, which refuses parameters that are not 2-D (the
#   tests' models have biases); its ValueError fails broadcast_state, broadcast_state_options and
#   force_allreduce uncompressed, for Muon and every optimizer sorted after it. The tests take
#   torch's optimizers from Optimizer.__subclasses__(), which leaves Muon out here.
# - Horovod's tearDown shuts Horovod down after each test and the next test initializes it
#   again; over Gloo that re-initialization aborted the process at random (gloo::IoException
#   "connect ... Connection refused", uncompressed). Horovod stays initialized here (the tests'
#   hvd.init() is then a no-op), and tests are separated by the barrier of Horovod's tearDown.
#   Without re-initialization, a broadcast after test_optimizer_process_sets (which adds and
#   removes process sets) hung, uncompressed, so that test runs last, for every variant.
_optimizer_classes = torch.optim.Optimizer.__subclasses__
torch.optim.Optimizer.__subclasses__ = staticmethod(
    lambda: [c for c in _optimizer_classes() if c.__name__ != "Muon"])


class ContractTests(horovod_optimizer_tests.TorchTests):
    def tearDown(self):
        if hvd.is_initialized():
            hvd.barrier()

RUN_LAST = {"test_optimizer_process_sets"}


def compressor():
    # 8 bits: near-lossless; min_numel=1: every float gradient is compressed, small ones too
    return tnq.TNQCompressor(bits=8, min_numel=1)


def with_compression(optimizer, *args, **kwargs):
    kwargs.setdefault("compression", compressor())
    return horovod_optimizer.DistributedOptimizer(optimizer, *args, **kwargs)


def fused(optimizer, *args, **kwargs):
    kwargs.setdefault("compression", compressor())
    return tnq.DistributedOptimizer(optimizer, *args, **kwargs)


VARIANTS = {"uncompressed": horovod_optimizer.DistributedOptimizer, "stock": with_compression,
            "fused": fused}


def outcome(result):
    for kind, entries in (("failed", result.failures), ("error", result.errors)):
        for _, text in entries:
            return f"{kind}: {text.strip().splitlines()[-1]}"
    for _, reason in result.skipped:
        return f"skipped: {reason}"
    return "passed"


def main():
    report = {}
    path = os.path.join(OUT_DIR, f"rank{RANK}.json")

    def save():
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(path + ".tmp", path)

    variants = sys.argv[3].split(",") if len(sys.argv) > 3 else list(VARIANTS)
    tests = sys.argv[4].split(",") if len(sys.argv) > 4 else TESTS
    runs = [(variant, name) for late in (False, True) for variant in variants
            for name in tests if (name in RUN_LAST) == late]
    for variant, name in runs:
        results = report.setdefault(variant, {})
        # the tests call hvd.DistributedOptimizer on horovod.torch as `hvd`
        hvd.DistributedOptimizer = VARIANTS[variant]

        def hung(name=name, variant=variant, results=results):
            results[name] = f"timeout: still running after {TEST_TIMEOUT_S:.0f} s"
            save()
            print(f"rank {RANK}: {variant} {name} timed out", file=sys.stderr, flush=True)
            faulthandler.dump_traceback(all_threads=True)
            os._exit(3)

        watchdog = threading.Timer(TEST_TIMEOUT_S, hung)
        watchdog.daemon = True
        watchdog.start()
        result = unittest.TestResult()
        try:
            ContractTests(name).run(result)
            results[name] = outcome(result)
        except BaseException:  # (run() catches a test's exceptions; this is ours)
            results[name] = "error: " + traceback.format_exc().strip().splitlines()[-1]
        watchdog.cancel()
        save()
    hvd.DistributedOptimizer = horovod_optimizer.DistributedOptimizer
    hvd.shutdown()


if __name__ == "__main__":
    main()
