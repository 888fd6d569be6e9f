"""Importing checkpoints of the CheXFusion reference code: key layout, stem fold, refusals.

The test builds checkpoints in the reference's key layout (its model/layers.py and cxr_model.py:
a Lightning ``state_dict`` under ``backbone.``) with a tiny timm ConvNeXt and small widths, and
checks the converted chx model against a plain-torch forward of the reference layout. The
reference's positional encoding (a documented defect) is set aside on both sides.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from chx.data.transforms import Preprocess
from chx.errors import ChxError
from chx.models.backbone import ImageClassifier
from chx.models.checkpoint import load_checkpoint, save_checkpoint
from chx.models.fusion import FusionModel
from chx.models.reference import convert_reference_checkpoint

TINY = "test_convnext" if "test_convnext" in timm.list_models("test_*") else "convnext_atto"
CLASSES = ["Atelectasis", "Edema", "Hernia"]
C, D, FFN, HEADS = 64, 16, 32, 8     # test_convnext's width; the reference's fixed 8 heads


def _r(g, *shape, scale=0.2):
    return scale * torch.randn(*shape, generator=g)


def _reference_decoder(g, prefix: str, in_dim: int, k: int = len(CLASSES)) -> dict:
    """The reference MLDecoder's state dict (one decoder layer, group FC of one output per query)."""
    sd = {"embed_standart.weight": _r(g, D, in_dim), "embed_standart.bias": _r(g, D),
          "query_embed.weight": torch.randn(k, D, generator=g),
          "layers.0.multihead_attn.in_proj_weight": _r(g, 3 * D, D),
          "layers.0.multihead_attn.in_proj_bias": _r(g, 3 * D),
          "layers.0.multihead_attn.out_proj.weight": _r(g, D, D),
          "layers.0.multihead_attn.out_proj.bias": _r(g, D),
          "layers.0.linear1.weight": _r(g, FFN, D), "layers.0.linear1.bias": _r(g, FFN),
          "layers.0.linear2.weight": _r(g, D, FFN), "layers.0.linear2.bias": _r(g, D),
          "duplicate_pooling": _r(g, k, D, 1), "duplicate_pooling_bias": _r(g, k)}
    for norm in ("norm1", "norm2", "norm3"):
        sd[f"layers.0.{norm}.weight"] = 1 + _r(g, D)
        sd[f"layers.0.{norm}.bias"] = _r(g, D)
    return {prefix + key: t for key, t in sd.items()}


def _reference_timm(seed: int = 0) -> dict:
    """The reference's timm model: 3 input channels, its classifier head replaced by an identity."""
    torch.manual_seed(seed)
    model = timm.create_model(TINY, pretrained=False)
    model.head = nn.Identity()
    with torch.no_grad():
        model.stem[0].bias.normal_()          # a non-zero stem bias: the fold must carry it
    return model.state_dict()


def _reference_stage1(layout: str) -> dict:
    g = torch.Generator().manual_seed(1)
    timm_sd = _reference_timm()
    if layout == "lightning":      # CxrModel(Backbone): backbone.model.*, backbone.head.decoder.*
        sd = {f"backbone.model.{k}": v for k, v in timm_sd.items()}
        sd.update(_reference_decoder(g, "backbone.head.decoder.", C))
        sd["backbone.pos_encoding.penc.inv_freq"] = torch.rand(C // 4)
        return {"state_dict": sd, "epoch": 6, "global_step": 1000, "pytorch-lightning_version": "2.0.2"}
    # the timm model with the ML-Decoder as its head: what FusionBackbone's torch.load expects
    return {**timm_sd, **_reference_decoder(g, "head.decoder.", C)}


def _reference_fusion(layers: int = 2, views: int = 4) -> dict:
    g = torch.Generator().manual_seed(2)
    sd = {f"backbone.model.{k}": v for k, v in _reference_timm(seed=5).items()}  # frozen stage 1
    sd.update({"backbone.conv2d.weight": _r(g, D, C, 3, 3), "backbone.conv2d.bias": _r(g, D),
               "backbone.pos_encoding.penc.inv_freq": torch.rand(D // 4),
               "backbone.padding_token": torch.randn(1, D, 1, 1, generator=g),
               "backbone.segment_embedding": torch.randn(views, D, 1, 1, generator=g)})
    for i in range(layers):
        p = f"backbone.transformer_encoder.layers.{i}."
        sd.update({p + "self_attn.in_proj_weight": _r(g, 3 * D, D),
                   p + "self_attn.in_proj_bias": _r(g, 3 * D),
                   p + "self_attn.out_proj.weight": _r(g, D, D), p + "self_attn.out_proj.bias": _r(g, D),
                   p + "linear1.weight": _r(g, FFN, D), p + "linear1.bias": _r(g, FFN),
                   p + "linear2.weight": _r(g, D, FFN), p + "linear2.bias": _r(g, D),
                   p + "norm1.weight": 1 + _r(g, D), p + "norm1.bias": _r(g, D),
                   p + "norm2.weight": 1 + _r(g, D), p + "norm2.bias": _r(g, D)})
    sd.update(_reference_decoder(g, "backbone.head.decoder.", D))
    return {"state_dict": sd, "epoch": 7}


def _save(obj, tmp_path, name="ref.ckpt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


# ------------------------------------------------------------ plain-torch forward of the reference

def _attention(x, mem, sd, p, training=False):
    """nn.MultiheadAttention of the reference (sequence-first [L, B, D]) from its state dict."""
    return F.multi_head_attention_forward(
        x, mem, mem, D, HEADS, sd[p + "in_proj_weight"], sd[p + "in_proj_bias"], None, None, False,
        0.0, sd[p + "out_proj.weight"], sd[p + "out_proj.bias"], training=training, need_weights=False)[0]


def _ln(x, sd, p):
    return F.layer_norm(x, (D,), sd[p + "weight"], sd[p + "bias"])


def _ffn(x, sd, p):
    return F.linear(F.relu(F.linear(x, sd[p + "linear1.weight"], sd[p + "linear1.bias"])),
                    sd[p + "linear2.weight"], sd[p + "linear2.bias"])


def _reference_head(sd, p, tokens):
    """The reference MLDecoder on tokens [B, N, C_in] -> logits [B, K] (eval mode)."""
    mem = F.relu(F.linear(tokens, sd[p + "embed_standart.weight"], sd[p + "embed_standart.bias"]))
    mem = mem.transpose(0, 1)                                                          # [N, B, D]
    tgt = sd[p + "query_embed.weight"][:, None].expand(-1, tokens.shape[0], -1)        # [K, B, D]
    layer = p + "layers.0."
    tgt = _ln(tgt + tgt, sd, layer + "norm1.")
    tgt = _ln(tgt + _attention(tgt, mem, sd, layer + "multihead_attn."), sd, layer + "norm2.")
    tgt = _ln(tgt + _ffn(tgt, sd, layer), sd, layer + "norm3.")
    h = tgt.transpose(0, 1)
    pool = sd[p + "duplicate_pooling"]
    out = torch.stack([h[:, i] @ pool[i] for i in range(h.shape[1])], dim=1).flatten(1)
    return out + sd[p + "duplicate_pooling_bias"]


def _imagenet_input(gray):
    """The reference's input for a grayscale image [B, 1, S, S] in [0, 1]: 3 copies, per-channel norm."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN)[None, :, None, None]
    std = torch.tensor(IMAGENET_DEFAULT_STD)[None, :, None, None]
    return (gray.expand(-1, 3, -1, -1) - mean) / std


# --------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("layout", ["lightning", "timm-with-head"])
def test_reference_backbone_converts_to_the_same_features_and_head(tmp_path, layout):
    path = _save(_reference_stage1(layout), tmp_path)
    ckpt = convert_reference_checkpoint(path, "backbone", CLASSES, backbone_name=TINY)
    assert ckpt["kind"] == "backbone" and ckpt["class_names"] == CLASSES
    pre = Preprocess.from_dict(ckpt["preprocess"])
    assert (pre.size, pre.mode) == (1024, "squash")
    assert ckpt["model_config"]["in_chans"] == 1 and ckpt["model_config"]["query_norm"] is True

    model = ImageClassifier.from_config(ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])                 # strict: every key mapped
    model.eval()
    ref = timm.create_model(TINY, pretrained=False)
    ref.head = nn.Identity()
    ref.load_state_dict(_reference_timm())
    ref.eval()
    sd = {k.removeprefix("backbone."): v for k, v in
          (_reference_stage1("lightning")["state_dict"]).items()}
    gray = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        fmap = model.forward_features((gray - pre.mean) / pre.std)
        ref_fmap = ref(_imagenet_input(gray))                 # [B, C, h, w]: timm with an identity head
        torch.testing.assert_close(fmap, ref_fmap, rtol=1e-5, atol=1e-5)   # the fold is exact
        model.head.pos_enc = False            # the reference's positional encoding: a documented difference
        logits = model.forward_head(ref_fmap)
        expected = _reference_head(sd, "head.decoder.", ref_fmap.flatten(2).transpose(1, 2))
    assert (logits - expected).abs().max() < 1e-5


def test_reference_fusion_converts_to_the_same_logits(tmp_path):
    path = _save(_reference_fusion(), tmp_path)
    ckpt = convert_reference_checkpoint(path, "fusion", CLASSES)
    assert set(ckpt["imported_from"]["dropped"]) == {"model.*", "padding_token", "pos_encoding.*"}
    config = ckpt["model_config"]
    assert (config["in_dim"], config["dim"], config["max_views"], config["layers"]) == (C, D, 4, 2)
    model = FusionModel.from_config(config)
    model.load_state_dict(ckpt["state_dict"])
    model.eval().pos_enc = False                              # the reference's encoding set aside

    sd = {k.removeprefix("backbone."): v for k, v in _reference_fusion()["state_dict"].items()}
    b, v, h, w = 2, 3, 4, 4
    feats = torch.randn(b, v, C, h, w)
    with torch.no_grad():
        logits = model(feats, torch.ones(b, v, dtype=torch.bool))
        # the reference's layers with attention over the tokens of one study (its batch_first
        # defect fixed) and all slots real (its padding path is not exercised)
        x = F.conv2d(feats.flatten(0, 1), sd["conv2d.weight"], sd["conv2d.bias"], stride=2, padding=1)
        x = x + sd["segment_embedding"][:v].repeat(b, 1, 1, 1)
        x = x.unflatten(0, (b, v)).permute(1, 3, 4, 0, 2).reshape(-1, b, D)       # [V*h'*w', B, D]
        for i in range(2):
            p = f"transformer_encoder.layers.{i}."
            x = _ln(x + _attention(x, x, sd, p + "self_attn."), sd, p + "norm1.")
            x = _ln(x + _ffn(x, sd, p), sd, p + "norm2.")
        expected = _reference_head(sd, "head.decoder.", x.transpose(0, 1))
    assert (logits - expected).abs().max() < 1e-5


def test_converted_checkpoint_saves_and_loads_as_a_chx_checkpoint(tmp_path):
    ckpt = convert_reference_checkpoint(_save(_reference_stage1("lightning"), tmp_path), "backbone",
                                        CLASSES, backbone_name=TINY)
    out = save_checkpoint(ckpt, tmp_path / "imported.pt")
    loaded = load_checkpoint(out, kind="backbone")
    model = ImageClassifier.from_config(loaded["model_config"])
    model.load_state_dict(loaded["state_dict"])
    assert list(loaded["imported_from"]["dropped"]) == ["pos_encoding.*"]


def test_unmappable_keys_are_refused_by_name(tmp_path):
    obj = _reference_stage1("lightning")
    obj["state_dict"]["backbone.extra_adapter.weight"] = torch.zeros(3)
    with pytest.raises(ChxError, match=r"cannot map key\(s\) extra_adapter.weight"):
        convert_reference_checkpoint(_save(obj, tmp_path), "backbone", CLASSES, backbone_name=TINY)

    obj = _reference_stage1("lightning")
    obj["state_dict"]["backbone.head.decoder.layers.1.norm1.weight"] = torch.ones(D)  # a second layer
    with pytest.raises(ChxError, match=r"head\.decoder\.layers\.1\.norm1\.weight"):
        convert_reference_checkpoint(_save(obj, tmp_path), "backbone", CLASSES, backbone_name=TINY)

    obj = _reference_stage1("lightning")
    obj["state_dict"]["backbone.model.stages.9.blocks.0.gamma"] = torch.ones(C)       # not in the timm model
    with pytest.raises(ChxError, match=r"cannot map backbone\.stages\.9\.blocks\.0\.gamma"):
        convert_reference_checkpoint(_save(obj, tmp_path), "backbone", CLASSES, backbone_name=TINY)


def test_wrong_kind_class_count_or_file_is_one_clear_error(tmp_path):
    stage1 = _save(_reference_stage1("lightning"), tmp_path)
    fusion = _save(_reference_fusion(), tmp_path, "f.ckpt")
    with pytest.raises(ChxError, match="use kind 'fusion'"):
        convert_reference_checkpoint(fusion, "backbone", CLASSES, backbone_name=TINY)
    with pytest.raises(ChxError, match="use kind 'backbone'"):
        convert_reference_checkpoint(stage1, "fusion", CLASSES)
    with pytest.raises(ChxError, match="3 outputs but 2 class names"):
        convert_reference_checkpoint(stage1, "backbone", CLASSES[:2], backbone_name=TINY)
    with pytest.raises(ChxError, match="does not exist"):
        convert_reference_checkpoint(tmp_path / "missing.ckpt", "backbone", CLASSES)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ChxError, match="cannot be read"):
        convert_reference_checkpoint(tmp_path / "junk.ckpt", "backbone", CLASSES)


def test_shared_queries_above_100_classes_are_refused(tmp_path):
    obj = _reference_stage1("lightning")
    sd = obj["state_dict"]
    sd["backbone.head.decoder.duplicate_pooling"] = torch.zeros(3, D, 2)   # 3 queries x 2 classes each
    sd["backbone.head.decoder.duplicate_pooling_bias"] = torch.zeros(6)
    with pytest.raises(ChxError, match="one query per class"):
        convert_reference_checkpoint(_save(obj, tmp_path), "backbone", CLASSES * 2, backbone_name=TINY)
