"""The Docker images cannot be built here (no Docker engine), so their Dockerfiles (CPU and
CUDA) are linted and checked to build with the same install script as everything else."""

import os
import subprocess
import sys

import pytest
from launch import ROOT

DOCKERFILES = [os.path.join(ROOT, "docker", name) for name in ("Dockerfile", "Dockerfile.cuda")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = os.path.join(os.path.dirname(sys.executable), "hadolint")
    done = subprocess.run([hadolint, dockerfile], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_installs_with_the_project_install_script(dockerfile):
    with open(dockerfile) as f:
        text = f.read()
    assert "RUN bash scripts/install.sh" in text
    assert "COPY . ." in text


def test_cuda_image_builds_horovod_with_nccl():
    with open(DOCKERFILES[1]) as f:
        assert "GPU=1" in f.read()
    with open(os.path.join(ROOT, "scripts", "install.sh")) as f:
        script = f.read()
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in script and "nvidia-nccl-cu12" in script
