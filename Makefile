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

# Two workers: the tiny pipeline (~11 min) in one, every other test in the other (tests/conftest.py).
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: setup
	$(PY) bench/step_overhead.py

clean:
	rm -rf runs .pytest_cache
