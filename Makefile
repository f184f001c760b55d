# make demo: set up and run the embedded default: all six stages of specs/tiny.json (tiny model,
# built-in data, CPU).
# make test: set up and run the whole test suite (what CI runs).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

# torch is installed pinned FIRST (constraints.txt): an unpinned torch would pull a multi-GB
# CUDA build. On a GPU machine, install your CUDA torch (>= 2.11) first and use `pip install -e .`.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/phi4-engine run specs/tiny.json --run-dir runs/demo

# Two workers, whole files each, in the order tests/conftest.py gives: the tiny pipeline (~11 min)
# first in one, the slow files next in the other, then the rest.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

bench: setup
	$(PY) bench/step_overhead.py

clean:
	rm -rf runs .pytest_cache
