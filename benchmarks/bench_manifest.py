"""Manifest build time for the real 223,414-row CheXpert table (target: < 5 s on 2 CPU cores).

    .venv/bin/python benchmarks/bench_manifest.py [--repeats 5]

Prints the median of several runs of `chexpert` prepare (read CSV + harmonise onto the 26 CXR-LT
classes + validate), and of a NIH build (112,120 rows) for comparison.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "metadata"


def time_prepare(name: str, source: Path, repeats: int) -> tuple[float, int]:
    from chx.data.adapters import get_adapter
    from chx.data.classes import resolve_classes

    adapter = get_adapter(name)
    classes = resolve_classes(None, default=adapter.default_classes)
    times, rows = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        df = adapter.prepare([source], classes)
        times.append(time.perf_counter() - t0)
        rows = df.height
    return statistics.median(times), rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if not DATA.exists():
        sys.exit(f"{DATA} is missing: the benchmark needs ../shared/data")
    results = []
    for name, file in (("chexpert", "chexpert_train.csv.gz"), ("nih", "nih_data_entry_2017_v2020.csv.gz")):
        median, rows = time_prepare(name, DATA / file, args.repeats)
        results.append({"benchmark": f"manifest build: {name}", "rows": rows,
                        "value": f"{median:.2f} s (median of {args.repeats})",
                        "target": "< 5 s" if name == "chexpert" else ""})
    for r in results:
        print(f"{r['benchmark']:<28} {r['rows']:>8,} rows  {r['value']:<24} {r['target']}")
    return results


if __name__ == "__main__":
    main()
