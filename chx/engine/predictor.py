"""The predictor: both models of a bundle, loaded once, applied to one study's image files.

Used by `chx predict` (and any stage that runs the models on new images). A bundle holds both
models' weights (EMA weights when a run kept them), the class names and the preprocessing, so
prediction repeats training's preprocessing exactly: same size, letterbox, normalisation, pooling
and float16 rounding of the feature maps as the store. Deterministic: a study's views are chosen
and ordered as in evaluation (frontal, lateral, other; then image id).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chx.data.images import load_image
from chx.data.transforms import Preprocess, eval_transform
from chx.data.views import deterministic_view_order, view_types
from chx.engine.compat import require_same_backbone, require_same_classes
from chx.engine.distributed import resolve_device
from chx.engine.inference import feature_maps, fusion_probs
from chx.errors import ChxError
from chx.models import eval_weights, load_checkpoint, load_model, weights_hash


def make_bundle(backbone: Path, fusion: Path) -> dict:
    """The bundle of a stage-1 and a fusion checkpoint (checked to belong together), in memory."""
    b = load_checkpoint(backbone, kind="backbone")
    f = load_checkpoint(fusion, kind="fusion")
    require_same_classes(f["class_names"], b["class_names"], str(fusion), str(backbone),
                         fix="export a fusion model trained on this backbone's features")
    weights = eval_weights(b)
    fp = f.get("store_fingerprint") or {}
    require_same_backbone(fp, weights_hash(weights), str(fusion), str(backbone))
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
    backbone: torch.nn.Module
    fusion: torch.nn.Module
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
        classes = list(data["class_names"])
        source = str(bundle or fusion)
        bb = load_model({**data["backbone"], "source": source}, kind="backbone")
        fu = load_model({**data["fusion"], "source": source}, kind="fusion")
        for kind, m in (("backbone", bb), ("fusion", fu)):
            if m.config["num_classes"] != len(classes):
                raise ChxError(f"{source}: its {kind} predicts {m.config['num_classes']} classes but it "
                               f"names {len(classes)}; the bundle is damaged or was edited: export it again")
        return cls(bb.to(dev), fu.to(dev), Preprocess.from_dict(data["backbone"]["preprocess"]),
                   data["features"]["pool"], data["features"]["flip_tta"], classes, dev)

    @torch.no_grad()
    def images(self, paths: list[Path]) -> torch.Tensor:
        """Decoded, preprocessed images [V, 1, S, S] exactly as training and extraction saw them."""
        norm = eval_transform(self.pre)
        return torch.stack([norm(load_image(p, self.pre.size, self.pre.mode)) for p in paths]).to(self.device)

    @torch.no_grad()
    def predict_study(self, paths: list[Path], views: list[str], image_ids: list[str]) -> np.ndarray:
        """Study probabilities [K] from its image files (views: PA/AP/LATERAL/LL/OTHER)."""
        order = deterministic_view_order(views, image_ids)[: self.fusion.max_views]
        x = self.images([paths[i] for i in order])
        types = torch.tensor([view_types(views[i] for i in order)], device=self.device)
        mask = torch.ones(1, len(order), dtype=torch.bool, device=self.device)
        maps = feature_maps(self.backbone, x, self.pool).float()[None]
        maps_flip = feature_maps(self.backbone, x, self.pool, flip=True).float()[None] if self.flip_tta else None
        return fusion_probs(self.fusion, maps, mask, types, maps_flip)[0].cpu().numpy()
