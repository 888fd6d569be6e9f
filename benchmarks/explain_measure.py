"""Do the maps point at the signs? View attribution and the pointing game on the demo's test
studies, for the fusion model's attention and, as baselines on the stage-1 model, its head's
attention and Grad-CAM (the field's usual saliency method).

    chx demo -o demo-out                       # once: data with signs.parquet, both models
    .venv/bin/python benchmarks/explain_measure.py --demo demo-out [--split test] [--json out.json]

- view attribution (fusion only; stage-1 maps are per image): for the positive studies of the
  findings visible only in the lateral view (only in the frontal view) that have both views, the
  mean share of the finding's attention on each view type;
- pointing game: the fraction of positive (study, finding) pairs whose map peak, over all the
  study's views, falls in the drawn sign's box grown by one token on each side; chance: a uniform
  random point of the study's images in that grown box (grown-box area / image area; also given
  for the box as drawn, the issue's box area / image area). "In view":
  the same for the peak within each view that shows the sign.
See :mod:`chx.engine.attribution` (``score_explanation``, ``summarise_scores``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import polars as pl


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, required=True, help="Output folder of `chx demo`.")
    ap.add_argument("--split", default="test")
    ap.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    a = ap.parse_args(argv)

    from chx.data.demo import read_signs, visibility
    from chx.data.manifest import read_manifest
    from chx.engine.attribution import FusionExplainer, ImageExplainer, measure_explanations
    from chx.engine.predictor import Predictor

    data = a.demo / "data"
    backbone, fusion = a.demo / "backbone" / "best.pt", a.demo / "fusion" / "best.pt"
    manifest = read_manifest(data / "manifest.parquet").filter(pl.col("split") == a.split)
    signs = read_signs(data / "signs.parquet")
    explainers = {
        "fusion attention": FusionExplainer(Predictor.load(backbone=backbone, fusion=fusion, device="cpu")),
        "stage-1 attention": ImageExplainer.load(backbone, device="cpu"),
        "stage-1 Grad-CAM": ImageExplainer.load(backbone, device="cpu", method="grad-cam"),
    }
    results = {name: measure_explanations(e, manifest, data / "images", signs, visibility(), progress=True)
               for name, e in explainers.items()}

    print(f"\n{a.split} split of {a.demo}: {manifest['study_id'].n_unique()} studies")
    print("| maps | lateral-only findings: share lateral vs frontal | frontal-only: frontal vs lateral | "
          "pointing game (study peak) vs chance | in the view showing the sign vs chance |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        lat, fro = r["attribution"]["lateral-only findings"], r["attribution"]["frontal-only findings"]
        attribution = (f"{lat['lateral share']:.2f} vs {lat['frontal share']:.2f} (n={lat['studies']})",
                       f"{fro['frontal share']:.2f} vs {fro['lateral share']:.2f} (n={fro['studies']})")
        if name != "fusion attention":
            attribution = ("-", "-")          # stage-1 maps are per image: no shared budget
        p, v = r["pointing"], r["pointing_in_view"]
        print(f"| {name} | {attribution[0]} | {attribution[1]} | {p['hit rate']:.2f} vs {p['chance']:.2f} "
              f"(box as drawn {p['box chance']:.2f}; n={p['pairs']}) | {v['hit rate']:.2f} vs "
              f"{v['chance']:.2f} (n={v['pairs']}) |")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
