"""Fusion training epoch from the feature store vs. the reference code's way (the frozen backbone
recomputes every view's features from the images each epoch). Same data, same model, same run.

    .venv/bin/python benchmarks/bench_fusion_epoch.py [--studies 400] [--size 128] [--epochs 3]

Each mode runs in its own process (so peak memory is its own); prints the median epoch time of each,
their ratio and the main process's peak RSS (DataLoader workers not included). Target (issue 4):
>= 20x at the demo's configuration; `flops_fusion.py` gives the compute bound of that ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import backbone_checkpoint, demo_data, emit, median, peak_rss_mib  # noqa: E402


class ImageStudies(Dataset):
    """The reference code's input: a study's images, decoded and resized each time."""

    def __init__(self, manifest, images, size, max_views=4):
        from chx.data.manifest import class_columns, read_manifest
        import polars as pl

        df = read_manifest(manifest).filter(pl.col("split") == "train")
        classes = class_columns(df)
        # Plain Python data: polars must not run inside forked DataLoader workers (it deadlocks).
        self.groups = [(g["path"].to_list(), list(g.select(classes).row(0)))
                       for _, g in df.group_by("study_id", maintain_order=True)]
        self.images, self.size, self.max_views = Path(images), size, max_views

    def __len__(self):
        return len(self.groups)

    def __getitem__(self, i):
        from chx.data.images import load_image
        from chx.data.transforms import Preprocess, eval_transform

        paths, labels = self.groups[i]
        norm = eval_transform(Preprocess(self.size))
        views = torch.stack([norm(load_image(self.images / p, self.size)) for p in paths[: self.max_views]])
        return {"views": views, "target": torch.tensor(labels, dtype=torch.float32)}


def collate_images(batch):
    v = max(b["views"].shape[0] for b in batch)
    x = torch.zeros(len(batch), v, *batch[0]["views"].shape[1:])
    mask = torch.zeros(len(batch), v, dtype=torch.bool)
    for i, b in enumerate(batch):
        x[i, : len(b["views"])] = b["views"]
        mask[i, : len(b["views"])] = True
    return {"views": x, "view_mask": mask, "target": torch.stack([b["target"] for b in batch])}


def run_mode(mode: str, work: Path, studies: int, size: int, epochs: int, model_name: str) -> dict:
    from chx.losses import weighted_asl
    from chx.models.fusion import FusionModel
    from chx.engine.inference import load_backbone

    torch.manual_seed(0)
    manifest = demo_data(work, studies, size)
    images = manifest.parent / "images"
    ckpt = backbone_checkpoint(work, model_name, size)
    backbone, meta = load_backbone(ckpt)
    k = len(meta["class_names"])
    prior = torch.full((k,), 0.1)
    c = backbone.feature_dim
    fusion = FusionModel(c, k)
    opt = torch.optim.AdamW(fusion.parameters(), lr=1e-4)

    if mode == "store":
        from chx.data.study_dataset import StudyDataset, collate_studies
        from chx.pipeline.extract import extract_features

        store = work / f"store-{studies}-{size}-{model_name}.zarr"
        if not store.exists():
            extract_features(ckpt, manifest, images, str(store), workers=1, echo=lambda *a: None)
        t0 = time.perf_counter()
        ds = StudyDataset(str(store), "train", train=True, preload=True)
        setup_s = time.perf_counter() - t0
        loader = lambda: DataLoader(ds, batch_size=16, shuffle=True, collate_fn=collate_studies)  # noqa: E731

        def features(batch):
            return batch["features"], batch["view_mask"]
    else:
        ds = ImageStudies(manifest, images, size)
        setup_s = 0.0
        loader = lambda: DataLoader(ds, batch_size=16, shuffle=True, collate_fn=collate_images,  # noqa: E731
                                    num_workers=1)
        backbone.eval().requires_grad_(False)

        def features(batch):
            b, v = batch["views"].shape[:2]
            with torch.no_grad():
                f = backbone.forward_features(batch["views"].flatten(0, 1))
            return f.unflatten(0, (b, v)), batch["view_mask"]

    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        for batch in loader():
            feats, mask = features(batch)
            loss = weighted_asl(fusion(feats, mask), batch["target"], prior)
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return {"mode": mode, "epoch_s": median(times), "epochs": times, "studies": len(ds),
            "setup_s": setup_s, "peak_rss_mib": peak_rss_mib()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=400)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--model", default="convnext_atto")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--mode", choices=["store", "recompute"], default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="chx-bench-"))
    if a.mode:
        emit(run_mode(a.mode, work, a.studies, a.size, a.epochs, a.model))
        return None
    # Prepare data, checkpoint and store first (not timed), then each mode in its own process.
    run_mode("store", work, a.studies, a.size, 1, a.model)
    res = {}
    for mode in ("store", "recompute"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--work", str(work),
                              "--studies", str(a.studies), "--size", str(a.size), "--epochs", str(a.epochs),
                              "--model", a.model], capture_output=True, text=True, check=True).stdout
        res[mode] = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
    ratio = res["recompute"]["epoch_s"] / res["store"]["epoch_s"]
    print(f"fusion epoch ({res['store']['studies']} studies, {a.model} {a.size} px, median of {a.epochs}):")
    for mode in ("store", "recompute"):
        r = res[mode]
        print(f"  {mode:<10} {r['epoch_s']:7.2f} s/epoch  peak RSS {r['peak_rss_mib']:7.0f} MiB")
    print(f"  speed-up from the store: {ratio:.1f}x (target >= 20x)")
    return {"benchmark": "fusion epoch: store vs recompute", "value": f"{ratio:.1f}x",
            "detail": f"{res['store']['epoch_s']:.2f} s vs {res['recompute']['epoch_s']:.2f} s; peak RSS "
                      f"{res['store']['peak_rss_mib']:.0f} vs {res['recompute']['peak_rss_mib']:.0f} MiB",
            "target": ">= 20x"}


if __name__ == "__main__":
    main()
