"""Fusion view experts (issue 17): routing by view type, the gated mixture, old configs, the CLI."""

from __future__ import annotations

import pytest
import torch

from chx.data.views import FRONTAL_TYPE, LATERAL_TYPE, OTHER_TYPE
from chx.models import load_checkpoint, load_model
from chx.models.fusion import FusionModel, ViewExperts
from helpers import run_chx

FAST = ["--dim", "32", "--heads", "4", "--ffn-dim", "64", "--workers", "0", "--batch-size", "8",
        "--device", "cpu", "--max-steps", "2"]


def model(**kw):
    torch.manual_seed(0)
    return FusionModel(in_dim=16, num_classes=5, dim=32, max_views=4, heads=4, ffn_dim=64, **kw).eval()


def studies(b=3, v=4, seed=1):
    return torch.randn(b, v, 16, 6, 6, generator=torch.Generator().manual_seed(seed))


# Slot types of three studies: frontal + lateral + padding, lateral only, every type.
TYPES = torch.tensor([[FRONTAL_TYPE, LATERAL_TYPE, OTHER_TYPE, OTHER_TYPE], [LATERAL_TYPE, LATERAL_TYPE, OTHER_TYPE, OTHER_TYPE],
                      [FRONTAL_TYPE, FRONTAL_TYPE, LATERAL_TYPE, OTHER_TYPE]])
MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)


def test_each_view_goes_through_its_own_type_expert_only():
    m = model(view_experts=True)
    assert isinstance(m.proj, ViewExperts) and len(m.proj.experts) == 3
    seen = {t: [] for t in range(3)}
    for t, expert in enumerate(m.proj.experts):
        expert.register_forward_hook(lambda mod, inp, out, t=t: seen[t].append(inp[0].shape[0]))
    feats = studies()
    with torch.no_grad():
        m(feats, MASK, TYPES)
    assert {t: sum(n) for t, n in seen.items()} == {t: int((TYPES == t).sum()) for t in range(3)}

    # Zeroing the frontal expert changes the frontal slots' projections and nothing else.
    flat, types = feats.reshape(12, 16, 6, 6), TYPES.reshape(12)
    with torch.no_grad():
        before = m.project(flat, types)
        m.proj.experts[FRONTAL_TYPE].weight.zero_()
        m.proj.experts[FRONTAL_TYPE].bias.zero_()
        after = m.project(flat, types)
    frontal = types == FRONTAL_TYPE
    assert torch.equal(before[~frontal], after[~frontal])
    assert not torch.isclose(before[frontal], after[frontal]).all(dim=(1, 2, 3)).any()


def test_a_lateral_only_study_gives_the_frontal_expert_no_gradient():
    m = model(view_experts=True).train()
    m(studies(b=1), MASK[1:2], TYPES[1:2]).sum().backward()
    # Zero, not None: every expert is in the graph (on no rows), as DDP needs.
    assert not m.proj.experts[FRONTAL_TYPE].weight.grad.any() and not m.proj.experts[FRONTAL_TYPE].bias.grad.any()
    assert m.proj.experts[LATERAL_TYPE].weight.grad.abs().sum() > 0


def test_gated_mixture_is_the_gated_sum_of_the_experts_per_view_type():
    m = model(experts=4)
    with torch.no_grad():
        m.proj.gate.normal_()
        x = studies(b=1, v=3).reshape(3, 16, 6, 6)
        types = torch.tensor([FRONTAL_TYPE, LATERAL_TYPE, OTHER_TYPE])
        got = m.project(x, types)
        outs = torch.stack([e(x) for e in m.proj.experts])              # [E, 3, D, h', w']
        gates = m.proj.gate.softmax(dim=1)[types]                         # [3, E]
        want = torch.einsum("ve,evdhw->vdhw", gates, outs)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        # The lateral gates move the lateral view's tokens only.
        m.proj.gate[LATERAL_TYPE] += torch.arange(4.0)
        moved = m.project(x, types)
    assert torch.equal(moved[[0, 2]], got[[0, 2]]) and not torch.allclose(moved[1], got[1])


def test_old_config_rebuilds_the_shared_projection_and_its_logits():
    old = model(view_embedding=True)
    assert "view_experts" not in old.config and "experts" not in old.config
    clone = FusionModel.from_config(dict(old.config)).eval()
    assert isinstance(clone.proj, torch.nn.Conv2d)
    clone.load_state_dict(old.state_dict())                       # strict: the same keys as before
    with torch.no_grad():
        assert torch.equal(clone(studies(), MASK, TYPES), old(studies(), MASK, TYPES))
    for kw in ({"view_experts": True}, {"experts": 3}):
        m = model(**kw)
        again = FusionModel.from_config(m.config).eval()
        again.load_state_dict(m.state_dict())
        with torch.no_grad():
            assert torch.equal(again(studies(), MASK, TYPES), m(studies(), MASK, TYPES))
    with pytest.raises(ValueError, match="view_types"):
        model(view_experts=True)(studies(), MASK)


def test_train_fusion_view_experts_and_experts_from_the_cli(capsys, tmp_path, covid_models):
    store = covid_models["store"]
    for flags, key, value in ((["--view-experts"], "view_experts", True), (["--experts", "2"], "experts", 2)):
        out = tmp_path / key
        code, _, err = run_chx(capsys, "train-fusion", "--store", store, *FAST, *flags, "-o", out)
        assert code == 0, err
        ckpt = load_checkpoint(out / "best.pt", kind="fusion")
        assert ckpt["model_config"][key] == value and ckpt["options"][key] == value
        assert isinstance(load_model(ckpt).proj, ViewExperts)
    code, _, err = run_chx(capsys, "train-fusion", "--store", store, "--view-experts", "--experts", "2",
                           "-o", tmp_path / "both")
    assert code == 2 and "exclude each other" in err and "Traceback" not in err
    code, _, err = run_chx(capsys, "train-fusion", "--store", store, "--experts", "1", "-o", tmp_path / "one")
    assert code == 2 and "--experts 1" in err
