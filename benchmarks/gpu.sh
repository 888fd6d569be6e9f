#!/usr/bin/env bash
# GPU benchmark at the paper's configuration (convnext_small, 1024 px, bf16, channels_last, batch 32):
# stage-1 training images/s, extraction images/s (bare and full pipeline), fusion training studies/s,
# each against the GPU's bf16 peak. No network needed (random weights). Runs in a few minutes.
# Then the store write ceiling at the same map size (benchmarks/bench_store_write.py).
#   bash benchmarks/gpu.sh [OUT_DIR]      (results: OUT_DIR/gpu-bench.json and the printed table)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-.}}"
mkdir -p "$out"
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
missing=$($py - <<'PY'
import importlib
print(" ".join(m for m in ("torch", "timm", "zarr", "h5py", "polars", "numpy", "PIL", "pydicom", "sklearn", "tqdm", "click")
               if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  echo "missing Python packages on this machine: $missing (install chx's dependencies first)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 PYTHONPATH=. $py benchmarks/gpu_bench.py --out "$out/gpu-bench.json" "${@:2}"
# The store's write ceiling on this machine's disk at the paper's map size (~30 s): compare with the
# extraction rate above to see whether the GPU or the writer is the limit.
PYTHONUNBUFFERED=1 PYTHONPATH=. $py benchmarks/bench_store_write.py --repeats 1 | tee "$out/store-write.txt"
