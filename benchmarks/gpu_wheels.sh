#!/usr/bin/env bash
# The Python packages benchmarks/gpu_check.py needs beyond the GPU machine's image
# (torch, triton, transformers, numpy, pyyaml, safetensors, typer, rich, psutil,
# matplotlib, pytest, pytest-timeout, requests and tqdm are already there: see
# docs/gpu.md), downloaded as cp312 manylinux x86_64 wheels into .whl/ to travel with
# the working tree (the device machine has no network).
#
#   pydantic (+ pydantic-core, annotated-types, typing-inspection, typing-extensions):
#       recipes, pass configs and checkpoint validation;
#   gguf: the GGUF export stage and transformers' GGUF loader (the reload test).
#
# Not needed, because the check never imports them (made sure by running the dry run with
# them blocked): datasets (only for hub data sources; the check uses the repo's files),
# lm-eval (only for task accuracy; the check's recipes ask for none), bitsandbytes,
# torch-pruning, llama-cpp-python.
#
# Versions are the ones the CPU suite runs with; pydantic-core must be the version this
# pydantic pins. Usage (repo root): bash benchmarks/gpu_wheels.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${1:-python3}"
WHEELS=(
  "pydantic==2.14.4"
  "pydantic-core==2.50.5"
  "annotated-types==0.8.0"
  "typing-inspection==0.4.5"
  "typing-extensions==4.16.0"
  "gguf==0.19.0"
)
rm -rf .whl
mkdir -p .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 \
  -d .whl "${WHEELS[@]}"
ls -l .whl
du -cb .whl/*.whl | tail -1
