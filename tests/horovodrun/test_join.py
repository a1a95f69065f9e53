"""hvd.join() with uneven data across ranks, under real horovodrun: the compressed allreduce
(both exchanges, Average and Sum, with and without error feedback) and the stock
DistributedOptimizer give what uncompressed Horovod gives, within the quantizer's error, and
the same bits on every rank still active (tests/horovodrun/workers/join_torch.py)."""

import pytest

from launch import run_workers

SHORT = 2  # the joined rank's steps (join_torch.SHORT)
# Horovod answers collectives it has seen before from its response cache, a joined rank
# contributing zeros even to allgathers and alltoalls: join needs the cache off (docs/limits.md)
NO_CACHE = {"HOROVOD_CACHE_CAPACITY": "0"}


@pytest.fixture(scope="module", params=[2, 3], ids=["np2", "np3"])
def reports(request, tmp_path_factory):
    return run_workers("join_torch.py", request.param, tmp_path_factory.mktemp("join"),
                       timeout=1200, extra_env=NO_CACHE)


def test_uncompressed_horovod_refuses_allgather_and_alltoall_under_join(reports):
    for report in reports[:-1]:
        assert "Allgather is not supported with Join" in \
            report["uncompressed"]["allgather"]["message"]
        assert "Alltoall is not supported with Join" in \
            report["uncompressed"]["alltoall"]["message"]


def test_average_divides_by_every_rank_under_join(reports):
    size = len(reports)
    for record in reports[0]["direct"]:
        want = 1.0 / size if record["op"] == "average" else 1.0
        assert record["plain_over_active_sum"] == pytest.approx(want, rel=1e-5), record


def test_direct_allreduce_matches_uncompressed_under_join(reports):
    keys = [k for k, v in reports[0]["direct"][0].items() if isinstance(v, dict)]
    assert len(keys) == 4  # both exchanges, with and without error feedback
    assert any(record["joined"] for record in reports[0]["direct"])
    for index, record in enumerate(reports[0]["direct"]):
        active = reports if record["step"] < SHORT else reports[:-1]
        for key in keys:
            assert record[key]["error"] < 0.03, (record["step"], record["op"], key, record)
            assert {r["direct"][index][key]["digest"] for r in active} == \
                {record[key]["digest"]}, (record["step"], record["op"], key)


def test_stock_optimizer_matches_uncompressed_under_join(reports):
    for exchange, result in reports[0]["optimizer"].items():
        assert result["error"] < 0.05, (exchange, result)
        assert {r["optimizer"][exchange]["digest"] for r in reports[:-1]} == \
            {result["digest"]}, exchange


def test_eager_tensorflow_allreduce_matches_uncompressed_under_join(tmp_path):
    reports = run_workers("join_tf.py", 3, tmp_path, timeout=1200, extra_env=NO_CACHE)
    for index, record in enumerate(reports[0]["direct"]):
        active = reports if record["step"] < SHORT else reports[:-1]
        for exchange in ("allgather", "reduce-scatter"):
            assert record[exchange]["error"] < 0.03, (record["step"], exchange, record)
            assert {r["direct"][index][exchange]["digest"] for r in active} == \
                {record[exchange]["digest"]}, (record["step"], exchange)


def test_join_with_the_response_cache_on_fails_instead_of_a_wrong_gradient(tmp_path):
    """Horovod 0.28.1 answers a collective it has cached with the joined ranks' zeros instead of
    refusing it (docs/limits.md). The active rank's next compressed allreduce then raises, never
    returning a gradient: ours names join and HOROVOD_CACHE_CAPACITY=0 where the probe sees the
    join first; Horovod's own error where its joined rank fails first (its background loop or
    its join handle, which is given the cached allgather's output; uncompressed allgathers
    alike). Both ranks' joins end, with or without an error: no hang."""
    active, joined = run_workers("join_cache_torch.py", 2, tmp_path, timeout=600)
    raised = active["after_join"]
    assert raised["raised"] in ("RuntimeError", "HorovodInternalError"), raised
    if raised["raised"] == "RuntimeError":
        assert "hvd.join()" in raised["message"], raised
        assert "rank(s) [1] have joined" in raised["message"], raised
        assert "HOROVOD_CACHE_CAPACITY=0" in raised["message"], raised
    assert "after_join" not in joined  # the joined rank made no call after its join
