"""Names of stock Horovod's gradients, read from its frames (torch/horovod_frames.py,
tensorflow/horovod_frames.py), and the names horovod_tnq's own callers pass.

Stock Horovod calls ``compress(tensor)`` without names; each adapter reads them from Horovod
0.28.1's private frames. These tests run Horovod's own optimizers and tapes (one rank,
HOROVOD_ELASTIC=1 so they reduce at size 1, horovod_frames_worker.py) and assert that every
gradient got its parameter's name and override: a Horovod whose frames changed shape fails
here, loudly, instead of leaving the gradients silently unnamed at default settings.
"""

import json
import os
import subprocess
import sys
import warnings

import pytest

from launch import ROOT

WORKER = os.path.join(os.path.dirname(__file__), "horovod_frames_worker.py")


def run_worker(framework):
    env = dict(os.environ, HOROVOD_ELASTIC="1", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, WORKER, framework], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def torch_names():
    return run_worker("torch")


@pytest.fixture(scope="module")
def tf_names():
    return run_worker("tensorflow")


TORCH_SETTINGS = {"fc.weight": 8, "fc.bias": 8, "norm.weight": None, "norm.bias": None,
                  "out.weight": 2, "out.bias": 2}


@pytest.mark.parametrize("case", ["stock", "grouped"])
def test_stock_torch_optimizer_names_every_gradient(torch_names, case):
    report = torch_names[case]
    calls = report["calls"]
    parameters = report["parameters"]
    assert sorted(call["parameter"] for call in calls) == parameters
    for call in calls:
        assert call["from_frames"] and call["global_set"]
        assert call["names"] == parameters  # the overrides' patterns are checked against them
        assert call["has_owner"]  # CollectiveNamer tells two models' parameters apart by it
        if case == "stock":
            assert call["collective"] == call["parameter"]
        else:  # Horovod names a group by its first parameter
            assert call["collective"] in parameters
    assert report["resolved"] == TORCH_SETTINGS


def test_fused_optimizer_reads_no_frames(torch_names):
    report = torch_names["fused"]
    assert report["calls"] == []  # its buckets go to TNQCompressor.start, named
    assert report["resolved"] == TORCH_SETTINGS


def test_torch_allreduce_names(torch_names):
    calls = torch_names["allreduce"]["calls"]
    assert [(c["collective"], c["parameter"], c["from_frames"]) for c in calls] == [
        ("plain", None, True), ("group", None, True), ("group", None, True),
        (None, None, True), ("named", "w", False)]


@pytest.mark.parametrize("case", ["tape_graph", "tape_eager", "tape_grouped"])
def test_stock_tape_names_every_gradient(tf_names, case):
    report = tf_names[case]
    calls = report["calls"]
    names = ["shared_a", "shared_b", "w"]
    for call in calls:
        assert call["from_frames"] and call["global_set"]
        assert call["names"] == names
        assert call["collective"] is None  # Horovod's tape names its allreduces by graph tensor
    got = [call["parameter"] for call in calls]
    if case == "tape_grouped":  # see the test below
        assert got[0] == "shared_a" and got[2] == "w"
        assert report["resolved"] == {"shared_a": None, "w": 2}
    else:
        assert got == names
        assert report["resolved"] == {"shared_a": None, "shared_b": 8, "w": 2}


@pytest.mark.xfail(strict=True, reason="known limitation: Horovod 0.28.1's grouped allreduce "
                   "has no gradient position in its frames, so variables that TF gave one "
                   "gradient tensor (a and b of (a + b) * x) take the first one's name")
def test_grouped_tape_tells_apart_variables_sharing_a_gradient(tf_names):
    assert [call["parameter"] for call in tf_names["tape_grouped"]["calls"]] == \
        ["shared_a", "shared_b", "w"]


def test_keras3_optimizer_passes_names(tf_names):
    report = tf_names["keras3"]
    variables = report["variables"]
    assert sorted(call["parameter"] for call in report["calls"]) == variables
    for call in report["calls"]:
        assert not call["from_frames"] and call["names"] == variables
        assert call["collective"] == "keras3." + call["parameter"].replace("/", "_")
    assert report["resolved"] == {"sequential/norm/gamma": None, "sequential/norm/beta": None,
                                  "sequential/out/kernel": 2, "sequential/out/bias": 2}


def test_another_horovod_warns_once_naming_both_versions(monkeypatch):
    from horovod_tnq.protocol import naming
    monkeypatch.setattr(naming, "_version_checked", False)
    with pytest.warns(UserWarning, match=r"Horovod 0\.28\.1's frames, and Horovod 0\.29\.0 is "
                                         r"installed"):
        naming.check_horovod_version("0.29.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        naming.check_horovod_version("0.29.0")  # once per process
        monkeypatch.setattr(naming, "_version_checked", False)
        naming.check_horovod_version(naming.HOROVOD_VERSION)


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_reading_frames_checks_the_horovod_version(framework, monkeypatch):
    """Each adapter's frame reader calls the one check (a warning at its first read)."""
    if framework == "torch":
        from horovod_tnq.torch import horovod_frames
    else:
        from horovod_tnq.tensorflow import horovod_frames
    calls = []
    monkeypatch.setattr(horovod_frames, "check_horovod_version", lambda: calls.append(1))
    try:
        horovod_frames.tensor_name(object())
    except Exception:  # noqa: BLE001 (no Horovod frame to read here: only the check matters)
        pass
    assert calls == [1]


def test_frames_are_read_from_the_installed_horovod():
    """The frame readers were written for the installed Horovod: after an upgrade, run this
    file's tests and update protocol/naming.py's HOROVOD_VERSION."""
    import horovod

    from horovod_tnq.protocol import naming

    assert naming.HOROVOD_VERSION == horovod.__version__
