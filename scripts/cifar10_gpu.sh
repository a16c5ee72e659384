#!/usr/bin/env bash
# The CIFAR-10 reproduction on a borrowed GPU, as one prepared script (docs/cifar10.md).
#
#   scripts/cifar10_gpu.sh CIFAR10 OUT [TIME_LIMIT]
#
# CIFAR10: your copy (a cifar-10-batches-py folder, an image folder or a tar of one);
# OUT: a folder that comes back to you; TIME_LIMIT: when to stop starting cells (default 8m).
# 1. a short throughput check of the training loop on this GPU, and the projected full time;
# 2. `mextract reproduce cifar10 --scale full` in $RUN (default runs/cifar10-full), stopping
#    cleanly before the limit; a rerun with the same $RUN continues where it stopped;
# 3. the records (JSON), tables.md and the logs copied to OUT. The victims' checkpoints stay
#    in $RUN/victims (about 45 MB each): carry $RUN back to resume on another machine.
# Where mextract is not installed, it runs from this checkout (PYTHONPATH=src): the machine
# then needs mextract's dependencies (pyproject.toml) in its Python.
set -euo pipefail
DATA=${1:?usage: scripts/cifar10_gpu.sh CIFAR10 OUT [TIME_LIMIT]}
OUT=${2:?usage: scripts/cifar10_gpu.sh CIFAR10 OUT [TIME_LIMIT]}
LIMIT=${3:-8m}
RUN=${RUN:-runs/cifar10-full}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT" "$RUN"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt" || true
"$PY" benchmarks/cifar10_throughput.py --device cuda --scale full --seconds 10 2>&1 | tee "$OUT/throughput.txt"
status=0
"$PY" -m mextract reproduce cifar10 --scale full --device cuda --data-root "$DATA" --out "$RUN" \
    --time-limit "$LIMIT" 2>&1 | tee "$OUT/reproduce.log" || status=$?
cp "$RUN"/tables.md "$OUT"/ 2>/dev/null || true
tar -czf "$OUT/records.tar.gz" -C "$RUN" records
exit "$status"
