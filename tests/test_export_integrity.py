"""Every export carries and checks its class list and preprocessing (issue 26, item 9).

Each format (a .chx bundle, the hf folder, the ONNX folder) stores the sha256 of its spec (class
names, preprocessing, features, architecture; canonical JSON) in its weights: the bundle's
"integrity", model.safetensors' metadata, each ONNX graph's metadata_props. Loading hashes the spec
again; an edited config.json, swapped names, 13 or 15 names for 14 outputs, 14 identical names, a
missing preprocessing key, a graph of another export or in the wrong file: one line, never a
traceback and never a relabelled output. Old exports (no record) load with a warning. Export
refuses duplicate names and non-finite weights; a full disk during export is one line and leaves
nothing. import-reference refuses non-finite weights.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from chx.errors import ChxError
from helpers import ROOT, run_chx, shared_path

FORMATS = ("bundle", "hf", "onnx")
OUT = {"bundle": "model.chx", "hf": "model-hf", "onnx": "model-onnx"}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


HAS_ONNX = all(_has(m) for m in ("onnx", "onnxscript", "onnxruntime"))


def _formats():
    """The formats, ONNX skipped without the onnx extra."""
    return [pytest.param(f, marks=pytest.mark.skipif(f == "onnx" and not HAS_ONNX,
                                                     reason="the onnx extra (pip install 'chx[onnx]')"))
            for f in FORMATS]


def _other_fusion(covid_models, path):
    """Another fusion model of the same backbone, classes and store: its weights perturbed."""
    from chx.models import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(covid_models["fusion"], kind="fusion")
    for key in ("state_dict", "ema_state_dict"):
        for name, t in (ckpt.get(key) or {}).items():
            if t.is_floating_point():
                ckpt[key][name] = t * 1.01 + 0.01
    ckpt.pop("source", None)
    save_checkpoint(ckpt, path)
    return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory, covid_backbone, covid_models):
    """The covid models exported in every format, and hf and ONNX exports of another fusion model
    (same classes and preprocessing: only the export id tells them apart)."""
    from chx.cli import main   # run_chx needs capsys, which a module fixture cannot have

    tmp = tmp_path_factory.mktemp("exports")
    other = _other_fusion(covid_models, tmp / "other-fusion.pt")
    for fmt in FORMATS:
        if fmt == "onnx" and not HAS_ONNX:
            continue
        main(["export", "--backbone", str(covid_backbone), "--fusion", str(covid_models["fusion"]),
              "--format", fmt, "-o", str(tmp / OUT[fmt])])
        if fmt != "bundle":
            main(["export", "--backbone", str(covid_backbone), "--fusion", str(other), "--format", fmt,
                  "-o", str(tmp / f"other-{OUT[fmt]}")])
    return tmp


def _copy(exports, fmt, tmp_path, name=None):
    src, dst = exports / (name or OUT[fmt]), tmp_path / OUT[fmt]
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


def _load(fmt, path):
    if fmt == "onnx":
        from chx.engine.onnx_runtime import OnnxPredictor

        return OnnxPredictor.load(path)
    from chx.engine.predictor import Predictor

    return Predictor.load(path, device="cpu")


def _refused(fmt, path, *words):
    """Loading ``path`` is one ChxError line holding each of ``words``."""
    with pytest.raises(ChxError) as e:
        _load(fmt, path)
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def _edit(fmt, path, fn):
    """Edit the spec as a user with a text editor (hf, onnx: config.json) or torch (a bundle) would:
    ``fn`` gets a dict with class_names, preprocessing, features, integrity (a view of the file's)."""
    if fmt == "bundle":
        b = torch.load(path, weights_only=True)
        spec = {"class_names": b["class_names"], "preprocessing": b["backbone"].get("preprocess"),
                "features": b["features"], "integrity": b.get("integrity")}
        fn(spec)
        b["class_names"], b["features"] = spec["class_names"], spec["features"]
        for key, dst in (("preprocessing", b["backbone"]), ("integrity", b)):
            if spec.get(key) is None:
                dst.pop("preprocess" if key == "preprocessing" else key, None)
            else:
                dst["preprocess" if key == "preprocessing" else key] = spec[key]
        torch.save(b, path)
    else:
        config = json.loads((path / "config.json").read_text())
        fn(config)
        (path / "config.json").write_text(json.dumps(config, indent=2))


def _swap(c):
    n = c["class_names"]
    n[2], n[5] = n[5], n[2]


CLASS_EDITS = {
    "two names swapped": (_swap, ["class_names", "sha256"]),
    "13 names for 14 outputs": (lambda c: c["class_names"].pop(), ["14 classes", "names 13"]),
    "15 names for 14 outputs": (lambda c: c["class_names"].append("Extra"), ["14 classes", "names 15"]),
    "14 identical names": (lambda c: c.update(class_names=["Pneumonia"] * 14), ["distinct", "14 times"]),
    "one name renamed": (lambda c: c["class_names"].__setitem__(0, "Edema"), ["class_names"]),
    "an empty name": (lambda c: c["class_names"].__setitem__(3, " "), ["class_names"]),
}


@pytest.mark.parametrize("fmt", _formats())
@pytest.mark.parametrize("case", list(CLASS_EDITS))
def test_an_edited_class_list_is_one_line(exports, tmp_path, fmt, case):
    path = _copy(exports, fmt, tmp_path)
    fn, words = CLASS_EDITS[case]
    _edit(fmt, path, fn)
    _refused(fmt, path, str(path), "export", *words)


def _drop_preprocessing(c):
    c["preprocessing"] = None


PREPROCESSING_EDITS = {
    "preprocessing.size edited": (lambda c: c["preprocessing"].update(size=96), ["preprocessing"]),
    "preprocessing.mean edited": (lambda c: c["preprocessing"].update(mean=0.5), ["preprocessing", "sha256"]),
    "resize mode edited": (lambda c: c["preprocessing"].update(mode="squash"), ["preprocessing", "sha256"]),
    "preprocessing missing": (_drop_preprocessing, ["lacks", "preprocess"]),
    "an unknown preprocessing key": (lambda c: c["preprocessing"].update(gamma=2.2), ["unknown keys"]),
    "flip TTA switched off": (lambda c: c["features"].update(flip_tta=False), ["features", "sha256"]),
    "pool edited": (lambda c: c["features"].update(pool=2), ["features", "sha256"]),
}


@pytest.mark.parametrize("fmt", _formats())
@pytest.mark.parametrize("case", list(PREPROCESSING_EDITS))
def test_edited_preprocessing_is_one_line(exports, tmp_path, fmt, case):
    path = _copy(exports, fmt, tmp_path)
    fn, words = PREPROCESSING_EDITS[case]
    if fmt != "bundle" and fn is _drop_preprocessing:
        fn = lambda c: c.pop("preprocessing")   # noqa: E731 - the key gone from config.json
    _edit(fmt, path, fn)
    _refused(fmt, path, str(path), *words)


@pytest.mark.parametrize("fmt", _formats())
def test_intact_exports_carry_the_record_and_load_quietly(exports, capsys, fmt):
    from chx.engine.predictor import INTEGRITY_KEY

    path = exports / OUT[fmt]
    if fmt == "bundle":
        record = torch.load(path, weights_only=True)["integrity"]
    else:
        config = json.loads((path / "config.json").read_text())
        record = config["integrity"]
    assert set(record) == {"version", "spec_sha256", "parts", "export_id"}
    assert set(record["parts"]) == {"class_names", "preprocessing", "features", "architecture"}
    if fmt == "hf":
        from safetensors import safe_open

        with safe_open(path / "model.safetensors", "pt") as f:
            assert json.loads(f.metadata()[INTEGRITY_KEY]) == record
    if fmt == "onnx":
        import onnx

        for part in ("backbone", "fusion"):
            meta = {p.key: p.value for p in onnx.load(str(path / f"{part}.onnx")).metadata_props}
            assert meta["chx_graph"] == part and json.loads(meta[INTEGRITY_KEY]) == record
    capsys.readouterr()
    predictor = _load(fmt, path)
    assert len(predictor.class_names) == 14 and capsys.readouterr().err == ""


def _strip_records(fmt, path):
    """``path`` as an older chx wrote it: no integrity record anywhere."""
    if fmt == "bundle":
        _edit(fmt, path, lambda c: c.update(integrity=None))
        return
    _edit(fmt, path, lambda c: c.pop("integrity"))
    if fmt == "hf":
        from safetensors.torch import load_file, save_file

        save_file(load_file(path / "model.safetensors"), path / "model.safetensors", metadata={"format": "pt"})
    else:
        import onnx

        for part in ("backbone", "fusion"):
            model = onnx.load(str(path / f"{part}.onnx"))
            del model.metadata_props[:]
            onnx.save(model, str(path / f"{part}.onnx"))


@pytest.mark.parametrize("fmt", _formats())
def test_old_exports_load_with_a_warning_and_shapes_are_still_checked(exports, tmp_path, capsys, fmt):
    path = _copy(exports, fmt, tmp_path)
    _strip_records(fmt, path)
    capsys.readouterr()
    assert len(_load(fmt, path).class_names) == 14
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning:") and "export it again" in err

    # without the record, 15 names with a 15-class architecture are caught by the weights' shapes
    def fifteen(c):
        c["class_names"].append("Extra")
        if fmt != "bundle":
            for part in ("backbone", "fusion"):
                c["architecture"][part]["num_classes"] = 15
    _edit(fmt, path, fifteen)
    if fmt == "bundle":      # the bundle's architecture lives beside its weights
        b = torch.load(path, weights_only=True)
        for part in ("backbone", "fusion"):
            b[part]["model_config"]["num_classes"] = 15
        torch.save(b, path)
    _refused(fmt, path, str(path), *(["15 classes"] if fmt == "onnx" else ["do not fit"]))


@pytest.mark.skipif(not HAS_ONNX, reason="the onnx extra (pip install 'chx[onnx]')")
@pytest.mark.parametrize("case", ["fusion graph as backbone.onnx", "backbone graph as fusion.onnx",
                                  "fusion.onnx of another model", "backbone.onnx of another export",
                                  "both graphs of another model", "config.json of another model",
                                  "an old fusion graph as backbone.onnx"])
def test_onnx_graphs_are_bound_to_their_export(exports, tmp_path, case):
    path = _copy(exports, "onnx", tmp_path)
    other = exports / "other-model-onnx"
    words = {"fusion graph as backbone.onnx": ["backbone.onnx", "fusion graph"],
             "backbone graph as fusion.onnx": ["fusion.onnx", "backbone graph"],
             "an old fusion graph as backbone.onnx": ["backbone.onnx", "not a backbone graph"]
             }.get(case, ["another export"])
    if case == "fusion graph as backbone.onnx":
        shutil.copy(path / "fusion.onnx", path / "backbone.onnx")
    elif case == "backbone graph as fusion.onnx":
        shutil.copy(path / "backbone.onnx", path / "fusion.onnx")
    elif case == "fusion.onnx of another model":
        shutil.copy(other / "fusion.onnx", path / "fusion.onnx")
    elif case == "backbone.onnx of another export":
        shutil.copy(other / "backbone.onnx", path / "backbone.onnx")
    elif case == "both graphs of another model":
        for name in ("backbone.onnx", "fusion.onnx"):
            shutil.copy(other / name, path / name)
    elif case == "config.json of another model":
        shutil.copy(other / "config.json", path / "config.json")
    else:
        _strip_records("onnx", path)
        shutil.copy(path / "fusion.onnx", path / "backbone.onnx")
    _refused("onnx", path, *words)


@pytest.mark.parametrize("case", ["weights of another model", "config.json of another model",
                                  "weights without a record", "a weight changed"])
def test_hf_weights_are_bound_to_their_config(exports, tmp_path, case):
    from safetensors.torch import load_file, save_file

    path = _copy(exports, "hf", tmp_path)
    other = exports / "other-model-hf"
    weights = path / "model.safetensors"
    if case == "weights of another model":
        shutil.copy(other / "model.safetensors", weights)
        words = ["another export"]
    elif case == "config.json of another model":
        shutil.copy(other / "config.json", path / "config.json")
        words = ["another export"]
    elif case == "weights without a record":
        save_file(load_file(weights), weights, metadata={"format": "pt"})
        words = ["no integrity record"]
    else:
        from safetensors import safe_open

        with safe_open(weights, "pt") as f:
            metadata = f.metadata()
        tensors = load_file(weights)
        name = next(k for k in sorted(tensors) if k.startswith("fusion.") and tensors[k].is_floating_point())
        tensors[name] = tensors[name] + 1e-3
        save_file(tensors, weights, metadata=metadata)
        words = ["not the ones exported"]
    _refused("hf", path, str(path), *words)


def test_bundle_weights_are_checked_against_its_record(exports, tmp_path):
    path = _copy(exports, "bundle", tmp_path)
    b = torch.load(path, weights_only=True)
    name = next(k for k, t in b["backbone"]["state_dict"].items() if t.is_floating_point())
    b["backbone"]["state_dict"][name] = b["backbone"]["state_dict"][name].clone() * 2
    torch.save(b, path)
    _refused("bundle", path, "not the ones exported")
    b["integrity"] = {"version": 99}
    torch.save(b, path)
    _refused("bundle", path, "integrity record", "unreadable")


# ----------------------------------------------------------------------------------------- export

def _broken_checkpoints(tmp_path, covid_backbone, covid_models, case):
    """(backbone, fusion) checkpoints that must not be exported."""
    from chx.models import eval_weights, load_checkpoint, save_checkpoint

    b = load_checkpoint(covid_backbone, kind="backbone")
    f = load_checkpoint(covid_models["fusion"], kind="fusion")
    if case.startswith("duplicate"):
        names = list(b["class_names"])
        names[1] = names[0]
        b["class_names"], f["class_names"] = names, list(names)
    else:
        weights = eval_weights(f)
        name = sorted(k for k, t in weights.items() if t.is_floating_point())[3 if "inf" in case else 0]
        t = weights[name].clone()
        t.view(-1)[0] = float("inf") if "inf" in case else float("nan")
        for key in ("state_dict", "ema_state_dict"):
            if f.get(key):
                prefix = "module." if key == "ema_state_dict" else ""
                f[key][prefix + name] = t
    paths = []
    for kind, ckpt in (("backbone", b), ("fusion", f)):
        ckpt.pop("source", None)
        paths.append(save_checkpoint(ckpt, tmp_path / f"{kind}.pt"))
    return paths


@pytest.mark.parametrize("fmt", _formats())
@pytest.mark.parametrize("case", ["duplicate class names", "NaN in a fusion weight", "inf in a fusion weight"])
def test_export_refuses_duplicate_names_and_non_finite_weights(capsys, tmp_path, covid_backbone, covid_models,
                                                               fmt, case):
    backbone, fusion = _broken_checkpoints(tmp_path, covid_backbone, covid_models, case)
    out = tmp_path / "out" / OUT[fmt]
    code, _, err = run_chx(capsys, "export", "--backbone", backbone, "--fusion", fusion, "--format", fmt,
                           "-o", out)
    assert code == 2 and err.count("\n") == 1, err
    assert ("distinct" if case.startswith("duplicate") else "non-finite") in err
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def _disk_full(monkeypatch, fmt):
    """The first write of the export's weights fails as on a full disk."""
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if fmt == "bundle":    # torch.save reports a full disk as a RuntimeError of its zip writer
        def save(obj, f, *a, **k):
            f.write(b"PK\x03\x04" + b"\0" * 1000)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 587200 vs 587088")
        monkeypatch.setattr(torch, "save", save)
    elif fmt == "hf":
        from pathlib import Path

        def write_bytes(self, data):
            with open(self, "wb") as f:
                f.write(data[:100])
            raise enospc
        monkeypatch.setattr(Path, "write_bytes", write_bytes)
    else:                  # torch.onnx wraps the OSError of its writer
        def export(model, args, f, *a, **k):
            with open(f, "wb") as fh:
                fh.write(b"\0" * 100)
            raise RuntimeError("failed to save the ONNX model") from enospc
        monkeypatch.setattr(torch.onnx, "export", export)


@pytest.mark.parametrize("fmt", _formats())
@pytest.mark.parametrize("previous", [False, True])
def test_disk_full_during_export_is_one_line_and_leaves_nothing(capsys, tmp_path, monkeypatch, exports,
                                                                covid_backbone, covid_models, fmt, previous):
    out = tmp_path / OUT[fmt]
    if previous:        # an earlier export at -o stays as it was
        _copy(exports, fmt, tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    _disk_full(monkeypatch, fmt)
    args = ["--overwrite"] if previous else []
    code, _, err = run_chx(capsys, "export", "--backbone", covid_backbone, "--fusion", covid_models["fusion"],
                           "--format", fmt, "-o", out, *args)
    assert code == 2 and err.count("\n") == 1, err
    assert "could not write" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    if previous:
        monkeypatch.undo()
        assert len(_load(fmt, out).class_names) == 14


# --------------------------------------------------------------------------------- import-reference

@pytest.mark.parametrize("case", ["NaN in the stage-1 decoder", "inf in the stage-1 stem",
                                  "NaN in a fusion encoder layer", "inf in the fusion segment embedding"])
def test_import_reference_refuses_non_finite_weights(capsys, tmp_path, case):
    from test_reference_import import CLASSES, TINY, _reference_fusion, _reference_stage1

    fusion = "fusion" in case
    obj = _reference_fusion() if fusion else _reference_stage1("lightning")
    key = {"NaN in the stage-1 decoder": "backbone.head.decoder.layers.0.linear1.weight",
           "inf in the stage-1 stem": "backbone.model.stem.0.weight",
           "NaN in a fusion encoder layer": "backbone.transformer_encoder.layers.1.linear2.bias",
           "inf in the fusion segment embedding": "backbone.segment_embedding"}[case]
    obj["state_dict"][key].view(-1)[0] = float("nan") if "NaN" in case else float("inf")
    torch.save(obj, tmp_path / "ref.ckpt")
    out = tmp_path / "imported.pt"
    code, _, err = run_chx(capsys, "import-reference", tmp_path / "ref.ckpt", "--kind",
                           "fusion" if fusion else "backbone", "--classes", ",".join(CLASSES),
                           "--backbone", TINY, "-o", out)
    assert code == 2 and err.count("\n") == 1 and "non-finite" in err, err
    assert not out.exists()


# --------------------------------------------------------------------------------- the real CLI

def test_predict_on_a_tampered_export_exits_2_with_one_line(exports, tmp_path, capsys):
    image = shared_path("covid-cxr", "images", "000001-12.png")
    path = _copy(exports, "hf", tmp_path)
    _edit("hf", path, _swap)
    out = tmp_path / "p.csv"
    r = subprocess.run([sys.executable, "-m", "chx", "predict", "--bundle", str(path), "--files", str(image),
                        "-o", str(out)], capture_output=True, text=True, timeout=180, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "class_names" in r.stderr and "export the model again" in r.stderr
    assert not out.exists()

    if HAS_ONNX:    # the same through ONNX Runtime, in-process
        path = _copy(exports, "onnx", tmp_path)
        _edit("onnx", path, _swap)
        code, _, err = run_chx(capsys, "predict", "--bundle", path, "--runtime", "onnxruntime", "--files", image,
                               "-o", out)
        assert code == 2 and err.count("\n") == 1 and "class_names" in err, err
        assert not out.exists()
