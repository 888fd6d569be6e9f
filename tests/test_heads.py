"""Stage-1 heads by name (`--head ml-decoder|csra|linear`): CSRA against a loop-by-loop transcription
of the paper's formula, the linear head, configs that travel in checkpoints (old ones load as
ML-Decoder), and the consumers of a head (training, resume, explain)."""

from __future__ import annotations

import math

import pytest
import torch

from chx.engine.attribution import ImageExplainer
from chx.errors import ChxError
from chx.models import create_model, load_checkpoint, load_model, model_from_config
from chx.models.heads import CSRAHead, LinearHead
from helpers import TINY, run_chx, shared_path


def _csra_by_the_formula(head: CSRAHead, fmap: torch.Tensor) -> torch.Tensor:
    """Zhu & Wu (ICCV 2021), per sample b, class i, head: s_j = m_i . x_j / |m_i|;
    logit = (1/N) sum_j s_j + lambda * sum_j [exp(T s_j) / sum_l exp(T s_l)] s_j (T = inf: max_j s_j),
    summed over the heads. Plain Python loops over b, i, j."""
    b_, c_, h_, w_ = fmap.shape
    out = torch.zeros(b_, head.classifiers[0].weight.shape[0], dtype=torch.float64)
    for conv, t in zip(head.classifiers, head.temperatures):
        m = conv.weight[:, :, 0, 0].detach().double()
        for b in range(b_):
            xs = [fmap[b, :, y, x].double() for y in range(h_) for x in range(w_)]
            for i in range(m.shape[0]):
                s = [float(m[i] @ xj) / float(m[i].norm()) for xj in xs]
                base = sum(s) / len(s)
                if t is None:
                    att = max(s)
                else:
                    z = sum(math.exp(t * sj) for sj in s)
                    att = sum(math.exp(t * sj) / z * sj for sj in s)
                out[b, i] += base + head.lam * att
    return out


@pytest.mark.parametrize("heads,lam,temperature", [(1, 0.1, 1.0), (1, 0.5, 3.0), (4, 0.2, 1.0), (2, 0.0, 1.0)])
def test_csra_is_its_formula(heads, lam, temperature):
    torch.manual_seed(0)
    head = CSRAHead(6, 3, heads=heads, lam=lam, temperature=temperature).double()
    fmap = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(head(fmap), _csra_by_the_formula(head, fmap), rtol=1e-9, atol=1e-9)


def test_csra_attention_is_its_softmax_over_locations():
    torch.manual_seed(1)
    head = CSRAHead(5, 4, heads=1, lam=0.1, temperature=2.0)
    fmap = torch.randn(3, 5, 2, 3)
    logits, att = head(fmap, return_attention=True)
    torch.testing.assert_close(logits, head(fmap))
    assert att.shape == (3, 4, 6)
    torch.testing.assert_close(att.sum(-1), torch.ones(3, 4))
    score = head.classifiers[0](fmap).flatten(2) / head.classifiers[0].weight.flatten(1).norm(dim=1)[None, :, None]
    torch.testing.assert_close(att, torch.softmax(2.0 * score, dim=2))
    # the multi-head attention is the mean of the heads' (a max head's is one-hot): rows still sum to 1
    _, att4 = CSRAHead(5, 4, heads=4)(fmap, return_attention=True)
    torch.testing.assert_close(att4.sum(-1), torch.ones(3, 4))


def test_linear_head_is_average_pool_then_linear_and_has_no_attention():
    torch.manual_seed(0)
    head = LinearHead(6, 3)
    fmap = torch.randn(2, 6, 4, 5)
    want = fmap.mean((2, 3)) @ head.fc.weight.T + head.fc.bias
    torch.testing.assert_close(head(fmap), want)
    with pytest.raises(ChxError, match="grad-cam"):
        head(fmap, return_attention=True)


@pytest.mark.parametrize("head", ["ml-decoder", "csra", "linear"])
def test_each_head_rebuilds_from_its_config(head):
    torch.manual_seed(0)
    model = create_model("backbone", backbone_name="test_convnext", num_classes=3, head=head,
                         csra_heads=2, csra_lambda=0.3).eval()
    assert ("head" in model.config) == (head != "ml-decoder")  # ML-Decoder's config is the pre-head one
    ckpt = {"kind": "backbone", "model_config": model.config, "state_dict": model.state_dict()}
    again = load_model(ckpt)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    assert type(again.head) is type(model.head)


def test_a_config_without_head_is_ml_decoder():
    from chx.models.ml_decoder import MLDecoder

    old = {"backbone_name": "test_convnext", "num_classes": 3, "in_chans": 1, "decoder_dim": 32, "heads": 4,
           "ffn_dim": 64, "dropout": 0.1, "query_norm": True}
    model = model_from_config("backbone", old)
    assert isinstance(model.head, MLDecoder) and model.config == old


@pytest.mark.parametrize("kw,what", [({"head": "mlp"}, "--head"), ({"head": "csra", "csra_heads": 3}, "--csra-heads"),
                                     ({"head": "csra", "csra_lambda": -1.0}, "--csra-lambda")])
def test_a_head_that_cannot_be_built_is_one_line(kw, what):
    with pytest.raises(ChxError, match=what):
        create_model("backbone", backbone_name="test_convnext", num_classes=3, **kw)


@pytest.fixture(scope="module")
def csra_run(tmp_path_factory, covid_manifest):
    """A tiny stage-1 run with the CSRA head, the DB loss, CLAHE and coarse dropout."""
    import contextlib
    import io

    from chx.cli import main

    out = tmp_path_factory.mktemp("csra") / "r"
    args = ["train-backbone", "--manifest", str(covid_manifest), "--images",
            str(shared_path("covid-cxr", "images")), *TINY, "--max-steps", "2", "--batch-size", "8",
            "--head", "csra", "--csra-heads", "2", "--loss", "db", "--clahe", "--coarse-dropout", "0.1",
            "-o", str(out)]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(args)
        except SystemExit as e:
            assert not e.code
    return out, args


def test_train_backbone_records_head_loss_and_augmentations(csra_run):
    out, _ = csra_run
    ckpt = load_checkpoint(out / "best.pt", kind="backbone")
    assert ckpt["model_config"]["head"] == "csra" and ckpt["model_config"]["csra_heads"] == 2
    opts = ckpt["options"]
    assert (opts["head"], opts["loss"], opts["clahe"], opts["coarse_dropout"]) == ("csra", "db", True, 0.1)
    assert isinstance(load_model(ckpt).head, CSRAHead)


def test_resume_with_another_head_or_augmentation_is_refused(capsys, csra_run):
    out, args = csra_run
    base = [a for a in args[1:]]
    for old, new in ((["--head", "csra"], ["--head", "linear"]), (["--clahe"], ["--no-clahe"]),
                     (["--loss", "db"], ["--loss", "wasl"])):
        i = next(k for k in range(len(base)) if base[k:k + len(old)] == old)
        changed = base[:i] + new + base[i + len(old):]
        code, _, err = run_chx(capsys, "train-backbone", *changed, "--resume")
        assert code == 2 and "--resume" in err and len(err.strip().splitlines()) == 1, err


def test_explain_attention_works_with_csra_and_refuses_linear(csra_run, tmp_path):
    out, _ = csra_run
    images = shared_path("covid-cxr", "images")
    path = sorted(images.glob("*.png"))[0]
    explainer = ImageExplainer.load(out / "best.pt", device="cpu", method="attention")
    expl = explainer.explain_study("s", [path], ["PA"], ["i"])
    k = len(explainer.class_names)
    grid = expl.views[0].grid
    assert grid.shape[0] == k and abs(float(grid[0].sum()) - 1.0) < 1e-4
    # a linear head: one line naming the method that works
    ckpt = load_checkpoint(out / "best.pt", kind="backbone")
    linear = create_model("backbone", backbone_name="test_convnext", num_classes=k, head="linear")
    with pytest.raises(ChxError, match="--method grad-cam"):
        ImageExplainer(linear, explainer.pre, ckpt["class_names"], torch.device("cpu")).explain_study(
            "s", [path], ["PA"], ["i"])
    expl = ImageExplainer(linear, explainer.pre, ckpt["class_names"], torch.device("cpu"),
                          method="grad-cam").explain_study("s", [path], ["PA"], ["i"])
    assert expl.views[0].grid.shape[0] == k


@pytest.mark.parametrize("head", ["csra", "linear"])
def test_a_joint_model_takes_a_backbone_of_any_head(head):
    from chx.models.fusion import FusionModel
    from chx.models.joint import JointModel

    torch.manual_seed(0)
    image = create_model("backbone", backbone_name="test_convnext", num_classes=3, head=head)
    fusion = FusionModel(in_dim=image.feature_dim, num_classes=3, dim=32, heads=4, ffn_dim=64)
    joint = JointModel(image, fusion)
    again = JointModel.from_config(joint.config)
    again.load_state_dict(joint.state_dict())
    assert type(again.image.head) is type(image.head)
    assert not any(p.requires_grad for p in again.image.head.parameters())
