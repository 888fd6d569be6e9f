"""`chx export` and `chx predict`: stage 1 + fusion end to end on new studies.

A bundle holds both models' weights (EMA weights when a run kept them), the class names and the
preprocessing, so prediction repeats training's preprocessing exactly: same size, letterbox,
normalisation, pooling and float16 rounding of the feature maps as the store. Deterministic: a
study's views are chosen and ordered as in evaluation (frontal, lateral, other; then image id).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from chx.atomic import atomic_path
from chx.data.images import load_image
from chx.data.manifest import VIEWS, read_manifest
from chx.data.study_dataset import deterministic_view_order
from chx.data.transforms import Preprocess, eval_transform
from chx.errors import ChxError
from chx.models.backbone import ImageClassifier
from chx.models.fusion import VIEW_TYPES, FusionModel
from chx.pipeline.checkpoint import load_checkpoint, save_checkpoint
from chx.pipeline.extract import weights_hash
from chx.pipeline.inference import eval_weights, resolve_device

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}


def export_bundle(backbone: Path, fusion: Path, out: Path) -> dict:
    """Bundle a stage-1 and a fusion checkpoint into one file for `chx predict`."""
    bundle = make_bundle(backbone, fusion)
    save_checkpoint(bundle, out)
    return bundle


def make_bundle(backbone: Path, fusion: Path) -> dict:
    """The bundle of a stage-1 and a fusion checkpoint (checked to belong together), in memory."""
    b = load_checkpoint(backbone, kind="backbone")
    f = load_checkpoint(fusion, kind="fusion")
    if list(b["class_names"]) != list(f["class_names"]):
        raise ChxError(f"{backbone} and {fusion} were trained on different class lists; export a "
                       f"fusion model trained on this backbone's features")
    weights = eval_weights(b)
    fp = f.get("store_fingerprint") or {}
    if fp.get("checkpoint_sha256") not in (None, weights_hash(weights)):
        raise ChxError(f"{fusion} was trained on features of another backbone than {backbone} "
                       f"(store fingerprint differs); give the backbone its store was extracted with")
    return {
        "kind": "bundle",
        "class_names": list(b["class_names"]),
        "backbone": {"model_config": b["model_config"], "state_dict": weights,
                     "preprocess": b["preprocess"]},
        "fusion": {"model_config": f["model_config"], "state_dict": eval_weights(f)},
        "features": {"pool": int(fp.get("pool", 1)), "flip_tta": bool(fp.get("flip", False))},
        "sources": {"backbone": str(backbone), "fusion": str(fusion)},
    }


@dataclass
class Predictor:
    backbone: ImageClassifier
    fusion: FusionModel
    pre: Preprocess
    pool: int
    flip_tta: bool
    class_names: list[str]
    device: torch.device

    @classmethod
    def load(cls, bundle: Path | None = None, backbone: Path | None = None, fusion: Path | None = None,
             device: str = "auto") -> "Predictor":
        if bundle is None:
            if backbone is None or fusion is None:
                raise ChxError("give --bundle FILE (from `chx export`), or both --backbone and --fusion")
            data = make_bundle(backbone, fusion)
        else:
            data = load_checkpoint(bundle, kind="bundle")
        dev = resolve_device(device)
        bb = ImageClassifier.from_config(data["backbone"]["model_config"])
        bb.load_state_dict(data["backbone"]["state_dict"])
        fu = FusionModel.from_config(data["fusion"]["model_config"])
        fu.load_state_dict(data["fusion"]["state_dict"])
        return cls(bb.eval().to(dev), fu.eval().to(dev), Preprocess.from_dict(data["backbone"]["preprocess"]),
                   data["features"]["pool"], data["features"]["flip_tta"], list(data["class_names"]), dev)

    @torch.no_grad()
    def features(self, paths: list[Path], flip: bool = False) -> torch.Tensor:
        """Feature maps [V, C, H, W] as the store holds them (pooled, rounded to float16)."""
        norm = eval_transform(self.pre)
        x = torch.stack([norm(load_image(p, self.pre.size, self.pre.mode)) for p in paths]).to(self.device)
        if flip:
            x = torch.flip(x, dims=[-1])
        f = self.backbone.forward_features(x)
        if self.pool > 1:
            f = F.avg_pool2d(f.float(), self.pool)
        return f.to(torch.float16).float()

    @torch.no_grad()
    def predict_study(self, paths: list[Path], views: list[str], image_ids: list[str]) -> np.ndarray:
        """Study probabilities [K] from its image files (views: PA/AP/LATERAL/LL/OTHER)."""
        order = deterministic_view_order(views, image_ids)[: self.fusion.max_views]
        paths = [paths[i] for i in order]
        types = torch.tensor([[VIEW_TYPES.get(views[i], 2) for i in order]], device=self.device)
        mask = torch.ones(1, len(order), dtype=torch.bool, device=self.device)
        probs = torch.sigmoid(self.fusion(self.features(paths)[None], mask, types).float())
        if self.flip_tta:
            flipped = torch.sigmoid(self.fusion(self.features(paths, flip=True)[None], mask, types).float())
            probs = 0.5 * (probs + flipped)
        return probs[0].cpu().numpy()


def _dicom_view(path: Path) -> str:
    try:
        import pydicom

        v = str(pydicom.dcmread(path, stop_before_pixels=True).get("ViewPosition", "")).strip().upper()
    except Exception:
        return "OTHER"
    return {"L": "LATERAL", "LAT": "LATERAL", "RL": "LATERAL"}.get(v, v if v in VIEWS else "OTHER")


def collect_inputs(images_dir: Path | None = None, files: list[Path] | None = None,
                   manifest: Path | None = None, images: Path | None = None) -> pl.DataFrame:
    """One row per image: image_id, study_id, view, file (absolute)."""
    given = sum(x is not None and x != [] for x in (images_dir, files, manifest))
    if given != 1:
        raise ChxError("give exactly one input: --studies DIR (a folder per study), --files F... "
                       "(one study) or --manifest M with --images ROOT")
    if manifest is not None:
        if images is None:
            raise ChxError("--manifest needs --images ROOT (the manifest's paths are relative to it)")
        df = read_manifest(manifest, require_labels=False)
        return df.select("image_id", "study_id", "view",
                         pl.col("path").map_elements(lambda p: str(Path(images) / p), return_dtype=pl.Utf8)
                         .alias("file"))
    rows = []
    if files:
        for f in files:
            if not Path(f).is_file():
                raise ChxError(f"{f} does not exist")
            rows.append((Path(f).stem, "study", Path(f)))
    else:
        root = Path(images_dir)
        if not root.is_dir():
            raise ChxError(f"--studies {root} is not a folder (expected one sub-folder per study)")
        studies = sorted(p for p in root.iterdir() if p.is_dir())
        if not studies:
            raise ChxError(f"--studies {root} has no sub-folders; put each study's images in its own folder")
        for s in studies:
            imgs = sorted(p for p in s.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not imgs:
                raise ChxError(f"study folder {s} holds no image (.png, .jpg, .dcm); remove it or add its images")
            rows += [(f"{s.name}/{p.stem}", s.name, p) for p in imgs]
    return pl.DataFrame({
        "image_id": [r[0] for r in rows], "study_id": [r[1] for r in rows],
        "view": [_dicom_view(r[2]) if r[2].suffix.lower() in {".dcm", ".dicom"} else "OTHER" for r in rows],
        "file": [str(r[2]) for r in rows]})


def predict(predictor: Predictor, inputs: pl.DataFrame, out: Path, fmt: str = "csv") -> pl.DataFrame:
    """Predict every study of ``inputs`` and write ``out`` (csv, json, or the CXR-LT submission)."""
    from tqdm.auto import tqdm

    study_ids, probs = [], []
    for (study,), group in tqdm(inputs.group_by("study_id", maintain_order=True), desc="predict",
                                unit="study", leave=False, disable=None):
        study_ids.append(study)
        probs.append(predictor.predict_study([Path(f) for f in group["file"]], group["view"].to_list(),
                                             group["image_id"].to_list()))
    table = pl.DataFrame({"study_id": study_ids}).with_columns(
        [pl.Series(c, np.stack(probs)[:, i]) for i, c in enumerate(predictor.class_names)])
    if fmt == "cxr-lt":
        # The challenge wants one row per image (dicom_id): join study probabilities BY KEY.
        table = (inputs.select(pl.col("image_id").alias("dicom_id"), "study_id")
                 .join(table, on="study_id", how="left", maintain_order="left").drop("study_id"))
        missing = table.filter(pl.any_horizontal(pl.col(predictor.class_names).is_null()))
        if missing.height or table.height != inputs.height:
            raise ChxError(f"{missing.height} image(s) got no prediction (e.g. {missing['dicom_id'][:1].to_list()}); "
                           f"nothing was written")
    _write_table(table, out, "json" if fmt == "json" else ("parquet" if out.suffix == ".parquet" else "csv"))
    return table


def _write_table(table: pl.DataFrame, out: Path, kind: str) -> None:
    """Atomic write: csv, parquet or json (a list of row objects)."""
    import json

    with atomic_path(out) as tmp:
        if kind == "json":
            tmp.write_text(json.dumps(table.to_dicts(), indent=1))
        elif kind == "parquet":
            table.write_parquet(tmp)
        else:
            table.write_csv(tmp)
