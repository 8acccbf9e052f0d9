# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-full test test-slow test-multihost test-parity ci bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.demo

# The demo's full recipe from scratch (about 75 minutes of training on 2 CPU cores).
demo-full: $(STAMP)
	$(PY) -m experiments.demo --from-scratch

test: $(STAMP)
	$(PY) -m pytest -q -n auto

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Two-process training on this machine (jax.distributed over 127.0.0.1, gloo):
# each test starts its own processes, so no xdist.
test-multihost: $(STAMP)
	$(PY) -m pytest -q -p no:xdist -m multihost tests/test_multihost.py

# google/ffn's own inference reproduced voxel for voxel on its reference crop
# (about 10 minutes at batch 1 on a CPU; skips without ../shared/data).
test-parity: $(STAMP)
	$(PY) -m pytest -q -p no:xdist -m slow tests/test_gffn_parity.py -k google_ffn_mode

# What CI runs (.ci/run): the fast suite, two-process training, google/ffn parity.
ci: test test-multihost test-parity

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) out .pytest_cache
