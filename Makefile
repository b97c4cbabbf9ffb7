# Set-up lives here so that a fresh machine needs exactly one command for each job.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch. On a GPU machine: make install TORCH="torch" (or your CUDA build).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install quickstart test benchmarks clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

quickstart: install
	$(BIN)/flexfed run --config quickstart --overwrite

test: install
	$(BIN)/pytest -q

benchmarks: install
	$(BIN)/python benchmarks/aggregation.py

clean:
	rm -rf $(VENV) runs .pytest_cache
