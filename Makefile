# Each target sets itself up from nothing: a fresh machine needs only Python 3.11 and pip.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,tpu]"
	touch $(STAMP)

# The demo is a CPU job by design; pinning the platform also keeps libtpu (installed for `plan`) from probing.
demo: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m vlm_jax.demo

# Two workers, each test file on one (its module fixtures are built once): compiling, most of the suite's
# time, is single-threaded, so a second process fills the other core of a 2-core machine.
test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -x -n 2 --dist loadfile --durations=15 tests

# Figures for the README, each script printing its comparison side by side in one run.
bench: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) benchmarks/scan_compile.py
	JAX_PLATFORMS=cpu $(PY) benchmarks/train_step.py --config configs/models/tiny_mllama.yaml
	JAX_PLATFORMS=cpu $(PY) benchmarks/data_loader.py --seconds 6
	JAX_PLATFORMS=cpu $(PY) benchmarks/train_vs_pytorch.py --config configs/models/mllama_100m.yaml \
	    train.batch_size=2 train.synthetic.seq_len=128 train.synthetic.num_tiles=4 model.scan_layers=false
	JAX_PLATFORMS=cpu $(PY) benchmarks/train_vs_pytorch.py --hold-freed-memory --config configs/models/mllama_100m.yaml \
	    train.batch_size=2 train.synthetic.seq_len=128 train.synthetic.num_tiles=4 model.scan_layers=false

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
