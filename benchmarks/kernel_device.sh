#!/usr/bin/env bash
# The whole GPU session of issue 25 in one call: tune every key, then the quick benchmark
# with the fresh configs (before they are committed). Run from the repository root:
#     bash benchmarks/kernel_device.sh OUT_DIR        # ~5-7 min on an H100/H200
# Writes to OUT_DIR (flat, 7 files): <slug>.json (ship it: copy to slmcompress/kernels/configs/),
# kernel-tune-<slug>.md / -log.json, tune.log, kernel-<slug>.md / .json, bench.log.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/kernel_device.sh OUT_DIR}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
$PY benchmarks/kernel_tune.py "$OUT" --budget-s "${BUDGET_S:-270}" >"$OUT/tune.log" 2>&1
echo "tune exit $?"; grep -E "^b[34]-|compiling|wrote|Error" "$OUT/tune.log" | tail -n 60
slug=$($PY -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
SLMCOMPRESS_KERNEL_CONFIGS="$OUT/$slug.json" $PY benchmarks/kernel.py --quick --out-dir "$OUT" >"$OUT/bench.log" 2>&1
echo "bench exit $?"; grep -E "^\| (8192|28672) " "$OUT/bench.log" | cut -c1-160
