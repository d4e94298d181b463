# Two entry points: `make train` (the main job on the built-in default) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/tiny.yaml

.PHONY: install train test bench clean

# The package with everything the tests use, so `make test` runs the whole suite (no skips) and
# is what CI runs (.ci/run calls it): the test extra, torch (the export tests), and the moshi
# extra's pins plus moshi itself, the reference of the Moshi backbone tests. moshi's metadata
# pins older torch/numpy/safetensors, but its transformer runs on these, so it goes in without
# its dependencies.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q torch==2.13.0 safetensors==0.8.0
	$(PY) -m pip install -q --no-deps moshi==0.2.13
	$(PY) -m pip install -q einops==0.8.2 sentencepiece==0.2.3 huggingface_hub==2.4.0
	touch $@

install: $(VENV)/.installed

# The demo starts fresh each time; `python train.py --config ...` resumes an existing run_dir.
train: install
	rm -rf runs/tiny
	$(PY) train.py --config $(CONFIG)

test: install
	$(PY) -m pytest -x -q

bench: install
	$(PY) benchmarks/bench_layer.py --out benchmarks/results/bench_layer.jsonl

clean:
	rm -rf $(VENV) *.egg-info
