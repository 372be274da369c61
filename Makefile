# Two commands on a fresh machine: `make demo` and `make test`. Both build the venv first.
# `make test` is lint plus the whole suite (what CI runs); `make test-fast` is the quick tier
# (no real data, no kernel compile, no dsq subprocesses; see tests/conftest.py).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision releases that pair with each other; override for another platform.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# Test processes (pytest-xdist, whole files each; tests/conftest.py shares the cores among them):
# much of the suite is single-threaded Python (tracing, exports, subprocesses), so two beat one.
TEST_WORKERS ?= 2

.PHONY: demo lint test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -c "from dsq.nn.int_kernel import cpu_kernel_available; cpu_kernel_available()"  # compile the CPU kernel once
	touch $@

demo: $(STAMP)
	$(BIN)/dsq demo

lint: $(STAMP)
	$(BIN)/ruff check dsq tests benchmarks
	$(BIN)/ruff format --check dsq tests benchmarks

test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP)
	$(BIN)/python -m pytest --fast -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(BIN)/python benchmarks/quantize_time.py
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/eval_efficiency.py

clean:
	rm -rf $(VENV) build *.egg-info
