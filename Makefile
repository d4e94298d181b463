# Two entry points: `make train` (the main job on the built-in default) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/tiny.yaml

.PHONY: install train test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
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
