#!/usr/bin/env bash
# The GPU check of issue 18 in one command, for a machine with a CUDA GPU and its own torch (no install:
# the repository is put on PYTHONPATH; it needs torch >= 2.11, Triton, safetensors, numpy, tokenizers).
# Writes one JSON file: $1, else $OUT/gpu_check.json when $OUT is set (the device tool's output folder),
# else ./gpu_check.json. Sections not started within --budget-s are skipped and named in the file, so a
# slow machine still finishes well inside the 8 minutes the check is sized for.
#
#     bash bench/gpu_check.sh [FILE] [--skip-real] [--only probes decode ...]
set -uo pipefail
cd "$(dirname "$0")/.."
FILE=${1:-${OUT:-.}/gpu_check.json}
[ $# -gt 0 ] && shift
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=$(command -v python3 || command -v python)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.is_available())"
timeout 470 "$PY" bench/gpu_check.py --device cuda --out "$FILE" --budget-s 380 "$@"
rc=$?
echo "gpu_check: exit $rc, results in $FILE"
exit $rc
