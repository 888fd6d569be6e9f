"""Models, built by name and config as timm builds its models, and loaded from checkpoints.

Three kinds: ``"backbone"`` (stage 1, :class:`~chx.models.backbone.ImageClassifier`: a timm ConvNeXt
with an ML-Decoder head), ``"fusion"`` (stage 2, :class:`~chx.models.fusion.FusionModel`) and
``"joint"`` (both, fine-tuned end to end from images, :class:`~chx.models.joint.JointModel`). A
model's ``config`` is plain data that rebuilds its architecture; a checkpoint holds that config and
the weights, so every command loads a model with one call::

    model = load_model(load_checkpoint("runs/b/best.pt"), kind="backbone")   # eval mode, EMA weights

Nothing outside this package knows ConvNeXt internals or the checkpoint's key layout.
"""

from __future__ import annotations

from torch import nn

from chx.errors import ChxError
from chx.models.checkpoint import (FORMAT, eval_weights, load_checkpoint, save_checkpoint,
                                   weights_hash)

KINDS = ("backbone", "fusion", "joint")


def _model_class(kind: str):
    if kind == "backbone":
        from chx.models.backbone import ImageClassifier
        return ImageClassifier
    if kind == "fusion":
        from chx.models.fusion import FusionModel
        return FusionModel
    if kind == "joint":
        from chx.models.joint import JointModel
        return JointModel
    raise ChxError(f"unknown model kind {kind!r}; chx has {', '.join(KINDS)} models")


def create_model(kind: str, **config) -> nn.Module:
    """A new model of ``kind`` from its constructor options (e.g. ``backbone_name``, ``num_classes``)."""
    return _model_class(kind)(**config)


def model_from_config(kind: str, config: dict) -> nn.Module:
    """Rebuild an architecture from a checkpoint's ``model_config`` (random weights, no download)."""
    try:
        return _model_class(kind).from_config(dict(config))
    except TypeError as e:
        raise ChxError(f"the {kind} model configuration is not one this chx version builds ({e}); "
                       f"was the checkpoint made by another tool or version?") from None


def load_model(ckpt: dict, kind: str | None = None, *, weights: str = "eval") -> nn.Module:
    """The model of a checkpoint dict (or a bundle's ``backbone``/``fusion`` part), in eval mode.

    ``weights``: "eval" (the EMA copy when the run kept one, else the model's own) or "train" (the
    model's own state dict, for resuming). A state dict that does not fit the configuration (another
    model family, another class count) is one clear line, never a size-mismatch traceback."""
    kind = kind or ckpt.get("kind")
    model = model_from_config(kind, ckpt["model_config"])
    state = eval_weights(ckpt) if weights == "eval" else ckpt["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        source = ckpt.get("source", "the checkpoint")
        raise ChxError(f"{source}: its {kind} weights do not fit its model configuration ({detail[:200]}); "
                       f"the file is damaged or was edited: use the run's own best.pt/last.pt") from None
    return model.eval()


__all__ = ["FORMAT", "KINDS", "create_model", "model_from_config", "load_model", "load_checkpoint",
           "save_checkpoint", "eval_weights", "weights_hash"]
