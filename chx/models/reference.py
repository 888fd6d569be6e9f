"""Import checkpoints of the CheXFusion reference code (github.com/dongkyunk/CheXFusion, MIT).

The reference trains with PyTorch Lightning; its checkpoints hold ``state_dict`` with the keys of
its ``CxrModel``: ``backbone.`` + the keys of its stage-1 ``Backbone`` (``model.*``: a timm model
whose own head was replaced by an identity; ``head.decoder.*``: the ML-Decoder) or of its
``FusionBackbone`` (also ``conv2d``, ``segment_embedding``, ``padding_token``,
``transformer_encoder.layers.*``, and the frozen stage-1 timm model under ``model.*``). A plain
state dict of either module, and the "timm model with the ML-Decoder as its ``head``" layout that
``FusionBackbone`` loads, are read too.

:func:`convert_reference_checkpoint` maps those keys onto :class:`~chx.models.backbone.ImageClassifier`
or :class:`~chx.models.fusion.FusionModel` and returns a chx checkpoint dict. Every key is either
mapped or dropped for a stated reason; anything else is refused, by name. What the reference
computed differently, and what the converted model therefore does not reproduce:

- its positional encoding is applied to channels-first maps (a function of channel and column, no
  rows); chx adds its own 2-D encoding to the decoder's tokens (stage 1) and to the projected maps
  (stage 2). A converted head or fusion model gives other logits than the reference until it is
  fine-tuned; the backbone's feature maps are the reference's exactly.
- its stem reads 3 identical channels normalised with ImageNet's per-channel mean/std; chx reads
  one channel with one mean/std. The converter folds the per-channel normalisation into the
  1-channel stem, exactly for a grayscale image (a stem without padding is required).
- its resize is cv2 Lanczos (and a re-encoded JPEG cache); chx squashes with antialiased bilinear.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from chx.data.transforms import Preprocess
from chx.errors import ChxError
from chx.models.backbone import DEFAULT_BACKBONE, ImageClassifier, _cfg_modules
from chx.models.fusion import FusionModel

# The reference's MLDecoder and fusion encoder use PyTorch's default of 8 attention heads, dropout
# 0.1, and its images are resized to 1024 x 1024 without keeping the aspect ratio.
REFERENCE_HEADS = 8
REFERENCE_DROPOUT = 0.1
REFERENCE_SIZE = 1024

# reference ML-Decoder key (after "head.decoder.") -> chx MLDecoder key (after "head.")
_DECODER_KEYS = {
    "embed_standart.weight": "embed.weight",
    "embed_standart.bias": "embed.bias",
    "query_embed.weight": "queries",
    "layers.0.norm1.weight": "query_norm.weight",
    "layers.0.norm1.bias": "query_norm.bias",
    "layers.0.multihead_attn.in_proj_weight": "cross_attn.in_proj_weight",
    "layers.0.multihead_attn.in_proj_bias": "cross_attn.in_proj_bias",
    "layers.0.multihead_attn.out_proj.weight": "cross_attn.out_proj.weight",
    "layers.0.multihead_attn.out_proj.bias": "cross_attn.out_proj.bias",
    "layers.0.norm2.weight": "norm1.weight",
    "layers.0.norm2.bias": "norm1.bias",
    "layers.0.linear1.weight": "ffn.0.weight",
    "layers.0.linear1.bias": "ffn.0.bias",
    "layers.0.linear2.weight": "ffn.3.weight",
    "layers.0.linear2.bias": "ffn.3.bias",
    "layers.0.norm3.weight": "norm2.weight",
    "layers.0.norm3.bias": "norm2.bias",
    "duplicate_pooling": "group_weight",          # [K, D, 1] -> [K, D]
    "duplicate_pooling_bias": "group_bias",
}
_FUSION_KEYS = {"conv2d.weight": "proj.weight", "conv2d.bias": "proj.bias",
                "segment_embedding": "segment"}   # [V, D, 1, 1] -> [V, D]
_DECODER = re.compile(r"^(?:model\.)?head\.decoder\.(.+)$")
_POS_ENC = re.compile(r"^pos_encoding\.penc\.\w+$")
_ENCODER = re.compile(r"^transformer_encoder\.layers\.(\d+)\.(.+)$")
_DROPPED = {
    "pos_encoding.*": "the reference's fixed positional encoding (chx computes its own)",
    "padding_token": "the reference's pad token (chx masks empty view slots out of attention)",
    "model.*": "the frozen stage-1 backbone (chx fusion reads its features from the store: import "
               "the stage-1 checkpoint with kind 'backbone' and extract features with it)",
}
_SHOWN = 5   # keys named in an error line


def convert_reference_checkpoint(path: str | Path, kind: str, class_names: list[str],
                                 backbone_name: str | None = None) -> dict:
    """A reference checkpoint at ``path`` -> a chx checkpoint dict of ``kind`` ("backbone"|"fusion").

    Returns ``{"kind", "model_config", "state_dict", "class_names", "imported_from"}`` plus, for a
    backbone, ``"preprocess"`` (1024 px squash, the chx mean/std the folded stem expects). Ready for
    :func:`chx.models.checkpoint.save_checkpoint`; the state dict loads strictly into
    ``from_config(model_config)``.

    Args:
        path: a Lightning ``.ckpt`` of the reference, or a plain state dict of its model.
        kind: "backbone" (stage 1) or "fusion" (stage 2).
        class_names: the K class names, in the order of the reference's outputs (its config's
            ``classes``; the checkpoint does not store them).
        backbone_name: the timm model the reference trained (its ``timm_init_args.model_name``;
            default chx's default, the reference's ``convnext_small.fb_in22k_ft_in1k``). Stage 1 only.

    Raises ChxError (one line) for an unreadable file, a class count that does not match the
    weights, or keys it cannot map (named).
    """
    if kind not in ("backbone", "fusion"):
        raise ChxError(f"import-reference: kind must be 'backbone' or 'fusion', got {kind!r}")
    path = Path(path)
    state = _strip_prefixes(_read_state_dict(path))
    class_names = list(class_names)
    if kind == "backbone":
        config, mapped, dropped = _backbone(path, state, len(class_names), backbone_name or DEFAULT_BACKBONE)
        model = ImageClassifier.from_config(config)
    else:
        config, mapped, dropped = _fusion(path, state, len(class_names))
        model = FusionModel.from_config(config)
    state_dict = _complete(path, model, mapped, kind)
    _require_finite(path, state_dict)
    out = {"kind": kind, "model_config": config, "state_dict": state_dict, "class_names": class_names,
           "imported_from": {"path": str(path), "code": "dongkyunk/CheXFusion",
                             "dropped": {k: _DROPPED[k] for k in sorted(dropped)}}}
    if kind == "backbone":
        out["preprocess"] = Preprocess(REFERENCE_SIZE, mode="squash").to_dict()
    return out


# ------------------------------------------------------------------------------------ reading

def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a Lightning checkpoint's ``state_dict``, or of a plain state dict."""
    if not path.is_file():
        raise ChxError(f"reference checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickled objects, truncated files: all the user's to fix
        raise ChxError(f"reference checkpoint {path} cannot be read as plain tensors "
                       f"({type(e).__name__}); in the reference's environment re-save its weights with "
                       f"torch.save(torch.load(CKPT)['state_dict'], 'weights.pt') and import that") from None
    if isinstance(obj, dict) and str(obj.get("format", "")).startswith("chx-"):
        raise ChxError(f"{path} is already a chx checkpoint; use it as it is")
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ChxError(f"{path} holds no state dict (neither a Lightning checkpoint's 'state_dict' nor "
                       f"a mapping of names to tensors); give the reference's .ckpt or model file")
    return state


def _strip_prefixes(state: dict) -> dict:
    """Drop the wrappers' prefixes: DDP's ``module.``, then CxrModel's ``backbone.``."""
    for prefix in ("module.", "backbone."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _names(keys) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


# ------------------------------------------------------------------------------------ mapping

def _decoder(path: Path, sub: dict, num_classes: int) -> tuple[dict, dict]:
    """The ML-Decoder's keys (after ``head.decoder.``) -> (chx keys after ``head.``, dims)."""
    unknown = set(sub) - set(_DECODER_KEYS)
    if unknown:
        raise ChxError(f"{path}: cannot map ML-Decoder key(s) {_names('head.decoder.' + k for k in unknown)}")
    missing = set(_DECODER_KEYS) - set(sub)
    if missing:
        raise ChxError(f"{path}: the ML-Decoder lacks key(s) {_names('head.decoder.' + k for k in missing)}; "
                       f"is this a reference checkpoint?")
    pooling = sub["duplicate_pooling"]
    if pooling.ndim != 3 or pooling.shape[2] != 1:
        raise ChxError(f"{path}: head.decoder.duplicate_pooling has shape {tuple(pooling.shape)}: the "
                       f"reference shared its queries between classes (more than 100 classes); chx has "
                       f"one query per class and cannot import it")
    k = int(sub["duplicate_pooling_bias"].shape[0])
    if k != num_classes:
        raise ChxError(f"{path}: the checkpoint has {k} outputs but {num_classes} class names were given; "
                       f"give the reference config's class list, in its order")
    mapped = {_DECODER_KEYS[name]: (t[:, :, 0] if name == "duplicate_pooling" else t)
              for name, t in sub.items()}
    dims = {"in_dim": int(sub["embed_standart.weight"].shape[1]),
            "dim": int(sub["embed_standart.weight"].shape[0]),
            "ffn_dim": int(sub["layers.0.linear1.weight"].shape[0])}
    return mapped, dims


def _backbone(path: Path, state: dict, num_classes: int, backbone_name: str):
    """Stage 1: (model_config, chx state dict without timm's unused head, dropped groups)."""
    decoder, timm_keys, dropped = {}, {}, set()
    timm_prefix = "model." if any(k.startswith("model.") for k in state) else ""
    unknown = []
    for key, t in state.items():
        if m := _DECODER.match(key):
            decoder[m.group(1)] = t
        elif _POS_ENC.match(key):
            dropped.add("pos_encoding.*")
        elif key.startswith(timm_prefix):
            timm_keys[key[len(timm_prefix):]] = t
        else:
            unknown.append(key)
    if unknown:
        raise ChxError(f"{path}: cannot map key(s) {_names(unknown)} onto a chx backbone "
                       f"(is this a fusion checkpoint? then use kind 'fusion')")
    if not decoder:
        raise ChxError(f"{path}: no ML-Decoder keys (head.decoder.*) found: not a reference stage-1 "
                       f"checkpoint (a fusion checkpoint? then use kind 'fusion')")
    head, dims = _decoder(path, decoder, num_classes)
    config = dict(backbone_name=backbone_name, num_classes=num_classes, in_chans=1,
                  decoder_dim=dims["dim"], heads=REFERENCE_HEADS, ffn_dim=dims["ffn_dim"],
                  dropout=REFERENCE_DROPOUT, query_norm=True)
    mapped = {f"backbone.{k}": t for k, t in timm_keys.items()}
    mapped.update({f"head.{k}": t for k, t in head.items()})
    return config, mapped, dropped


def _fusion(path: Path, state: dict, num_classes: int):
    """Stage 2: (model_config, chx state dict, dropped groups)."""
    decoder, mapped, dropped, unknown, layers = {}, {}, set(), [], set()
    for key, t in state.items():
        if key.startswith("head.decoder."):
            decoder[key[len("head.decoder."):]] = t
        elif m := _ENCODER.match(key):
            layers.add(int(m.group(1)))
            mapped[f"encoder.layers.{m.group(1)}.{m.group(2)}"] = t
        elif key in _FUSION_KEYS:
            mapped[_FUSION_KEYS[key]] = t[:, :, 0, 0] if key == "segment_embedding" else t
        elif key == "padding_token":
            dropped.add("padding_token")
        elif _POS_ENC.match(key):
            dropped.add("pos_encoding.*")
        elif key.startswith("model."):
            dropped.add("model.*")
        else:
            unknown.append(key)
    if unknown:
        raise ChxError(f"{path}: cannot map key(s) {_names(unknown)} onto a chx fusion model "
                       f"(is this a stage-1 checkpoint? then use kind 'backbone')")
    absent = [k for k in _FUSION_KEYS if k not in state]
    if absent or not decoder:
        lacking = _names(absent or ["head.decoder.*"])
        raise ChxError(f"{path}: not a reference fusion checkpoint (no {lacking}; a stage-1 checkpoint? "
                       f"then use kind 'backbone')")
    head, dims = _decoder(path, decoder, num_classes)
    proj, segment = state["conv2d.weight"], state["segment_embedding"]
    dim = int(proj.shape[0])
    enc_ffn = {int(t.shape[0]) for k, t in mapped.items() if k.endswith(".linear1.weight")}
    if dims["in_dim"] != dim or dims["dim"] != dim or enc_ffn - {dims["ffn_dim"]}:
        raise ChxError(f"{path}: the fusion model's widths differ between its parts (conv {dim}, "
                       f"decoder {dims['in_dim']} -> {dims['dim']}, feed-forward {sorted(enc_ffn)} vs "
                       f"{dims['ffn_dim']}); chx's fusion model uses one width and one feed-forward size")
    config = dict(in_dim=int(proj.shape[1]), num_classes=num_classes, dim=dim,
                  max_views=int(segment.shape[0]), layers=len(layers), heads=REFERENCE_HEADS,
                  ffn_dim=dims["ffn_dim"], dropout=REFERENCE_DROPOUT, pos_enc=True,
                  segment_embedding=True, view_embedding=False, query_norm=True)
    mapped.update({f"head.{k}": t for k, t in head.items()})
    return config, mapped, dropped


def _complete(path: Path, model: nn.Module, mapped: dict, kind: str) -> dict:
    """The model's full state dict from the mapped tensors: the stem folded (backbone), timm's own
    head (which the reference replaced, and chx freezes: ``forward_features`` does not use it) kept
    as built; anything else must fit exactly."""
    own = model.state_dict()
    if kind == "backbone":
        mapped = _fold_stem(path, model, mapped)
        mapped = {**{k: v for k, v in own.items() if k.startswith("backbone.head.")}, **mapped}
    extra, missing = set(mapped) - set(own), set(own) - set(mapped)
    if extra or missing:
        name = model.config.get("backbone_name", "fusion")
        raise ChxError(f"{path}: the {kind} keys do not fit chx's {name} model: cannot map "
                       f"{_names(extra) or 'none'}; nothing for {_names(missing) or 'none'}")
    wrong = [f"{k} {tuple(mapped[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if mapped[k].shape != own[k].shape]
    if wrong:
        raise ChxError(f"{path}: tensor shapes do not fit chx's model: {_names(wrong)}")
    return {k: mapped[k].detach().to(own[k].dtype).clone() for k in own}


def _require_finite(path: Path, state_dict: dict) -> None:
    """Refuse weights with NaN or infinity (a diverged run, a damaged file): the model would
    predict NaN, and every report made from it would hold NaN."""
    bad = [k for k, t in state_dict.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ChxError(f"{path}: weight(s) {_names(bad)} hold non-finite values (NaN or inf) after conversion; "
                       f"the reference run diverged or the file is damaged: import a checkpoint of a run "
                       f"that stayed finite")


def _fold_stem(path: Path, model: ImageClassifier, mapped: dict) -> dict:
    """Fold the reference's input, 3 identical channels each normalised with ImageNet's mean m_c
    and std s_c, into chx's 1-channel stem that reads ``(x - M) / S`` (chx's Preprocess):

        W1 = S * sum_c W_c / s_c,   b1 = b - sum_c (m_c / s_c) sum(W_c) + (M / S) sum(W1)

    (sums over the kernel). Exact for a stem without padding (ConvNeXt's patchify stem): a padded
    stem would see zeros where the reference saw the normalised zero."""
    stems = _cfg_modules(model.backbone, "first_conv")
    if len(stems) != 1:
        raise ChxError(f"{path}: cannot find the stem of {model.config['backbone_name']} "
                       f"(timm names {stems or 'none'}); chx imports ConvNeXt-like backbones")
    conv = model.backbone.get_submodule(stems[0])
    w_key, b_key = f"backbone.{stems[0]}.weight", f"backbone.{stems[0]}.bias"
    w, b = mapped.get(w_key), mapped.get(b_key)
    if (not isinstance(conv, nn.Conv2d) or any(conv.padding) or b is None or w is None
            or w.ndim != 4 or w.shape[1] != 3):
        raise ChxError(f"{path}: cannot fold the reference's 3-channel ImageNet normalisation into the "
                       f"stem {stems[0]} of {model.config['backbone_name']} (needs a 3-channel conv with "
                       f"bias and no padding; found weight {None if w is None else tuple(w.shape)})")
    pre = Preprocess(REFERENCE_SIZE, mode="squash")
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, dtype=torch.float64)
    std = torch.tensor(IMAGENET_DEFAULT_STD, dtype=torch.float64)
    w64, b64 = w.double(), b.double()
    w1 = pre.std * (w64 / std[None, :, None, None]).sum(dim=1, keepdim=True)     # [O, 1, kh, kw]
    b1 = (b64 - (w64.sum(dim=(2, 3)) * (mean / std)[None, :]).sum(dim=1)
          + pre.mean / pre.std * w1.sum(dim=(1, 2, 3)))
    return {**mapped, w_key: w1.to(w.dtype), b_key: b1.to(b.dtype)}
