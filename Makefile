# make install: .venv with pinned frameworks and Horovod built from source (cached wheel)
# make demo:    the main job: 2 Horovod workers train with and without TNQ, print a table
# make test:    the test suite, real horovodrun workers included
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: install test test-unit test-horovodrun gpu-check demo wire-bytes bandwidth scaling-bytes convergence
install: $(STAMP)

$(STAMP): scripts/install.sh setup.py pyproject.toml horovod_tnq/core/native.c
	bash scripts/install.sh
	touch $@

test: $(STAMP)
	$(PY) -m pytest

# the two halves of make test: one process, then real horovodrun jobs
test-unit: $(STAMP)
	$(PY) -m pytest tests/unit

test-horovodrun: $(STAMP)
	$(PY) -m pytest tests/horovodrun

# on a GPU machine (torch with CUDA and triton; no Horovod or .venv needed): the GPU kernels'
# tests compiled on the device, then benchmarks/gpu_speed.py; under 8 minutes
gpu-check:
	bash scripts/gpu_check.sh

demo: $(STAMP)
	$(PY) examples/run_demo.py

wire-bytes: $(STAMP)
	$(PY) -m benchmarks.wire_bytes

# training benchmarks (docs/benchmarks.md); the first two need root
bandwidth: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.bandwidth

scaling-bytes: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.scaling_bytes

convergence: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.convergence
