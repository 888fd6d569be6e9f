"""Fusion against the stage-1 model's per-study aggregations (mean, max, the reference's
view-weighted mean, frontal-only, lateral-only) on one split: the table of issue 4.

    .venv/bin/python benchmarks/compare_fusion.py --backbone B/best.pt --fusion F/best.pt \
        --manifest M --images ROOT --store S [--split val]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from chx.pipeline.compare import compare_methods, format_table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", type=Path, required=True)
    ap.add_argument("--fusion", type=Path, required=True)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--split", default="val")
    a = ap.parse_args(argv)
    results = compare_methods(a.backbone, a.fusion, a.manifest, a.images, a.store, a.split)
    print(format_table(results, title=f"{a.split} split"))


if __name__ == "__main__":
    main()
