"""The two ONNX graphs of a bundle (`chx export --format onnx`) and a predictor that runs them with
ONNX Runtime on the CPU (`chx predict --runtime onnxruntime`).

The graphs are the torch computation, exported by torch.onnx (see :func:`export_graphs`):

    backbone.onnx   images [B, 1, S, S] float32 (preprocessed)  ->  features [B, C, h, w] float16
                    = chx.engine.inference.feature_maps: the maps the feature store holds (pooling,
                    float16 rounding); B is dynamic.
    fusion.onnx     features [B, V, C, h, w] float16, view_mask [B, V] bool, view_types [B, V] int64
                    ->  probabilities [B, K] float32 (sigmoid of the fusion logits); B and V are
                    dynamic, V from 1 to the model's max views; False in view_mask = an empty slot.

:class:`OnnxPredictor` has :class:`~chx.engine.predictor.Predictor`'s interface and preprocessing:
the same image decoding, views and view order, and flip TTA (the image and its flip go through
the backbone as one batch, and through the fusion graph as a batch of two studies). Needs the
optional extra ``chx[onnx]``; without it, one line says what to install.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from chx.data.transforms import Preprocess
from chx.engine.inference import feature_maps, fusion_probs
from chx.engine.predictor import load_images, read_folder_config, study_views
from chx.errors import ChxError

GRAPHS = {"backbone": "backbone.onnx", "fusion": "fusion.onnx"}
BACKBONE_INPUTS, BACKBONE_OUTPUTS = ["images"], ["features"]
FUSION_INPUTS, FUSION_OUTPUTS = ["features", "view_mask", "view_types"], ["probabilities"]
MAX_BATCH = 4096                       # the exported graphs' upper bound of the batch dimension
MISSING = "pip install 'chx[onnx]' (onnx, onnxscript, onnxruntime)"


def require(module: str, what: str):
    """Import an optional ONNX package, or stop with one line saying what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ChxError(f"{what} needs the {module} package: {MISSING}") from None


class FeatureGraph(nn.Module):
    """What backbone.onnx computes: images [B, 1, S, S] -> the store's maps [B, C, h, w] float16."""

    def __init__(self, backbone: nn.Module, pool: int):
        super().__init__()
        self.backbone, self.pool = backbone, pool

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return feature_maps(self.backbone, images, self.pool)


class FusionGraph(nn.Module):
    """What fusion.onnx computes: a batch of studies' maps -> probabilities [B, K] float32."""

    def __init__(self, fusion: nn.Module):
        super().__init__()
        self.fusion = fusion

    def forward(self, features: torch.Tensor, view_mask: torch.Tensor, view_types: torch.Tensor) -> torch.Tensor:
        return fusion_probs(self.fusion, features.float(), view_mask, view_types)


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], *,
            dynamic_shapes: tuple | None = None, dynamic_axes: dict | None = None) -> None:
    """torch.onnx.export, quiet (its progress lines and the optimizer's notes are not the user's):
    with ``dynamic_axes`` the TorchScript exporter, else the torch.export-based one with
    ``dynamic_shapes``. A model it cannot export is one line."""
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    try:
        with (contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()),
              warnings.catch_warnings()):
            warnings.simplefilter("ignore")   # the TorchScript exporter's deprecation notice
            torch.onnx.export(module.eval(), args, str(path), dynamo=dynamic_axes is None, input_names=inputs,
                              output_names=outputs, dynamic_shapes=dynamic_shapes, dynamic_axes=dynamic_axes,
                              verbose=False, external_data=n_bytes > 2**31 - 2**27)   # below ONNX's 2 GiB
    except Exception as e:  # torch.export's and the exporters' many error types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ChxError(f"{path.stem}: the model cannot be exported to ONNX ({type(e).__name__}: {first}); "
                       f"export it with --format hf or bundle instead") from None


def export_graphs(backbone: nn.Module, fusion: nn.Module, pool: int, size: int, folder: Path) -> None:
    """Write backbone.onnx and fusion.onnx into ``folder`` (models on the CPU, eval mode).

    The backbone (convolutions: only the batch varies) goes through the TorchScript exporter: its
    trace keeps the batch dynamic, takes ~2 s instead of ~10 s, and ONNX Runtime runs both
    exporters' graphs equally fast (convnext_atto, 256 px). The fusion graph needs the
    torch.export-based exporter: attention's reshapes traced by TorchScript fix the view count."""
    for module in ("onnx", "onnxscript"):
        require(module, "chx export --format onnx")
    backbone, fusion = backbone.cpu().eval(), fusion.cpu().eval()
    images = torch.zeros(2, 1, size, size)
    _export(FeatureGraph(backbone, pool), (images,), folder / GRAPHS["backbone"], BACKBONE_INPUTS,
            BACKBONE_OUTPUTS, dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
    with torch.no_grad():
        maps = feature_maps(backbone, images, pool)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    v = min(2, fusion.max_views)   # 2, not 1: torch.export fixes a dimension whose example is 1
    axes = {0: batch, 1: torch.export.Dim("views", min=1, max=fusion.max_views)} if v > 1 else {0: batch}
    example = (maps[:, None].expand(2, v, *maps.shape[1:]).contiguous(), torch.ones(2, v, dtype=torch.bool),
               torch.zeros(2, v, dtype=torch.long))
    _export(FusionGraph(fusion), example, folder / GRAPHS["fusion"], FUSION_INPUTS, FUSION_OUTPUTS,
            dynamic_shapes=(axes, axes, axes))


def session(path: Path, threads: int = 0):
    """An ONNX Runtime CPU session of ``path`` (``threads`` 0: ONNX Runtime's default)."""
    ort = require("onnxruntime", "--runtime onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own error types: a truncated or foreign file
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ChxError(f"{path} cannot be loaded by onnxruntime ({first}); export it again") from None


@dataclass
class OnnxPredictor:
    """Study probabilities from image files with the two ONNX graphs of an export folder."""

    backbone: object            # onnxruntime.InferenceSession of backbone.onnx
    fusion: object              # ... of fusion.onnx
    pre: Preprocess
    flip_tta: bool
    max_views: int
    class_names: list[str]

    @classmethod
    def load(cls, folder: Path, threads: int = 0) -> "OnnxPredictor":
        config = read_folder_config(folder)
        missing = [name for name in GRAPHS.values() if not (Path(folder) / name).is_file()]
        if missing:
            raise ChxError(f"{folder} has no {', '.join(missing)}: export it with `chx export --format onnx`, "
                           f"or use --runtime torch")
        sessions = {part: session(Path(folder) / name, threads) for part, name in GRAPHS.items()}
        return cls(sessions["backbone"], sessions["fusion"], Preprocess.from_dict(config["preprocessing"]),
                   bool(config["features"]["flip_tta"]), int(config["architecture"]["fusion"]["max_views"]),
                   list(config["class_names"]))

    def predict_study(self, paths: list[Path], views: list[str], image_ids: list[str]) -> np.ndarray:
        """Study probabilities [K] from its image files (views: PA/AP/LATERAL/LL/OTHER)."""
        order, types = study_views(views, image_ids, self.max_views)
        x = load_images(self.pre, [paths[i] for i in order]).numpy()              # [V, 1, S, S]
        if self.flip_tta:
            x = np.concatenate([x, np.ascontiguousarray(x[..., ::-1])])            # [2V, 1, S, S]
        maps = self.backbone.run(BACKBONE_OUTPUTS, {"images": x})[0]
        studies = maps.reshape(-1, len(order), *maps.shape[1:])                    # [1 or 2, V, C, h, w]
        b = studies.shape[0]
        probs = self.fusion.run(FUSION_OUTPUTS, {
            "features": studies, "view_mask": np.ones((b, len(order)), dtype=bool),
            "view_types": np.array([types] * b, dtype=np.int64)})[0]
        return probs.mean(axis=0)     # with flip TTA: the mean of the study's and its flip's
