"""The seed's open questions, measured at small scale (issue 17): one table over 3 seeds.

    flock /tmp/chx-cpu.lock .venv/bin/python benchmarks/ablations.py [--quick] [--out runs/ablations]
        [--work DIR] [--data demo demo-4view covid]

Questions (each row changes one thing from the base row, the paper's recipe: two-stage, one shared
projection, N = 4 view slots, segment embeddings, shuffled views):

- two-stage vs joint: `chx train-joint` (backbone and fusion fine-tuned end to end, backbone at
  0.1 x the LR) started from that seed's base two-stage checkpoint;
- shared projection vs view experts (`--view-experts`) and a mixture of 3 experts gated by the view
  type (`--experts 3`);
- N = 1, 2, 3 view slots (`--max-views`; N = 4 is the base row); a row is left out on data where
  no study has more than N views (it would be the base row again);
- the paper's ablation: segment embedding and view shuffle off, alone and together.

Data: the standard demo, its 4-view variant (`make_demo_data(max_views=4)`: signs in a subset of
the views, so N matters) and covid-cxr (real, ../shared/data/covid-cxr, its own 14 classes,
prepared with a test split). Per data set, stage 1 (convnext_atto from scratch; no pretrained
weights offline) and extraction run ONCE and every row and seed shares them: the seeds vary stage 2
(initialisation, order, view subsets) and the joint fine-tuning, not stage 1 or the test split, so
the sd is training noise only. Score: macro mAP over the test split's studies (classes with a
positive), as `chx evaluate` computes it; no flip TTA anywhere (the store holds no flipped maps).
Delta: the row's mAP minus the base row's of the same seed, mean +- sd over the seeds.

Sizes (FULL, below) are chosen from measured parts so that the whole table takes about 25-30
minutes on 2 CPU cores (stage 1 + extraction ~5.5 min, ~80 fusion runs ~12 min, 9 joint runs
~7 min); the joint row's time is its own, on top of the base row it starts from. --quick is a
smoke run of every row at toy size (< 2 minutes; its numbers mean nothing). Writes
OUT/ablations.md (the table) and OUT/ablations.json (every run and the aggregates).

With --stage1 (issue 29: the later CXR-LT winners' stage-1 recipes against CheXFusion's) the table is
of stage 1 alone: each row (:data:`STAGE1_ROWS`: the CSRA or linear head, the DB loss, plain ASL,
CLAHE, coarse dropout, CSRA + DB) trains its own stage 1 per seed (seed 0, 1, 2: initialisation,
order, augmentation) and is scored by the test split's image-level macro mAP with flip TTA, the
delta paired by seed against the base row (ML-Decoder + weighted ASL, no CLAHE or dropout):

    flock /tmp/chx-cpu.lock .venv/bin/python benchmarks/ablations.py --stage1 --out runs/ablations-stage1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COVID = ROOT.parent / "shared" / "data" / "covid-cxr"


@dataclass(frozen=True)
class Scale:
    """Sizes of one run of the table."""

    studies: int              # per demo data set
    size: int                 # image side, px
    model: str                # stage-1 timm model
    backbone_epochs: float
    fusion_epochs: float
    fusion_val_every: float   # epochs between validations (best.pt is the best of them)
    joint_epochs: float
    seeds: int
    fusion_dim: int           # token width D and feed-forward width of the fusion model
    fusion_ffn: int
    max_steps: int = 0        # 0: all epochs (the smoke run caps every training)


# Sized from measured parts on 2 cores (demo-4view, 96 px): stage 1 ~0.8 s per step of 16 images,
# extraction ~150 images/s, fusion (D 128) ~350 studies/s, joint ~1.2 s per step of 8 studies.
# The paper's D = C (320 here) with FFN 2048 trained 3x slower (5 epochs: 26.6 s vs 8.9 s), more
# than the budget allows for ~80 fusion runs.
FULL = Scale(studies=500, size=96, model="convnext_atto", backbone_epochs=4, fusion_epochs=12,
             fusion_val_every=4, joint_epochs=1, seeds=3, fusion_dim=128, fusion_ffn=512)
QUICK = Scale(studies=40, size=64, model="test_convnext", backbone_epochs=1, fusion_epochs=1,
              fusion_val_every=1, joint_epochs=1, seeds=2, fusion_dim=32, fusion_ffn=64, max_steps=2)

# Stage 1 from scratch at the demo's LR; fusion at a higher LR than the demo's 3e-4 over 30 epochs
# for its 12; joint at 3e-4 with the backbone at 0.1 x (3e-5, the paper's fine-tuning LR).
BACKBONE_LR, FUSION_LR, JOINT_LR, BATCH, JOINT_BATCH = 1e-3, 5e-4, 3e-4, 16, 8


@dataclass(frozen=True)
class Row:
    question: str
    name: str
    fusion: dict = field(default_factory=dict)   # FusionOptions fields changed from the base row
    joint: bool = False                          # train-joint from the base row's checkpoint
    backbone: dict = field(default_factory=dict)  # BackboneOptions fields changed (--stage1 table)

    @property
    def key(self) -> str:
        return f"{self.question}: {self.name}"


BASE = Row("base", "two-stage (shared projection, N = 4, segment emb., shuffle)")
ROWS: tuple[Row, ...] = (
    BASE,
    Row("two-stage vs joint", "joint fine-tuning of the base row", joint=True),
    Row("shared vs experts", "view experts (one projection per view type)", {"view_experts": True}),
    Row("shared vs experts", "3 experts gated by the view type", {"experts": 3}),
    Row("number of views", "N = 1", {"max_views": 1}),
    Row("number of views", "N = 2", {"max_views": 2}),
    Row("number of views", "N = 3", {"max_views": 3}),
    Row("paper ablation", "no segment embedding", {"segment_embedding": False}),
    Row("paper ablation", "no view shuffle", {"shuffle": False}),
    Row("paper ablation", "neither", {"segment_embedding": False, "shuffle": False}),
)

STAGE1_BASE = Row("base", "stage 1: ML-Decoder head, weighted ASL (CheXFusion)")
STAGE1_ROWS: tuple[Row, ...] = (
    STAGE1_BASE,
    Row("head", "CSRA (1 head, lambda 0.1)", backbone={"head": "csra"}),
    Row("head", "linear (average pool + linear)", backbone={"head": "linear"}),
    Row("loss", "distribution-balanced (DB)", backbone={"loss": "db"}),
    Row("loss", "ASL without class weights", backbone={"loss": "asl"}),
    Row("augmentation", "CLAHE", backbone={"clahe": True}),
    Row("augmentation", "coarse dropout 0.1", backbone={"coarse_dropout": 0.1}),
    Row("CXR-LT 2026 recipe", "CSRA + DB", backbone={"head": "csra", "loss": "db"}),
)


@dataclass
class Data:
    """One data set of the table, and what its shared stages made (stage 1, store)."""

    name: str
    manifest: Path
    images: Path
    backbone: Path | None = None
    store: str | None = None
    most_views: int = 0
    shared_s: float = 0.0


def make_data(name: str, work: Path, scale: Scale) -> Data:
    """The data set's manifest and images (demo: generated; covid: prepared with a test split)."""
    folder = work / name
    if name == "covid":
        from chx.pipeline.prepare import prepare

        manifest = folder / "covid.parquet"
        prepare("covid", [COVID / "metadata.csv"], manifest, images=COVID / "images", val_fraction=0.2,
                test_fraction=0.3, seed=0)
        return Data(name, manifest, COVID / "images")
    from chx.data.demo import make_demo_data

    views = 4 if name == "demo-4view" else 3
    manifest = make_demo_data(folder / "data", studies=scale.studies, size=scale.size, seed=0, max_views=views,
                              val_fraction=0.15, test_fraction=0.35)
    return Data(name, manifest, folder / "data" / "images")


def shared_stages(data: Data, work: Path, scale: Scale) -> None:
    """Stage 1 and extraction, once per data set (every row and seed uses them)."""
    import polars as pl

    from chx.data.manifest import read_manifest
    from chx.options import BackboneOptions, TrainConfig
    from chx.pipeline.extract import extract_features
    from chx.pipeline.train_backbone import train_backbone

    t = time.perf_counter()
    out = work / data.name / "backbone"
    train_backbone([data.manifest], [data.images], out,
                   BackboneOptions(model=scale.model, size=scale.size, pretrained=False),
                   TrainConfig(epochs=scale.backbone_epochs, lr=BACKBONE_LR, batch_size=BATCH, workers=1,
                               seed=0, val_every=1.0, warmup=0.1, max_steps=scale.max_steps, device="cpu"),
                   overwrite=True)
    data.backbone = out / "best.pt"
    data.store = str(work / data.name / "features.zarr")
    extract_features(data.backbone, data.manifest, data.images, data.store, workers=1, batch_size=32,
                     overwrite=True, device="cpu", echo=lambda *a: None)
    data.most_views = int(read_manifest(data.manifest).group_by("study_id").agg(pl.len())["len"].max())
    data.shared_s = time.perf_counter() - t


def applies(row: Row, data: Data) -> bool:
    """An N row where no study has more than N views would be the base row again."""
    n = row.fusion.get("max_views")
    return n is None or data.most_views > n


def fusion_config(scale: Scale, seed: int):
    from chx.options import TrainConfig

    return TrainConfig(epochs=scale.fusion_epochs, lr=FUSION_LR, batch_size=BATCH, workers=0, seed=seed,
                       val_every=scale.fusion_val_every, warmup=0.1, max_steps=scale.max_steps, device="cpu",
                       log_every=50)


def run_fusion(row: Row, data: Data, out: Path, scale: Scale, seed: int) -> float:
    """Train the row's fusion model on the shared store; its test-split study mAP."""
    from chx.engine.inference import store_study_probs
    from chx.metrics import summarize
    from chx.models import load_checkpoint, load_model
    from chx.options import FusionOptions
    from chx.pipeline.train_fusion import train_fusion

    opts = replace(FusionOptions(dim=scale.fusion_dim, ffn_dim=scale.fusion_ffn), **row.fusion)
    train_fusion(data.store, out, opts, fusion_config(scale, seed), overwrite=True)
    ckpt = load_checkpoint(out / "best.pt", kind="fusion")
    scores, ds = store_study_probs(load_model(ckpt), data.store, "test", tta=False)
    return summarize(scores, ds.labels, list(ckpt["class_names"]))["mAP"]


def run_joint(data: Data, base: Path, out: Path, scale: Scale, seed: int) -> float:
    """`chx train-joint` from the base row's checkpoint (same seed); its test-split study mAP."""
    from chx.cli import main
    from chx.pipeline.evaluate import evaluate

    args = ["train-joint", "--manifest", data.manifest, "--images", data.images, "--backbone", data.backbone,
            "--fusion", base, "-o", out, "--epochs", scale.joint_epochs, "--lr", JOINT_LR,
            "--batch-size", JOINT_BATCH, "--seed", seed, "--workers", 1, "--val-every", 1.0, "--warmup", 0.1,
            "--max-steps", scale.max_steps, "--no-tta", "--device", "cpu", "--log-every", 50, "--overwrite"]
    main([str(a) for a in args])
    result = evaluate(out / "best.pt", out / "test", manifest=data.manifest, images=data.images, split="test",
                      workers=1, overwrite=True)
    return result["mAP"]


def run_stage1(row: Row, data: Data, out: Path, scale: Scale, seed: int) -> float:
    """Train the row's stage 1 (its own, this seed); the test split's image-level macro mAP (flip TTA)."""
    import polars as pl

    from chx.data.datasets import ImageDataset, label_matrix
    from chx.data.manifest import class_columns, read_manifest
    from chx.data.transforms import Preprocess
    from chx.engine.inference import predict_images
    from chx.metrics import summarize
    from chx.models import load_checkpoint, load_model
    from chx.options import BackboneOptions, TrainConfig
    from chx.pipeline.train_backbone import train_backbone

    opts = replace(BackboneOptions(model=scale.model, size=scale.size, pretrained=False), **row.backbone)
    train_backbone([data.manifest], [data.images], out, opts,
                   TrainConfig(epochs=scale.backbone_epochs, lr=BACKBONE_LR, batch_size=BATCH, workers=1,
                               seed=seed, val_every=1.0, warmup=0.1, max_steps=scale.max_steps, device="cpu"),
                   overwrite=True)
    ckpt = load_checkpoint(out / "best.pt", kind="backbone")
    df = read_manifest(data.manifest).filter(pl.col("split") == "test")
    classes = class_columns(df)
    ds = ImageDataset(df, data.images, Preprocess.from_dict(ckpt["preprocess"]), classes=classes)
    probs = predict_images(load_model(ckpt), ds, workers=1, tta=True, show_progress=False)
    np.save(out / "test_probs.npy", probs)        # for the ensemble of the seeds (:func:`seed_ensemble`)
    return summarize(probs, label_matrix(df, classes), classes)["mAP"]


def seed_ensemble(data: Data, folders: list[Path]) -> float:
    """Test mAP of the mean of the seeds' stage-1 probabilities (what `chx ensemble` of those runs
    predicts: the mean of the members' probabilities)."""
    import polars as pl

    from chx.data.datasets import label_matrix
    from chx.data.manifest import class_columns, read_manifest
    from chx.metrics import summarize

    df = read_manifest(data.manifest).filter(pl.col("split") == "test")
    classes = class_columns(df)
    probs = np.mean([np.load(f / "test_probs.npy") for f in folders], axis=0)
    return summarize(probs, label_matrix(df, classes), classes)["mAP"]


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def aggregate(runs: list[dict], base_key: str = BASE.key) -> list[dict]:
    """Per (data, row): mAP and paired delta vs base (mean, sd over seeds), mean seconds per run."""
    base = {(r["data"], r["seed"]): r["mAP"] for r in runs if r["row"] == base_key}
    rows = []
    for key in dict.fromkeys((r["data"], r["row"]) for r in runs):
        mine = [r for r in runs if (r["data"], r["row"]) == key]
        m, sd = mean_sd([r["mAP"] for r in mine])
        dm, dsd = mean_sd([r["mAP"] - base[(r["data"], r["seed"])] for r in mine])
        rows.append({"data": key[0], "row": key[1], "seeds": len(mine), "mAP": m, "mAP_sd": sd,
                     "delta": dm, "delta_sd": dsd, "seconds": statistics.fmean(r["seconds"] for r in mine)})
    return rows


def markdown(rows: list[dict], data: list[Data], scale: Scale, total_s: float, stage1: bool = False) -> str:
    import torch

    smoke = "SMOKE RUN (--quick): toy sizes, the numbers mean nothing. " if scale == QUICK else ""
    what = ("Test-split image mAP of stage 1 (flip TTA), mean +- sd over {n} seeds (each row trains its own "
            "stage 1 per seed)." if stage1 else
            "Test-split study mAP, mean +- sd over {n} seeds (stage 2 and joint seeds; stage 1 shared).")
    base_key = STAGE1_BASE.key if stage1 else BASE.key
    lines = [f"{smoke}{what.format(n=scale.seeds)} {date.today()}, {platform.machine()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; whole table {total_s / 60:.1f} min.",
             f"Sizes: {scale.studies} demo studies at {scale.size} px, stage 1 {scale.model} "
             f"{scale.backbone_epochs:g} epochs, fusion D {scale.fusion_dim} / FFN {scale.fusion_ffn} "
             f"{scale.fusion_epochs:g} epochs, joint {scale.joint_epochs:g} epoch(s).", "",
             "| data | row | test mAP | delta vs base (paired) | s / run |", "|---|---|---:|---:|---:|"]
    for r in rows:
        delta = "" if r["row"] == base_key else f"{r['delta']:+.3f} +- {r['delta_sd']:.3f}"
        lines.append(f"| {r['data']} | {r['row']} | {r['mAP']:.3f} +- {r['mAP_sd']:.3f} | {delta} | "
                     f"{r['seconds']:.1f} |")
    if not stage1:
        lines += ["", "Shared per data set (stage 1 + extraction, once): "
                  + ", ".join(f"{d.name} {d.shared_s:.0f} s (at most {d.most_views} views per study)" for d in data)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Smoke run of every row at toy size (< 2 minutes).")
    p.add_argument("--out", type=Path, default=Path("runs/ablations"), help="Folder for ablations.md/.json.")
    p.add_argument("--work", type=Path, default=None, help="Work folder (default: a new temp folder).")
    p.add_argument("--data", nargs="+", default=["demo", "demo-4view", "covid"],
                   choices=["demo", "demo-4view", "covid"], help="Data sets to run.")
    p.add_argument("--stage1", action="store_true",
                   help="The stage-1 table (heads, losses, augmentations; issue 29) instead of the fusion one.")
    args = p.parse_args(argv)
    from chx.atomic import atomic_path

    scale = QUICK if args.quick else FULL
    work = args.work or Path(tempfile.mkdtemp(prefix="chx-ablations-"))
    t0 = time.perf_counter()
    runs, done, ensembles = [], [], []
    for name in args.data:
        data = make_data(name, work, scale)
        if args.stage1:
            done.append(data)
            for seed in range(scale.seeds):
                for i, row in enumerate(STAGE1_ROWS):
                    t = time.perf_counter()
                    score = run_stage1(row, data, work / name / f"seed{seed}" / f"stage1-row{i}", scale, seed)
                    runs.append({"data": name, "row": row.key, "seed": seed, "mAP": score,
                                 "seconds": time.perf_counter() - t})
                    print(f"  seed {seed} | {row.key}: mAP {score:.3f} ({runs[-1]['seconds']:.0f} s)", flush=True)
            base = [r["mAP"] for r in runs if r["data"] == name and r["row"] == STAGE1_BASE.key]
            ensembles.append({"data": name, "seeds": scale.seeds, "best_single": max(base),
                              "mean_single": statistics.fmean(base),
                              "ensemble": seed_ensemble(data, [work / name / f"seed{s}" / "stage1-row0"
                                                               for s in range(scale.seeds)])})
            continue
        shared_stages(data, work, scale)
        done.append(data)
        print(f"{name}: stage 1 + extraction {data.shared_s:.0f} s; at most {data.most_views} views", flush=True)
        for seed in range(scale.seeds):
            for i, row in enumerate(ROWS):
                if not applies(row, data):
                    continue
                out = work / name / f"seed{seed}" / f"row{i}"
                t = time.perf_counter()
                if row.joint:
                    score = run_joint(data, work / name / f"seed{seed}" / "row0" / "best.pt", out, scale, seed)
                else:
                    score = run_fusion(row, data, out, scale, seed)
                runs.append({"data": name, "row": row.key, "seed": seed, "mAP": score,
                             "seconds": time.perf_counter() - t})
                print(f"  seed {seed} | {row.key}: mAP {score:.3f} ({runs[-1]['seconds']:.0f} s)", flush=True)
    total = time.perf_counter() - t0
    table = aggregate(runs, STAGE1_BASE.key if args.stage1 else BASE.key)
    text = markdown(table, done, scale, total, stage1=args.stage1)
    for e in ensembles:
        text += (f"\nEnsemble of the base row's {e['seeds']} seeds ({e['data']}, mean of their probabilities, as "
                 f"`chx ensemble` predicts): mAP {e['ensemble']:.3f}; best single seed {e['best_single']:.3f}, "
                 f"mean single {e['mean_single']:.3f} (one ensemble: no spread).\n")
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "ablations.md") as tmp:
        Path(tmp).write_text(text)
    record = {"scale": asdict(scale), "quick": args.quick, "seconds": total, "runs": runs, "table": table,
              "seed_ensembles": ensembles,
              "shared": [{"data": d.name, "seconds": d.shared_s, "most_views": d.most_views} for d in done]}
    with atomic_path(args.out / "ablations.json") as tmp:
        Path(tmp).write_text(json.dumps(record, indent=1))
    print("\n" + text + f"wrote {args.out / 'ablations.md'} and {args.out / 'ablations.json'}")
    return record


if __name__ == "__main__":
    main()
