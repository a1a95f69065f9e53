# make install: .venv with pinned frameworks and Horovod built from source (cached wheel)
# make demo:    the main job: 2 Horovod workers train with and without TNQ, print a table
# make test:    the test suite, real horovodrun workers included
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: install test demo wire-bytes bandwidth scaling-bytes convergence
install: $(STAMP)

$(STAMP): scripts/install.sh setup.cfg setup.py pyproject.toml horovod_tnq/core/native.c
	bash scripts/install.sh
	touch $@

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) examples/run_demo.py

wire-bytes: $(STAMP)
	$(PY) benchmarks/wire_bytes.py

# training benchmarks (docs/benchmarks.md); the first two need root
bandwidth: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/bandwidth.py

scaling-bytes: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/scaling_bytes.py

convergence: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/convergence.py
