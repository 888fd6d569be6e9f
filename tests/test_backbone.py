import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file

from chx.errors import ChxError
from chx.models.backbone import ImageClassifier, create_backbone

TINY = "test_convnext" if "test_convnext" in timm.list_models("test_*") else "convnext_atto"
HEAD = dict(decoder_dim=16, heads=4, ffn_dim=32)


def _classifier(**kw):
    torch.manual_seed(0)
    return ImageClassifier(TINY, num_classes=3, **{**HEAD, **kw})


def test_feature_map_and_logits_shapes_at_64px():
    m = _classifier().eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        fmap = m.forward_features(x)
        assert fmap.shape == (2, m.feature_dim, 2, 2)
        assert m(x).shape == (2, 3)
        torch.testing.assert_close(m.forward_head(fmap), m(x))
    assert m.feature_stride == 32
    assert m.backbone.stem[0].in_channels == 1  # grayscale stem, no 3-copies trick


def test_checkpoint_rebuilds_from_config(tmp_path):
    m = _classifier().eval()
    path = tmp_path / "ckpt.pt"
    torch.save({"config": m.config, "state_dict": m.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    torch.manual_seed(99)
    clone = ImageClassifier.from_config(ckpt["config"])
    clone.load_state_dict(ckpt["state_dict"])
    clone.eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(clone(x), m(x))


def test_pretrained_offline_raises_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    with pytest.raises(ChxError, match="--no-pretrained") as info:
        create_backbone(TINY, pretrained=True)
    assert "--weights" in str(info.value)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_rgb_weights_load_into_grayscale_stem(tmp_path, suffix):
    torch.manual_seed(1)
    rgb = timm.create_model(TINY, pretrained=False)  # a plain timm model: 3 channels, 1000 classes
    state = rgb.state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    gray = create_backbone(TINY, weights=path, in_chans=1)
    loaded = gray.state_dict()
    stem = "stem.0.weight"
    assert loaded[stem].shape[1] == 1
    torch.testing.assert_close(loaded[stem], state[stem].sum(dim=1, keepdim=True))
    for key in loaded:
        if key != stem:
            assert torch.equal(loaded[key], state[key]), key


def test_weights_that_do_not_fit_raise(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"stem.0.weight": torch.zeros(3, 3, 4, 4)}, path)
    with pytest.raises(ChxError, match="does not fit"):
        create_backbone(TINY, weights=path)
    with pytest.raises(ChxError, match="does not exist"):
        create_backbone(TINY, weights=tmp_path / "missing.pt")


def test_unknown_model_name_lists_similar_names():
    with pytest.raises(ChxError, match="unknown timm model") as info:
        create_backbone("convnext_smal")
    assert "convnext_small" in str(info.value)


def test_pretrained_offline_uses_local_hub_cache(monkeypatch, tmp_path):
    hub_id = timm.models.get_pretrained_cfg(TINY).hf_hub_id
    if not hub_id:
        pytest.skip(f"{TINY} has no hub weights")
    torch.manual_seed(2)
    state = timm.create_model(TINY, pretrained=False).state_dict()
    repo = tmp_path / f"models--{hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    gray = create_backbone(TINY, pretrained=True, in_chans=1)
    torch.testing.assert_close(gray.state_dict()["stem.0.weight"],
                               state["stem.0.weight"].sum(dim=1, keepdim=True))


def test_old_checkpoint_config_without_query_norm_reproduces_its_logits():
    old = _classifier(query_norm=False).eval()
    config = {k: v for k, v in old.config.items() if k != "query_norm"}   # written before the option
    state = old.state_dict()
    assert not any("query_norm" in k for k in state)
    clone = ImageClassifier.from_config(config)
    clone.load_state_dict(state)                                        # strict: no new keys expected
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(clone.eval()(x), old(x))
    assert _classifier().config["query_norm"] is True                    # new models: the original math
