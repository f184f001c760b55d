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

# The tiny pipeline first, alone, on both cores (as `make demo` runs it), then the rest in two
# workers, whole files each, in the order tests/conftest.py gives (slow files first). Run side by
# side, the pipeline's two threads and the other worker fought over the two cores and the pipeline
# took twice as long: sequential is faster. Both parts always run; either failing fails the target.
PIPELINE := tests/integration/test_tiny_pipeline.py
test: setup
	@$(PY) -m pytest -q $(PIPELINE); pipeline=$$?; \
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --ignore=$(PIPELINE); rest=$$?; \
	echo "make test: tiny pipeline exit $$pipeline, the rest exit $$rest"; \
	[ $$pipeline -eq 0 ] && [ $$rest -eq 0 ]

bench: setup
	$(PY) bench/step_overhead.py

clean:
	rm -rf runs .pytest_cache
