"""The Docker image cannot be built here (no Docker engine), so its Dockerfile is linted and
checked to build with the same install script as everything else."""

import os
import subprocess
import sys

from launch import ROOT

DOCKERFILE = os.path.join(ROOT, "docker", "Dockerfile")


def test_dockerfile_passes_hadolint():
    hadolint = os.path.join(os.path.dirname(sys.executable), "hadolint")
    done = subprocess.run([hadolint, DOCKERFILE], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_installs_with_the_project_install_script():
    with open(DOCKERFILE) as f:
        text = f.read()
    assert "RUN bash scripts/install.sh" in text
    assert "COPY . ." in text
