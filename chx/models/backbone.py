"""Stage-1 model: a timm backbone (ConvNeXt by default) with a head by name (ML-Decoder by default).

Everything timm-specific lives here: the rest of chx only sees ``forward_features`` (the last-stage
feature map), ``forward_head`` and a plain ``config`` dict that rebuilds the model.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import timm
import timm.models
import torch
from torch import nn

from chx.errors import ChxError
from chx.models.heads import DEFAULT_HEAD, CSRAHead, LinearHead, check_head
from chx.models.ml_decoder import MLDecoder
from chx.options import DEFAULT_BACKBONE

_TRUE = {"1", "on", "yes", "true"}


def _similar_names(name: str, n: int = 5) -> list[str]:
    arch = name.split(".")[0].lower()
    family = arch.split("_")[0]
    candidates = timm.list_models(f"*{family}*") or timm.list_models()
    close = difflib.get_close_matches(arch, candidates, n=n, cutoff=0.4)
    return close or candidates[:n]


def _check_name(name: str) -> None:
    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")) or timm.is_model(name):
        return
    hint = ", ".join(_similar_names(name))
    raise ChxError(f"unknown timm model {name!r}; similar names: {hint} "
                   f"(see timm.list_models('*pattern*'))")


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in _TRUE
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _offline_error(name: str, cause: str) -> ChxError:
    return ChxError(f"could not download pretrained weights for {name} (offline?): use "
                    f"--no-pretrained, or --weights PATH with a local timm/safetensors file ({cause})")


def _cached_hub_file(name: str) -> str | None:
    """A locally cached hub weight file for ``name``, or None. Used in offline mode only."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id
    except Exception:  # noqa: BLE001 - no pretrained config: nothing cached either
        return None
    if not hub_id:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(hub_id, filename)
        if isinstance(path, str):
            return path
    return None


def _cfg_modules(model: nn.Module, key: str) -> list[str]:
    """Module names that timm's pretrained_cfg gives under ``key`` ("first_conv", "classifier")."""
    names = model.pretrained_cfg.get(key) if hasattr(model, "pretrained_cfg") else None
    if not names:
        return []
    return [names] if isinstance(names, str) else list(names)


def load_timm_weights(model: nn.Module, path: str | Path, in_chans: int) -> None:
    """Load a local timm checkpoint (.pth/.pt/.bin state dict or .safetensors) into ``model``.

    A stem made for another channel count (e.g. 3-channel ImageNet weights) is adapted with timm's
    own ``adapt_input_conv`` (summed for ``in_chans=1``). Strict on every key except the
    classifier head, which the backbone does not have (``num_classes=0``).
    """
    path = Path(path)
    if not path.is_file():
        raise ChxError(f"weights file {path} does not exist: pass a local timm .pth/.pt/.bin or "
                       f".safetensors file")
    try:
        state = timm.models.load_state_dict(str(path), use_ema=True, device="cpu")
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise ChxError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from exc
    head = tuple(f"{k}." for k in _cfg_modules(model, "classifier"))
    state = {k: v for k, v in state.items() if not (head and k.startswith(head))}
    for key in (f"{k}.weight" for k in _cfg_modules(model, "first_conv")):
        if key in state and state[key].ndim == 4 and state[key].shape[1] != in_chans:
            try:
                state[key] = timm.models.adapt_input_conv(in_chans, state[key])
            except (NotImplementedError, ValueError, AssertionError) as exc:
                raise ChxError(f"weights file {path}: cannot adapt stem {key} "
                               f"{tuple(state[key].shape)} to {in_chans} input channel(s)") from exc
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1].strip()
        raise ChxError(f"weights file {path} does not fit this backbone: {first_line}") from exc
    missing = [k for k in result.missing_keys if not (head and k.startswith(head))]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise ChxError(f"weights file {path} does not fit this backbone: "
                       f"{len(missing)} missing key(s) {missing[:3]}, "
                       f"{len(unexpected)} unexpected key(s) {unexpected[:3]}")


def create_backbone(name: str = DEFAULT_BACKBONE, pretrained: bool = False,
                    weights: str | Path | None = None, in_chans: int = 1) -> nn.Module:
    """A timm backbone without classifier or pooling: its ``forward_features`` gives [B, C, h, w].

    ``weights`` (a local file) takes precedence over ``pretrained`` (a hub download). Offline (the
    download fails, or HF_HUB_OFFLINE=1 and nothing is cached) raises a ChxError saying what to do.
    """
    _check_name(name)
    kwargs = dict(num_classes=0, global_pool="", in_chans=in_chans)
    if weights is not None:
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_timm_weights(model, weights, in_chans)
        return model
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    if _hub_offline():
        # fail at once instead of waiting for the hub; use the local hub cache if it has the file
        cached = _cached_hub_file(name)
        if cached is None:
            raise _offline_error(name, "HF_HUB_OFFLINE is set and the weights are not in the local "
                                       "hub cache")
        kwargs["pretrained_cfg_overlay"] = dict(file=cached, source="")
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - connection errors, LocalEntryNotFoundError, OSError, ...
        raise _offline_error(name, f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc


class ImageClassifier(nn.Module):
    """Single-image classifier: timm backbone -> last-stage map [B, C, h, w] -> head -> [B, K].

    ``head`` (:mod:`chx.models.heads`): "ml-decoder" (default), "csra" (with ``csra_heads``,
    ``csra_lambda``, ``csra_temperature``) or "linear". A config without ``head`` is ML-Decoder: the
    ML-Decoder config has no such key, as before heads had names.

    ``config`` holds the architecture only (no ``pretrained`` / ``weights``: those initialise, the
    state dict replaces them), so a checkpoint ``{config, state_dict}`` rebuilds with
    ``ImageClassifier.from_config(config).load_state_dict(state_dict)`` without key surgery.
    ``query_norm`` is the ML-Decoder head's (see :class:`~chx.models.ml_decoder.MLDecoder`).
    """

    def __init__(self, backbone_name: str, num_classes: int, pretrained: bool = False,
                 weights: str | Path | None = None, in_chans: int = 1, decoder_dim: int = 768,
                 heads: int = 8, ffn_dim: int = 2048, dropout: float = 0.1, query_norm: bool = True,
                 head: str = DEFAULT_HEAD, csra_heads: int = 1, csra_lambda: float = 0.1,
                 csra_temperature: float = 1.0):
        super().__init__()
        check_head(head, csra_heads, csra_lambda, csra_temperature)
        if head == "ml-decoder":
            # no "head" key: the config of every model made before heads had names, unchanged
            # (old runs resume, old checkpoints rebuild); from_config reads a missing key as this
            self.config = dict(backbone_name=backbone_name, num_classes=num_classes, in_chans=in_chans,
                               decoder_dim=decoder_dim, heads=heads, ffn_dim=ffn_dim, dropout=dropout,
                               query_norm=query_norm)
        elif head == "csra":
            self.config = dict(backbone_name=backbone_name, num_classes=num_classes, in_chans=in_chans,
                               head=head, csra_heads=csra_heads, csra_lambda=float(csra_lambda),
                               csra_temperature=float(csra_temperature))
        else:
            self.config = dict(backbone_name=backbone_name, num_classes=num_classes, in_chans=in_chans,
                               head=head)
        self.head_name = head
        self.backbone = create_backbone(backbone_name, pretrained=pretrained, weights=weights,
                                        in_chans=in_chans)
        # timm's own head (e.g. ConvNeXt's head.norm) is not used by forward_features: freeze it,
        # so it neither trains nor makes DDP wait for gradients that never come.
        own_head = getattr(self.backbone, "head", None)
        if isinstance(own_head, nn.Module):
            own_head.requires_grad_(False)
        self.feature_dim: int = int(self.backbone.num_features)
        self.feature_stride: int = self._stride()
        if head == "csra":
            self.head = CSRAHead(self.feature_dim, num_classes, heads=csra_heads, lam=csra_lambda,
                                 temperature=csra_temperature)
        elif head == "linear":
            self.head = LinearHead(self.feature_dim, num_classes)
        else:
            self.head = MLDecoder(self.feature_dim, num_classes, dim=decoder_dim, heads=heads,
                                  ffn_dim=ffn_dim, dropout=dropout, pos_enc=True, query_norm=query_norm)

    def _stride(self) -> int:
        info = getattr(self.backbone, "feature_info", None)
        if info:
            last = info[-1] if isinstance(info, (list, tuple)) else None
            if isinstance(last, dict) and "reduction" in last:
                return int(last["reduction"])
        size = 256  # no feature_info: measure it
        was_training = self.backbone.training
        self.backbone.eval()
        with torch.no_grad():
            probe = self.backbone.forward_features(torch.zeros(1, self.config["in_chans"], size, size))
        self.backbone.train(was_training)
        return size // probe.shape[-1]

    @classmethod
    def from_config(cls, config: dict) -> "ImageClassifier":
        """Rebuild the architecture (random weights, no download) from ``config``. A config without
        ``query_norm`` was written before the option existed: its head had no query norm."""
        return cls(**{"query_norm": False, **config, "pretrained": False, "weights": None})

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_chans, H, W] -> last-stage feature map [B, C, H/stride, W/stride]."""
        return self.backbone.forward_features(x)

    def forward_head(self, fmap: torch.Tensor, return_attention: bool = False):
        """[B, C, h, w] -> logits [B, K]; with ``return_attention`` also the head's attention
        [B, K, h*w] (row-major over the map; ML-Decoder: cross-attention averaged over heads; CSRA:
        its attention pooling weights; a linear head has none and refuses with a ChxError)."""
        return self.head(fmap, return_attention=return_attention)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """[B, in_chans, H, W] -> logits [B, K] (and attention [B, K, h*w], see forward_head)."""
        return self.forward_head(self.forward_features(x), return_attention=return_attention)
