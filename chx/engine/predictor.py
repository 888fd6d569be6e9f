"""The predictor: both models of a bundle, loaded once, applied to one study's image files.

Used by `chx predict` (and any stage that runs the models on new images). A bundle holds both
models' weights (EMA weights when a run kept them), the class names and the preprocessing, so
prediction repeats training's preprocessing exactly: same size, letterbox, normalisation, pooling
and float16 rounding of the feature maps as the store. Deterministic: a study's views are chosen
and ordered as in evaluation (frontal, lateral, other; then image id).

A bundle is a file (`chx export`, a chx checkpoint) or a folder in the Hugging Face layout
(`chx export --format hf`): ``config.json`` (architecture, classes, preprocessing, features; the
ONNX folder of `chx export --format onnx` holds the same file) and ``model.safetensors`` (both
models' weights, keys prefixed ``backbone.`` and ``fusion.``). Both load offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import json

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
from chx.models.joint import joint_parts

FOLDER_FORMAT = "chx-export-1"            # config.json's "format" in an hf or onnx export folder
FOLDER_CONFIG, FOLDER_WEIGHTS = "config.json", "model.safetensors"
PARTS = ("backbone", "fusion")


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


def joint_bundle(joint: Path) -> dict:
    """The bundle of a `chx train-joint` checkpoint (its fine-tuned backbone and fusion model, which
    belong together by construction), in memory; flip TTA as the run validated."""
    j = load_checkpoint(joint, kind="joint")
    parts = joint_parts(j, eval_weights(j))
    return {
        "kind": "bundle",
        "class_names": list(j["class_names"]),
        "backbone": {**parts["backbone"], "preprocess": j["preprocess"]},
        "fusion": parts["fusion"],
        "features": {"pool": parts["pool"], "flip_tta": bool(j.get("tta", True))},
        "sources": {"joint": str(joint)},
    }


def folder_config(bundle: dict) -> dict:
    """The config.json of an export folder: everything in a bundle except the weights."""
    return {"format": FOLDER_FORMAT, "library_name": "chx",
            "architecture": {part: bundle[part]["model_config"] for part in PARTS},
            "class_names": list(bundle["class_names"]),
            "preprocessing": dict(bundle["backbone"]["preprocess"]),
            "features": dict(bundle["features"])}


def folder_tensors(bundle: dict) -> dict[str, torch.Tensor]:
    """Both models' weights as one flat dict for model.safetensors (``backbone.`` / ``fusion.``)."""
    return {f"{part}.{k}": v.detach().cpu().contiguous() for part in PARTS
            for k, v in bundle[part]["state_dict"].items()}


def read_folder_config(folder: Path) -> dict:
    """config.json of an export folder, checked to be one chx wrote."""
    path = Path(folder) / FOLDER_CONFIG
    if not path.is_file():
        raise ChxError(f"{folder} is a folder without {FOLDER_CONFIG}: give a folder written by "
                       f"`chx export --format hf` (or onnx), or a bundle file")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ChxError(f"{path} is not valid JSON; export the model again") from None
    if not isinstance(config, dict) or config.get("format") != FOLDER_FORMAT:
        raise ChxError(f"{path} is not a chx export (expected format {FOLDER_FORMAT}); export the model "
                       f"with `chx export --format hf`")
    return config


def load_folder_bundle(folder: Path) -> dict:
    """The bundle of an hf export folder (config.json + model.safetensors), read offline."""
    from safetensors.torch import load_file

    config = read_folder_config(folder)
    weights = Path(folder) / FOLDER_WEIGHTS
    if not weights.is_file():
        raise ChxError(f"{folder} has no {FOLDER_WEIGHTS} (an ONNX export?): use --runtime onnxruntime, "
                       f"or export with --format hf")
    try:
        tensors = load_file(weights)
    except Exception as e:  # truncated or foreign file: safetensors raises its own error types
        raise ChxError(f"{weights} cannot be read ({type(e).__name__}); it is truncated or not a "
                       f"safetensors file: export the model again") from None
    parts = {part: {k[len(part) + 1:]: v for k, v in tensors.items() if k.startswith(part + ".")}
             for part in PARTS}
    return {"kind": "bundle", "class_names": list(config["class_names"]),
            "backbone": {"model_config": config["architecture"]["backbone"], "state_dict": parts["backbone"],
                         "preprocess": config["preprocessing"]},
            "fusion": {"model_config": config["architecture"]["fusion"], "state_dict": parts["fusion"]},
            "features": config["features"]}


def load_images(pre: Preprocess, paths: list[Path]) -> torch.Tensor:
    """Decoded, preprocessed images [V, 1, S, S] float32 exactly as training and extraction saw them."""
    norm = eval_transform(pre)
    return torch.stack([norm(load_image(p, pre.size, pre.mode)) for p in paths])


def study_views(views: list[str], image_ids: list[str], max_views: int) -> tuple[list[int], list[int]]:
    """The images a study is predicted from, in slot order (at most ``max_views``, deterministic),
    and their view types: (indices into the study's images, view type ids)."""
    order = deterministic_view_order(views, image_ids)[:max_views]
    return order, view_types(views[i] for i in order)


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
             device: str = "auto", joint: Path | None = None) -> "Predictor":
        if joint is not None:
            if bundle is not None or backbone is not None or fusion is not None:
                raise ChxError("--joint holds both models: give it alone, without --bundle, --backbone "
                               "or --fusion")
            data = joint_bundle(joint)
        elif bundle is None:
            if backbone is None or fusion is None:
                raise ChxError("give --bundle FILE (from `chx export`), both --backbone and --fusion, or "
                               "--joint (a train-joint checkpoint)")
            data = make_bundle(backbone, fusion)
        elif Path(bundle).is_dir():
            data = load_folder_bundle(bundle)
        else:
            data = load_checkpoint(bundle, kind="bundle")
        dev = resolve_device(device)
        classes = list(data["class_names"])
        source = str(bundle or fusion or joint)
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
        return load_images(self.pre, paths).to(self.device)

    @torch.no_grad()
    def predict_study(self, paths: list[Path], views: list[str], image_ids: list[str]) -> np.ndarray:
        """Study probabilities [K] from its image files (views: PA/AP/LATERAL/LL/OTHER)."""
        order, types = study_views(views, image_ids, self.fusion.max_views)
        x = self.images([paths[i] for i in order])
        types = torch.tensor([types], device=self.device)
        mask = torch.ones(1, len(order), dtype=torch.bool, device=self.device)
        maps = feature_maps(self.backbone, x, self.pool).float()[None]
        maps_flip = feature_maps(self.backbone, x, self.pool, flip=True).float()[None] if self.flip_tta else None
        return fusion_probs(self.fusion, maps, mask, types, maps_flip)[0].cpu().numpy()
