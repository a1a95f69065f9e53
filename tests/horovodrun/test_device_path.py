"""The PyTorch compressor's GPU-kernel path over real horovodrun workers: the same results as
the host path, bit for bit (under Triton's interpreter on CPU tensors where there is no GPU),
also when a kernel fails on one rank and that rank falls back to the host codec."""

import pytest
from launch import run_workers

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    return run_workers("device_path.py", 2, tmp_path_factory.mktemp("device"))


def test_device_path_gives_the_host_paths_results(reports):
    for report in reports:  # (payload bytes differ between ranks in the reduce-scatter)
        check_cases(report["cases"])


def check_cases(cases):
    assert len(cases) == 15
    for key, case in cases.items():
        assert case["equal"], (key, case["max_error"])
        assert case["dtype_kept"] and case["device_kept"], key
        assert case["payload_bytes"] > 0 and case["codec"] == "DeviceCodec", key
        assert case["exchanges"] == 3, key  # each tensor went through the exchange named


def test_fused_optimizer_on_the_device_path_matches_the_host_path(reports):
    assert all(report["fused_equal"] for report in reports)


@pytest.mark.parametrize("stage, broken_rank", [("encode", 1), ("decode", 0)])
def test_a_failing_kernel_falls_back_to_the_host_with_one_warning(reports, stage, broken_rank):
    """A kernel launch forced to fail on one rank: that rank warns once, naming the error, and
    goes on with the host codec; both ranks get the host path's results bit for bit."""
    for rank, report in enumerate(reports):
        case = report["fallback"][stage]
        assert case["equal"] and case["exchanges"] == 3, (rank, case)
        if rank == broken_rank:
            assert len(case["warnings"]) == 1, case["warnings"]
            assert f"rht_{stage}_kernel" in case["warnings"][0]
            assert "PTX assembly failed" in case["warnings"][0]
        else:
            assert case["warnings"] == []
        # the broken rank's payloads keep the device's place in Horovod's collectives
        assert case["codec_after"] == "DeviceCodec"
