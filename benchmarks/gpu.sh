#!/usr/bin/env bash
# GPU figures at the paper's configuration (convnext_small, 1024 px, bf16, channels_last): every phase of
# benchmarks/gpu_bench.py (its docstring lists them), about 5 minutes on one H200. No network needed
# (random weights; the test JPEGs are made from a real X-ray, .gpu/xray.dcm or ../shared's DICOM).
#   bash benchmarks/gpu.sh [OUT_DIR] [gpu_bench.py options]
# Results: OUT_DIR/gpu-bench.json (saved after every phase) and the printed figures.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-.}}"
mkdir -p "$out"
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
missing=$($py - <<'PY'
import importlib.util
print(" ".join(m for m in ("torch", "timm", "zarr", "h5py", "polars", "numpy", "PIL", "pydicom", "sklearn", "tqdm", "click")
               if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  echo "missing Python packages on this machine: $missing (install chx's dependencies first)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
PYTHONUNBUFFERED=1 PYTHONPATH=".:${PYTHONPATH:-}" $py benchmarks/gpu_bench.py --out "$out/gpu-bench.json" "${@:2}"
