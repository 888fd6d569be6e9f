"""Joint fine-tuning model: the stage-1 backbone and the fusion model trained end to end from images.

The stage-1 :class:`~chx.models.backbone.ImageClassifier` computes each view's last-stage map; the
map is made exactly what the feature store would hold (``pool`` x ``pool`` average pooling in
float32, then float16 rounding: :func:`stored_maps`, the same steps as
``chx.engine.inference.feature_maps``), the maps go into their study's view slots and the
:class:`~chx.models.fusion.FusionModel` fuses them. So a joint model is a two-stage pair whose
backbone also learns: exported, it is a stage-1 checkpoint and a fusion checkpoint that belong
together (:func:`joint_parts`).

The stage-1 ML-Decoder head is kept, frozen and unused: the fusion model's head replaces it, and
keeping it makes the backbone part a complete ``ImageClassifier`` (what a bundle holds). Its
logits do not follow the fine-tuned backbone; a bundle only uses the backbone's maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chx.models.backbone import ImageClassifier
from chx.models.fusion import FusionModel

# Prefixes of the two parts in a joint model's state dict (the attribute names below).
PART_PREFIXES = {"backbone": "image.", "fusion": "fusion."}


def stored_maps(fmap: torch.Tensor, pool: int = 1) -> torch.Tensor:
    """[N, C, h, w] backbone maps -> what the store holds, [N, C, h/pool, w/pool] float32 values
    that are float16 numbers: ``pool`` > 1 average-pools in float32, then each value is rounded to
    float16. The rounding is straight-through (the gradient passes unchanged, in float32), so
    training sees the store's values without float16 gradients underflowing."""
    f = fmap.float()
    if pool > 1:
        f = F.avg_pool2d(f, pool)
    # f + (round(f) - f) is round(f) exactly: the difference of two close floats is exact.
    return f + (f.to(torch.float16).float() - f).detach()


def to_slots(maps: torch.Tensor, view_mask: torch.Tensor) -> torch.Tensor:
    """Maps of the real views [N, C, h, w] (study after study, slot order) -> [B, V, C, h, w] with
    zeros in the padding slots (what the store's collate gives them), where ``view_mask`` [B, V]
    marks the N real slots."""
    b, v = view_mask.shape
    if int(view_mask.sum()) != maps.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps for {int(view_mask.sum())} real view slots")
    out = maps.new_zeros((b, v, *maps.shape[1:]))
    out[view_mask.bool()] = maps
    return out


class JointModel(nn.Module):
    """Stage-1 backbone + fusion model on images. Forward inputs:

    - ``images`` [N, in_chans, S, S]: the real views of the batch's studies, study after study, in
      slot order (no padding images: the backbone runs on real views only);
    - ``view_mask`` [B, V] bool, True where a slot holds a real view (N in all);
    - ``view_types`` [B, V] long, as :class:`~chx.models.fusion.FusionModel` takes them.

    Returns study logits [B, K] (with ``return_attention=True`` also the fusion head's attention,
    see FusionModel). ``config`` = ``{"image": ImageClassifier config, "fusion": FusionModel
    config, "pool": pool}``.
    """

    def __init__(self, image: ImageClassifier, fusion: FusionModel, pool: int = 1):
        super().__init__()
        if fusion.config["in_dim"] != image.feature_dim:
            raise ValueError(f"the fusion model takes {fusion.config['in_dim']}-channel maps; the "
                             f"backbone gives {image.feature_dim}")
        if fusion.config["num_classes"] != image.config["num_classes"]:
            raise ValueError(f"the fusion model has {fusion.config['num_classes']} classes; the "
                             f"backbone {image.config['num_classes']}")
        self.image = image
        self.fusion = fusion
        self.pool = int(pool)
        # Unused (the fusion head predicts): frozen, so it neither trains nor makes DDP wait.
        self.image.head.requires_grad_(False)

    @property
    def config(self) -> dict:
        return {"image": dict(self.image.config), "fusion": dict(self.fusion.config), "pool": self.pool}

    @property
    def max_views(self) -> int:
        return self.fusion.max_views

    @classmethod
    def from_config(cls, config: dict) -> "JointModel":
        """Rebuild the architecture (random weights, no download) from ``config``."""
        try:
            image, fusion, pool = config["image"], config["fusion"], config["pool"]
        except KeyError as e:
            raise TypeError(f"a joint model configuration needs {e}") from None
        return cls(ImageClassifier.from_config(image), FusionModel.from_config(fusion), pool)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone's activations in the backward pass (memory for compute)."""
        self.image.set_grad_checkpointing(enable)

    def maps(self, images: torch.Tensor) -> torch.Tensor:
        """[N, in_chans, S, S] -> the store's maps of those images [N, C, h, w] (:func:`stored_maps`)."""
        return stored_maps(self.image.forward_features(images), self.pool)

    def forward(self, images: torch.Tensor, view_mask: torch.Tensor, view_types: torch.Tensor,
                return_attention: bool = False):
        features = to_slots(self.maps(images), view_mask)
        return self.fusion(features, view_mask, view_types, return_attention=return_attention)


def joint_parts(ckpt: dict, weights: dict) -> dict:
    """The two models of a joint checkpoint: ``{"backbone": {"model_config", "state_dict"},
    "fusion": {...}, "pool": int}``, the backbone part a stage-1 checkpoint's, the fusion part a
    fusion checkpoint's. ``weights``: the joint state dict to split (e.g. its EMA weights)."""
    config = ckpt["model_config"]
    parts = {"pool": int(config["pool"])}
    for part, prefix in PART_PREFIXES.items():
        parts[part] = {"model_config": config["image" if part == "backbone" else "fusion"],
                       "state_dict": {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}}
    return parts
