"""The heads' cross-attention, returned on request: shapes, normalisation, masking, and that asking
for it changes nothing about the logits."""

import torch

from chx.models import create_model


def test_fusion_attention_covers_the_study_tokens_and_skips_padding():
    torch.manual_seed(0)
    model = create_model("fusion", in_dim=16, num_classes=3, dim=16, heads=2, ffn_dim=32, layers=1).eval()
    feats = torch.randn(2, 3, 16, 5, 4)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    with torch.no_grad():
        plain = model(feats, mask)
        logits, attn = model(feats, mask, return_attention=True)
    hh, ww = model.token_grid(5, 4)
    assert attn.shape == (2, 3, 3 * hh * ww)
    torch.testing.assert_close(logits, plain)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3))
    per_view = attn.reshape(2, 3, 3, hh * ww).sum(-1)                       # [B, K, V]
    assert per_view[0, :, 2].abs().max() == 0 and per_view[1, :, 1:].abs().max() == 0


def test_stage1_attention_is_over_the_feature_map():
    torch.manual_seed(0)
    model = create_model("backbone", backbone_name="test_convnext", num_classes=4, decoder_dim=32,
                         heads=2, ffn_dim=32).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        fmap = model.forward_features(x)
        logits, attn = model(x, return_attention=True)
        plain = model(x)
    torch.testing.assert_close(logits, plain)
    assert attn.shape == (2, 4, fmap.shape[2] * fmap.shape[3])
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4))
