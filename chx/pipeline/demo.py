"""`chx demo`: the whole pipeline on the embedded synthetic dataset (or on a given manifest).

make-demo-data -> train-backbone -> extract-features -> train-fusion -> compare on the test split
(val when there is no test split), ending with one table: the stage-1 model's predictions
aggregated per study (mean, max, view-weighted, frontal-only, lateral-only) against fusion.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from chx.data.manifest import read_manifest
from chx.errors import Interrupted
from chx.options import BackboneOptions, DemoConfig, FusionOptions, TrainConfig
from chx.pipeline.compare import compare_methods, format_table
from chx.pipeline.extract import extract_features
from chx.pipeline.report import fmt, fmt_ci
from chx.pipeline.train_backbone import train_backbone
from chx.pipeline.train_fusion import train_fusion


def run_demo(out: Path, cfg: DemoConfig, manifest: Path | None = None, images: Path | None = None,
             echo=print, fusion: FusionOptions | None = None) -> dict:
    """Run the pipeline into ``out``; ``fusion``: the fusion model's options (default: the paper's)."""
    out = Path(out)
    class_sets = None
    t0 = time.perf_counter()
    timings = {}
    if manifest is None:
        from chx.data.demo import make_demo_data, visibility

        echo(f"[1/5] synthetic data: {cfg.studies} studies at {cfg.size} px -> {out / 'data'}")
        manifest = make_demo_data(out / "data", studies=cfg.studies, seed=cfg.seed, size=cfg.size,
                                  max_views=cfg.views)
        images = out / "data" / "images"
        class_sets = visibility_sets(visibility())    # the visibility table's groups get intervals
    else:
        echo(f"[1/5] data: {manifest} over {images}")
    timings["data"] = time.perf_counter() - t0

    df = read_manifest(manifest)
    split = "test" if (df["split"] == "test").any() else "val"

    t = time.perf_counter()
    echo(f"[2/5] stage 1: {cfg.model} at {cfg.size} px, {cfg.backbone_epochs:g} epochs")
    backbone_dir = out / "backbone"
    fitted = train_backbone([manifest], [images], backbone_dir,
                            BackboneOptions(model=cfg.model, size=cfg.size, pretrained=False),
                            TrainConfig(epochs=cfg.backbone_epochs, lr=cfg.backbone_lr,
                                        batch_size=cfg.batch_size, workers=cfg.workers, seed=cfg.seed,
                                        val_every=1.0, warmup=0.1),
                            overwrite=True)
    _stop_if_interrupted(fitted, "stage 1 (train-backbone)", backbone_dir)
    timings["stage 1"] = time.perf_counter() - t

    t = time.perf_counter()
    store = str(out / "features.zarr")
    echo(f"[3/5] extract features -> {store}")
    extract_features(backbone_dir / "best.pt", manifest, images, store, workers=cfg.workers,
                     batch_size=32, overwrite=True, echo=echo)
    timings["extract"] = time.perf_counter() - t

    t = time.perf_counter()
    echo(f"[4/5] stage 2: fusion from the store, {cfg.fusion_epochs:g} epochs")
    fusion_dir = out / "fusion"
    fitted = train_fusion(store, fusion_dir, fusion or FusionOptions(),
                          TrainConfig(epochs=cfg.fusion_epochs, lr=cfg.fusion_lr, batch_size=cfg.batch_size,
                                      workers=0, seed=cfg.seed, val_every=1.0, warmup=0.1), overwrite=True)
    _stop_if_interrupted(fitted, "stage 2 (train-fusion)", fusion_dir)
    timings["stage 2"] = time.perf_counter() - t

    t = time.perf_counter()
    echo(f"[5/5] compare on the {split} split")
    results = compare_methods(backbone_dir / "best.pt", fusion_dir / "best.pt", manifest, images, store,
                              split, workers=cfg.workers, class_sets=class_sets)
    timings["compare"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    table = format_table(results, title=f"{split} split ({int((df['split'] == split).sum())} images)")
    echo("")
    echo(table)
    echo("")
    echo(f"outputs: {out} (backbone/, features.zarr, fusion/); time: "
         + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    return {"results": results, "timings": timings, "split": split, "table": table,
            "classes": [c for c in df.columns if c not in ("image_id", "study_id", "subject_id",
                                                           "view", "path", "split")]}


def _stop_if_interrupted(fitted, stage: str, run: Path) -> None:
    """A stage stopped by a signal stops the demo: the next stage would run on a half-trained model."""
    if getattr(fitted, "interrupted", None):
        raise Interrupted(f"demo stopped: {stage} was interrupted at step {fitted.step} ({run}/last.pt "
                          f"saved); its stage can continue with `--resume -o {run}`, or rerun `chx demo` "
                          f"to start over", fitted.interrupted)


GROUPS = {"both": "both views", "frontal": "frontal only", "lateral": "lateral only",
          "one view": "one view (frontal + lateral only)"}


def visibility_sets(visibility: dict[str, str]) -> dict[str, list[str]]:
    """{group: class names} for the groups of :data:`GROUPS` ("one view": frontal only + lateral only)."""
    members = {g: [c for c, v in visibility.items() if v == g] for g in ("both", "frontal", "lateral")}
    members["one view"] = members["frontal"] + members["lateral"]
    return members


def by_visibility(results: dict, visibility: dict[str, str]) -> dict[str, dict[str, tuple[float, float]]]:
    """{stage-1 method: {group: (its mAP, fusion's mAP on the same studies)}}, like for like.

    Groups: classes whose sign is visible in both views, only the frontal view, only the lateral
    view, and "one view" (frontal only + lateral only). Classes without a positive are left out."""
    members = visibility_sets(visibility)
    out = {}
    for name, r in results.items():
        if not name.startswith("stage-1 "):
            continue
        method = name.removeprefix("stage-1 ")
        fused = results.get(f"fusion (on {method} studies)", results["fusion"])
        row = {}
        for g, classes in members.items():
            ok = [c for c in classes if not np.isnan(r["per_class"][c]["ap"])]
            row[g] = ((float(np.mean([r["per_class"][c]["ap"] for c in ok])),
                       float(np.mean([fused["per_class"][c]["ap"] for c in ok]))) if ok else (np.nan, np.nan))
        out[method] = row
    return out


def _cell(stage1: float, fusion: float, ci) -> str:
    """"stage-1 vs fusion" with the higher figure in bold, only when the paired 95 % interval of
    fusion minus stage 1 excludes 0 (no bold when it includes 0, or the figures are equal); without
    an interval (--bootstrap 0, or no scored class) the higher figure is bolded; then the interval."""
    a, b = fmt(stage1), fmt(fusion)
    decided = (ci is None or not (ci[0] <= 0 <= ci[1])) and a != b and "n/a" not in (a, b)
    if decided:
        a, b = (a, f"**{b}**") if fusion > stage1 else (f"**{a}**", b)
    return f"{a} vs {b}" + (f" (Δ {fmt_ci(ci)})" if ci is not None else "")


def visibility_table(results: dict, visibility: dict[str, str]) -> str:
    """mAP by where a finding's sign is visible: each stage-1 aggregation against fusion scored on
    the same studies (frontal-only and lateral-only aggregations cover fewer studies), with the
    paired 95 % interval of fusion minus the aggregation when :func:`compare_methods` was given
    these groups as ``class_sets``. Bold: see :func:`_cell`."""
    lines = ["| stage-1 aggregation (vs fusion, same studies) | " + " | ".join(GROUPS.values()) + " |",
             "|---|" + "---:|" * len(GROUPS)]
    for method, row in by_visibility(results, visibility).items():
        sets = (results[f"stage-1 {method}"].get("fusion_minus") or {}).get("sets") or {}
        lines.append(f"| {method} | " + " | ".join(_cell(a, b, (sets.get(g) or {}).get("mAP_diff_ci"))
                                                   for g, (a, b) in row.items()) + " |")
    lines += ["", "Bold: the higher figure of a cell, when the paired bootstrap 95 % interval of fusion minus "
                  "the aggregation (Δ, same studies and resamples) excludes 0; no bold when it includes 0."]
    return "\n".join(lines)
