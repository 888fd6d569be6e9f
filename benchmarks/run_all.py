"""Run every CPU benchmark and print one table (figures for the README).

    .venv/bin/python benchmarks/run_all.py

Each figure is a ratio or a median measured within one run; see each script for its method.
"""

from __future__ import annotations

import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_extract  # noqa: E402
import bench_fusion_epoch  # noqa: E402
import bench_manifest  # noqa: E402
import bench_store_write  # noqa: E402
import flops_fusion  # noqa: E402


def main():
    import os

    import torch

    work = Path(tempfile.mkdtemp(prefix="chx-bench-"))
    rows = []
    rows += bench_manifest.main([])
    rows += bench_extract.main(["--work", str(work)])
    rows.append(bench_fusion_epoch.main(["--work", str(work)]))
    rows += flops_fusion.main([])
    rows += bench_store_write.main([])
    print()
    print(f"| benchmark | value | detail | target |  ({date.today()}, {platform.machine()}, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__})")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['benchmark']} | {r['value']} | {r.get('detail', r.get('rows', ''))} | {r.get('target', '')} |")


if __name__ == "__main__":
    main()
