"""What a compressor keeps per tensor, on real Horovod workers (horovodrun, Gloo, 2 ranks): one
error-feedback compressor shared by two models' stock optimizers, and unnamed allreduces."""

import pytest

from launch import run_workers, same_on_all_ranks


UNNAMED_CALLS = {"torch": 1000, "tf": 300}


@pytest.fixture(scope="module")
def torch_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("shared_state_torch")
    return run_workers("shared_state_torch.py", 2, out, args=[str(UNNAMED_CALLS["torch"])])


@pytest.fixture(scope="module")
def tf_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("unnamed_tf")
    return run_workers("unnamed_tf.py", 2, out, args=[str(UNNAMED_CALLS["tf"])])


def test_one_compressor_shared_by_two_models_updates_them_as_one_compressor_each(torch_job):
    for report in torch_job:
        gan = report["gan"]
        # each model's parameters keep their own residuals and step counters
        assert gan["steps"] == {name: 20 for name in
                                ("0.weight", "2.weight", "0.weight@1", "2.weight@1")}
        # grouped: the tensors of each model's group share a Horovod name (the first's)
        assert gan["grouped_steps"] == {name: 20 for name in
                                        ("0.weight", "0.weight@1", "0.weight@2", "0.weight@3")}
        for shared, grouped, each in zip(gan["shared"], gan["grouped"], gan["each"]):
            # relative error of each model's update against uncompressed Horovod's; with one
            # residual for both models the generator's was 0.51 (0.013 with a compressor each),
            # and grouped ones failed ("residual for '0.weight' has shape (4096,), the
            # gradient (2048,)")
            assert each < 0.05
            assert shared < 1.5 * each and grouped < 1.5 * each
        # the generator's names, streams and residuals are those of a compressor of its own
        assert gan["shared"][0] == gan["each"][0]


def unnamed_entries(reports, framework):
    for report in reports:
        assert report["anonymous"] == UNNAMED_CALLS[framework]  # names still unique per call
        assert len(report["warnings"]) == 1  # error feedback needs named tensors, said once
        assert report["warnings"][0].startswith("error feedback needs named tensors")
        assert report["relative_error"] < 0.2  # 4 bits, averaged over 2 ranks
    return same_on_all_ranks(reports, "entries")


def test_unnamed_torch_allreduces_keep_no_state(torch_job):
    reports = [report["unnamed"] for report in torch_job]
    assert unnamed_entries(reports, "torch") == {"steps": 0, "residuals": 0,
                                                 "metrics": ["unnamed"], "in_flight": 0}
    for report in reports:
        assert report["exchanges"] == UNNAMED_CALLS["torch"]
        # a named tensor beside them keeps its step and residual
        assert report["named_residuals"] == ["named"] and report["named_steps"] == {"named": 2}


def test_unnamed_tensorflow_allreduces_keep_no_state(tf_job):
    assert unnamed_entries(tf_job, "tf") == {
        "steps": 0, "residuals": 0, "metrics": ["unnamed"], "planned_bytes": ["unnamed"],
        "plans_checked": 1, "in_flight": 0}
