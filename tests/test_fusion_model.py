"""CheXFusion model: the properties the reference implementation gets wrong."""

from __future__ import annotations

import pytest
import torch

from chx.models.fusion import FusionModel


def model(**kw):
    torch.manual_seed(0)
    kw = {"layers": 2, **kw}
    m = FusionModel(in_dim=16, num_classes=5, dim=32, max_views=4, heads=4, ffn_dim=64, **kw)
    return m.eval()


def studies(b=3, v=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, v, 16, 6, 6, generator=g)


def test_fusion_prediction_independent_of_batch_mates():
    m = model()
    feats = studies(b=4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        together = m(feats, mask)
        alone = torch.cat([m(feats[i:i + 1], mask[i:i + 1]) for i in range(4)])
        other_mates = m(torch.cat([feats[:1], studies(b=3, seed=9)]),
                        torch.cat([mask[:1], torch.ones(3, 4, dtype=torch.bool)]))
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[0], other_mates[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"view_embedding": True}, {"layers": 0}])
def test_two_view_study_same_output_padded_to_2_3_4_slots(kw):
    m = model(**kw)
    two = studies(b=1, v=2)
    types = torch.tensor([[0, 1, 2, 2]])
    outs = []
    with torch.no_grad():
        for slots in (2, 3, 4):
            feats = torch.cat([two, torch.randn(1, slots - 2, 16, 6, 6) * 100], dim=1)  # garbage padding
            mask = torch.tensor([[True, True] + [False] * (slots - 2)])
            outs.append(m(feats, mask, types[:, :slots]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-5, atol=1e-5)


def test_segment_embedding_and_pos_enc_change_the_output_and_can_be_ablated():
    feats, mask = studies(b=1, v=2), torch.ones(1, 2, dtype=torch.bool)
    with torch.no_grad():
        full = model()(feats, mask)
        assert not torch.allclose(full, model(pos_enc=False)(feats, mask))
        no_seg = model(segment_embedding=False)
        assert no_seg.segment is None
        # Without segment embeddings (and without pos-enc differences) view order cannot matter.
        swapped = no_seg(feats.flip(1), mask)
        torch.testing.assert_close(no_seg(feats, mask), swapped, rtol=1e-5, atol=1e-5)


def test_config_round_trip_rebuilds_the_same_model():
    m = model(view_embedding=True)
    clone = FusionModel.from_config(m.config).eval()
    clone.load_state_dict(m.state_dict())
    feats, mask = studies(), torch.ones(3, 4, dtype=torch.bool)
    types = torch.zeros(3, 4, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(m(feats, mask, types), clone(feats, mask, types))


def test_trainable_parameter_count_at_paper_scale():
    m = FusionModel(in_dim=768, num_classes=26)
    n = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert 20e6 < n < 25e6, n  # METHOD.md: ~22.5 M trainable at C = D = 768


def test_old_checkpoint_config_without_query_norm_reproduces_its_logits():
    old = model(query_norm=False, view_embedding=True)
    config = {k: v for k, v in old.config.items() if k != "query_norm"}   # written before the option
    clone = FusionModel.from_config(config).eval()
    clone.load_state_dict(old.state_dict())                             # strict: no new keys expected
    feats, mask = studies(), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    types = torch.tensor([[0, 1, 2, 2], [0, 0, 1, 2], [1, 2, 2, 2]])
    with torch.no_grad():
        assert torch.equal(clone(feats, mask, types), old(feats, mask, types))
    assert model().config["query_norm"] is True and model().head.query_norm is not None
