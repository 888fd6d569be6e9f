"""`chx export`: a stage-1 and a fusion checkpoint (or a train-joint checkpoint) for `chx predict`
and for other tools, in one of three formats:

    bundle   one file (a chx checkpoint): both models' weights, classes, preprocessing.
    hf       a folder in the Hugging Face layout: model.safetensors (both models' weights),
             config.json (architecture, classes, preprocessing, features) and README.md, a model
             card generated from the runs (classes, training data, preprocessing, validation
             metrics, intended use and limitations, the commands that made it). No upload code:
             push the folder with your own tools.
    onnx     a folder with backbone.onnx and fusion.onnx (:mod:`chx.engine.onnx_runtime`) and the
             same config.json, for ONNX Runtime; checked against torch before it is written.

Every format is written whole or not at all (a temp name, then a rename); a full disk is one line.
Every format carries the sha256 of its class list, preprocessing, features and architecture, and an
export id over them and the weights, in its weights (:func:`chx.engine.predictor.integrity_record`);
every loader checks them. Duplicate class names and non-finite weights are not exported.

An ensemble bundle (`chx ensemble`) is exported as hf or onnx member by member
(:func:`export_ensemble`): an ensemble folder of the same layout whose members are hf or onnx
folders with the same names and weights. Its stage-1 members have neither format: refused.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from datetime import date
from pathlib import Path

import numpy as np
import torch

import chx
from chx.atomic import atomic_dir, json_text, output_lock, write_marker
from chx.config import OptionSpec, command_line
from chx.data.manifest import file_sha256, portable_path, read_manifest, summarize
from chx.data.transforms import Preprocess
from chx.data.views import VIEWS
from chx.engine.ensemble import ENSEMBLE_FILE, MEMBERS_DIR, ensemble_doc, is_ensemble, member_sha256, read_ensemble
from chx.engine.predictor import (FOLDER_CONFIG, FOLDER_WEIGHTS, INTEGRITY_KEY, Predictor, bundle_spec, folder_config,
                                  folder_tensors, integrity_record, joint_bundle, load_bundle_file, load_folder_bundle,
                                  make_bundle, require_finite_weights)
from chx.errors import ChxError
from chx.models import eval_weights, load_checkpoint, load_model, save_checkpoint, weights_hash
from chx.models.joint import joint_parts
from chx.pipeline.report import md_cell
from chx.store import precision_option

FORMATS = ("bundle", "hf", "onnx")
# The largest difference of probabilities between the ONNX graphs and torch that an export accepts.
ONNX_TOLERANCE = 1e-4


def bundle_of(backbone: Path | None, fusion: Path | None, joint: Path | None = None) -> dict:
    """The in-memory bundle of a stage-1 and a fusion checkpoint, or of a train-joint checkpoint."""
    for given in (backbone, fusion, joint):
        if is_ensemble(given):
            raise ChxError(f"{given} is an ensemble bundle: export it with --ensemble {given} --format hf or "
                           f"onnx, alone (as a bundle it already is one: copy the folder whole)")
    if [backbone is not None, fusion is not None, joint is not None] not in ([True, True, False],
                                                                            [False, False, True]):
        raise ChxError("give both --backbone and --fusion, or --joint (a train-joint checkpoint) alone")
    bundle = joint_bundle(joint) if joint is not None else make_bundle(backbone, fusion)
    return _sealed(bundle, str(joint or fusion))


def _sealed(bundle: dict, source: str) -> dict:
    """``bundle`` checked for export (distinct class names, valid preprocessing, class counts, finite
    weights), with its integrity record (checked by every loader: chx.engine.predictor)."""
    bundle_spec(bundle, source)
    require_finite_weights(bundle, source)
    bundle["integrity"] = integrity_record(bundle)
    return bundle


@contextlib.contextmanager
def _writing(out: Path, torch_writer: bool = False):
    """A failed write of the export (a full disk, permissions) as one line; the atomic helpers
    have removed what was half-written. ``torch_writer``: torch.save reports a full disk as a
    RuntimeError of its zip writer."""
    try:
        yield
    except OSError as e:
        raise ChxError(f"could not write {out}: {e.strerror or e}; nothing was written (free some space or "
                       f"choose another output)") from None
    except RuntimeError as e:
        if not torch_writer:
            raise
        try:
            free = f"{shutil.disk_usage(out.parent).free / 2**20:,.1f} MiB free there"
        except OSError:
            free = "its folder cannot be read"
        raise ChxError(f"could not write {out} ({free}: is the disk full? {str(e).splitlines()[0][:120]}); "
                       f"nothing was written (free some space or choose another output)") from None


def export_bundle(backbone: Path | None, fusion: Path | None, out: Path, joint: Path | None = None) -> dict:
    """Bundle a stage-1 and a fusion checkpoint, or a train-joint checkpoint (which holds both),
    into one file for `chx predict`."""
    bundle = bundle_of(backbone, fusion, joint)
    with _writing(out, torch_writer=True):
        save_checkpoint(bundle, out)
    return bundle


def export_hf(backbone: Path | None, fusion: Path | None, out: Path, specs: dict[str, list[OptionSpec]],
              joint: Path | None = None) -> dict:
    """Write the Hugging Face folder ``out``; ``specs``: each command's options (to write the
    commands that made the model into its card). Returns the bundle."""
    bundle = bundle_of(backbone, fusion, joint)
    with _writing(out), atomic_dir(out, "export-hf") as tmp:
        write_hf(bundle, tmp, model_card(bundle, out, specs))
    return bundle


def write_hf(bundle: dict, folder: Path, card: str) -> None:
    """The files of the Hugging Face folder of ``bundle`` (sealed: :func:`bundle_of`) into ``folder``:
    model.safetensors, config.json and the model card ``card`` as README.md."""
    from safetensors.torch import save

    # bytes, then a plain write: the file gets the umask's permissions like every other output;
    # the integrity record (sha256 of the spec in config.json, export id) rides in the weights
    metadata = {"format": "pt", INTEGRITY_KEY: json.dumps(bundle["integrity"])}
    (folder / FOLDER_WEIGHTS).write_bytes(save(folder_tensors(bundle), metadata=metadata))
    (folder / FOLDER_CONFIG).write_text(_config_text(folder_config(bundle)))
    (folder / "README.md").write_text(card)


def export_onnx(backbone: Path | None, fusion: Path | None, out: Path, joint: Path | None = None) -> dict:
    """Write the ONNX folder ``out`` after checking its graphs against torch on random images with
    1 to max-views views; returns ``{"bundle", "max_abs_diff"}`` (the largest probability
    difference seen)."""
    bundle = bundle_of(backbone, fusion, joint)
    with _writing(out), atomic_dir(out, "export-onnx") as tmp:
        diff = write_onnx(bundle, tmp, str(joint or fusion))
    return {"bundle": bundle, "max_abs_diff": diff}


def write_onnx(bundle: dict, folder: Path, source: str) -> float:
    """backbone.onnx, fusion.onnx and config.json of ``bundle`` (sealed) into ``folder``, checked
    against torch; returns the largest probability difference seen (above ONNX_TOLERANCE: one line)."""
    from chx.engine.onnx_runtime import GRAPHS, OnnxPredictor, export_graphs

    models = {part: load_model({**bundle[part], "source": source}, kind=part) for part in ("backbone", "fusion")}
    pre = Preprocess.from_dict(bundle["backbone"]["preprocess"])
    export_graphs(models["backbone"], models["fusion"], bundle["features"]["pool"], pre.size, folder,
                  metadata={INTEGRITY_KEY: json.dumps(bundle["integrity"])})
    config = {**folder_config(bundle), "onnx": GRAPHS}
    (folder / FOLDER_CONFIG).write_text(_config_text(config))
    torch_predictor = Predictor(models["backbone"], models["fusion"], pre, bundle["features"]["pool"],
                                bundle["features"]["flip_tta"], list(bundle["class_names"]), torch.device("cpu"))
    diff = _max_difference(torch_predictor, OnnxPredictor.load(folder), folder)
    if not diff <= ONNX_TOLERANCE:
        raise ChxError(f"the exported ONNX graphs give probabilities up to {diff:.2g} away from torch's "
                       f"(more than {ONNX_TOLERANCE:g}); nothing was written: use --format hf (or bundle, for "
                       f"one model)")
    return diff


# ------------------------------------------------------------------------------------------- ensembles

def require_ensemble_alone(fmt: str, backbone: Path | None = None, fusion: Path | None = None,
                           joint: Path | None = None) -> None:
    """--ensemble goes alone (no --backbone, --fusion, --joint) and with --format hf or onnx: one line."""
    if backbone is not None or fusion is not None or joint is not None:
        raise ChxError("--ensemble exports every member of an ensemble bundle: give it alone, without --backbone, "
                       "--fusion or --joint")
    if fmt == "bundle":
        raise ChxError("--ensemble with --format bundle: the ensemble folder already is a bundle (predict and "
                       "evaluate take it): copy the folder whole, or give --format hf or onnx")


def require_bundle_member(member: dict) -> None:
    """One line for a member of an ensemble that has no hf or onnx form: a stage-1 checkpoint, an ONNX export."""
    name = member.get("name")
    if member.get("kind") == "backbone":
        raise ChxError(f"ensemble member {name!r} is a stage-1 checkpoint, which has no hf or onnx format (they hold "
                       f"stage 1 + fusion): make the ensemble without it, or with its bundle (`chx export --backbone "
                       f"IT --fusion F`), and export that")
    if member.get("kind") != "bundle":
        raise ChxError(f"ensemble member {name!r} is an ONNX export already: export the ensemble it was exported "
                       f"from")


def member_bundle(path: Path) -> dict:
    """The bundle in memory of an ensemble member of kind ``bundle`` (an hf folder, a bundle file or a
    train-joint checkpoint), checked as its loader checks it."""
    if path.is_dir():
        return load_folder_bundle(path)
    if load_checkpoint(path).get("kind") == "joint":
        return joint_bundle(path)
    return load_bundle_file(path)


def export_ensemble(ensemble: Path, fmt: str, out: Path, specs: dict[str, list[OptionSpec]] | None = None) -> dict:
    """Write the ensemble bundle ``out`` of the members of the ensemble bundle ``ensemble``, each
    exported in ``fmt`` (hf: :func:`write_hf`; onnx: :func:`write_onnx`, checked against torch), with
    the same names, weights and classes; a member without that format is refused before anything is
    written. ``specs`` (hf): each command's options, for the members' model cards. Returns
    ``{"doc": ensemble.json's content, "max_abs_diff": the largest ONNX difference seen (onnx)}``."""
    require_ensemble_alone(fmt)
    ensemble, out = Path(ensemble), Path(out)
    if not is_ensemble(ensemble):
        raise ChxError(f"--ensemble {ensemble} is not an ensemble bundle (a folder with {ENSEMBLE_FILE}): make one "
                       f"with `chx ensemble`")
    doc = read_ensemble(ensemble)
    for m in doc["members"]:
        require_bundle_member(m)
    records, diffs = [], []
    with _writing(out), output_lock(out, "ensemble"), atomic_dir(out, "ensemble") as tmp:
        for m in doc["members"]:
            source = ensemble / m["path"]
            dest = tmp / MEMBERS_DIR / (source.stem if source.is_file() else source.name)
            dest.mkdir(parents=True)
            try:
                bundle = _sealed(member_bundle(source), str(source))
                if fmt == "hf":
                    write_hf(bundle, dest, _member_card(bundle, source, out / MEMBERS_DIR / dest.name, ensemble,
                                                        specs))
                else:
                    diffs.append(write_onnx(bundle, dest, str(source)))
            except ChxError as e:
                raise ChxError(f"ensemble member {m['name']!r}: {e}") from None
            write_marker(dest, f"export-{fmt}", [p.name for p in dest.iterdir()])   # as export_hf/onnx's folder
            records.append({"name": m["name"], "path": dest.relative_to(tmp).as_posix(),
                            "kind": "onnx" if fmt == "onnx" else "bundle", "weight": m["weight"],
                            "sha256": member_sha256(dest)})
        written = ensemble_doc(doc["class_names"], records)
        (tmp / ENSEMBLE_FILE).write_text(json_text(written, indent=1) + "\n")
    return {"doc": written, "max_abs_diff": max(diffs) if diffs else None}


def _member_card(bundle: dict, source: Path, final: Path, ensemble: Path, specs: dict[str, list[OptionSpec]]) -> str:
    """The model card of an ensemble's member exported to ``final``: an hf member's own card (the same
    weights), else one generated from its runs."""
    if (source / "README.md").is_file():
        return (source / "README.md").read_text()
    export = {"ensemble": _shown(ensemble, final), "fmt": "hf", "out": final.parent.parent.name}
    return model_card(bundle, final, specs, export=export)


def _config_text(config: dict) -> str:
    """config.json: valid JSON; a non-finite number in the models' settings means broken checkpoints."""
    try:
        return json.dumps(config, indent=2, allow_nan=False) + "\n"
    except ValueError:
        raise ChxError("the models' settings (preprocessing, features) hold a non-finite number (NaN or "
                       "infinity): the checkpoints are damaged; nothing was written") from None


def _max_difference(torch_predictor, onnx_predictor, folder: Path) -> float:
    """The largest |torch - onnxruntime| probability over studies of 1 .. max-views random images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    size = torch_predictor.pre.size
    paths = []
    for i in range(onnx_predictor.max_views):
        paths.append(folder / f".check-{i}.png")
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(paths[-1])
    diff = 0.0
    for v in range(1, len(paths) + 1):
        # OTHER, LL, LATERAL, AP, ...: from 3 views on every view type (their embeddings, experts)
        args = (paths[:v], [VIEWS[::-1][k % len(VIEWS)] for k in range(v)], [f"i{k}" for k in range(v)])
        gap = np.abs(torch_predictor.predict_study(*args) - onnx_predictor.predict_study(*args)).max()
        diff = max(diff, float(gap))
    for p in paths:
        p.unlink()
    return diff


# ----------------------------------------------------------------------------------------- model card

def _runs(bundle: dict) -> list[tuple[str, Path, dict]]:
    """(kind, checkpoint path, checkpoint) of each run that made the bundle, in training order; none
    for a bundle read from an export folder. A recorded path that no longer holds the checkpoint
    whose weights the bundle carries (gone, replaced, relative to another folder: an ensemble's
    member exported later) is left out, so that a card never describes another model."""
    runs = []
    for kind, path in (bundle.get("sources") or {}).items():
        try:
            ckpt = load_checkpoint(path, kind=kind)
        except ChxError:
            continue
        weights = eval_weights(ckpt)
        part = joint_parts(ckpt, weights)["backbone"]["state_dict"] if kind == "joint" else weights
        if weights_hash(part) == weights_hash(bundle["backbone" if kind == "joint" else kind]["state_dict"]):
            runs.append((kind, Path(path), ckpt))
    return runs


def _shown(path, out: Path, keep: int = 1) -> str:
    """A path as the model card shows it: relative to the folder holding the export folder, never
    absolute (:func:`~chx.data.manifest.portable_path`; ``keep=2`` for a checkpoint: its run
    folder and name)."""
    return portable_path(path, Path(out).parent, keep=keep)


def _val_record(ckpt_path: Path, ckpt: dict, out: Path = Path("export")) -> tuple[dict | None, str]:
    """The validation record of the checkpoint's step in its run's metrics.jsonl, and where it came
    from (the checkpoint's own copy when metrics.jsonl is not beside it)."""
    metrics = ckpt_path.parent / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        vals = [r for r in records if r.get("kind") == "val" and r.get("step") == ckpt.get("step")]
        if vals:
            return vals[-1], f"{_shown(metrics, out, 2)} (step {ckpt.get('step')})"
    if ckpt.get("metrics"):
        return ckpt["metrics"], f"{_shown(ckpt_path, out, 2)} (its metrics.jsonl was not found)"
    return None, "no validation (the run had no validation split)"


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.4f}"


def _manifest_lines(ckpt: dict) -> list[str]:
    """The training manifests' summary: images, studies, patients, multi-view studies, splits."""
    recorded = ckpt.get("manifest_sha256") or {}
    lines = []
    for path, sha in recorded.items():
        p = Path(path)
        if not p.is_file():
            lines.append(f"- `{p.name}`: not found at export time (sha256 `{sha[:16]}...` recorded)")
            continue
        s = summarize(read_manifest(p, soft=True))
        changed = "" if file_sha256(p) == sha else " (**changed since training**: counts are of the file now)"
        splits = ", ".join(f"{'unassigned' if k == 'None' else k} {v:,}" for k, v in s["splits"].items())
        lines.append(f"- `{p.name}`{changed}: {s['images']:,} images, {s['studies']:,} studies "
                     f"({s['multi_view_studies']:,} with several views), {s['subjects']:,} patients; "
                     f"images per split: {splits}")
    return lines or ["- not recorded in the checkpoint"]


# Why a model card shows no runs (:func:`_runs`).
NO_RUNS = "the checkpoints the model was exported from are not where its bundle recorded them"

# The options of train-* that hold paths: the model card shows them without the training machine's
# folders (:func:`_shown`).
PATH_OPTIONS = frozenset({"manifests", "manifest", "images", "store", "backbone", "fusion", "weights", "out"})


def _commands(runs, out: Path, specs: dict[str, list[OptionSpec]], export: dict | None = None) -> list[str]:
    """The chx commands that made the model, from what each checkpoint recorded; ``export``: the
    export command's options (default: the checkpoints, --format hf, -o ``out``)."""
    lines = []
    ckpts = dict((kind, (path, ckpt)) for kind, path, ckpt in runs)
    train = {"backbone": "train-backbone", "fusion": "train-fusion", "joint": "train-joint"}
    for kind, path, ckpt in runs:
        if kind == "fusion" and "backbone" in ckpts:
            fp = ckpt.get("store_fingerprint") or {}
            lines.append("# the store does not record the manifest and images it was extracted from")
            store = (ckpt.get("options") or {}).get("store")
            lines.append(command_line("extract-features", {
                "checkpoint": _shown(ckpts["backbone"][0], out, 2), "manifest": "MANIFEST", "images": "IMAGES",
                "store": store and _shown(store, out), "pool": fp.get("pool"),
                "flip": fp.get("flip"), "dtype": fp.get("dtype"),
                "precision": precision_option(fp.get("precision"))},
                specs["extract-features"]))
        if "train_config" not in ckpt:   # e.g. converted by `chx import-reference`: no chx run made it
            lines.append(f"# {_shown(path, out, 2)}: not trained by chx (no options recorded)")
            continue
        values = {**ckpt["train_config"], **(ckpt.get("options") or {}), "out": str(path.parent)}
        values = {k: ([_shown(p, out) for p in v] if isinstance(v, list)
                      else _shown(v, out, 2 if k in ("backbone", "fusion") else 1))
                  if k in PATH_OPTIONS and v else v for k, v in values.items()}
        lines.append(command_line(train[kind], values, specs[train[kind]]))
    export = export or {**{k: _shown(p, out, 2) for k, (p, _) in ckpts.items()}, "fmt": "hf", "out": out.name}
    lines.append(command_line("export", export, specs["export"]))
    return lines


def model_card(bundle: dict, out: Path, specs: dict[str, list[OptionSpec]], export: dict | None = None) -> str:
    """README.md of the Hugging Face folder ``out`` (YAML front matter, then Markdown); ``export``: the
    export command's options when they are not the checkpoints' (:func:`_commands`)."""
    runs = _runs(bundle)
    # the fusion (or joint) model: the study's output (no run at hand: what the bundle itself holds;
    # a stage-1 run alone scored images, not studies)
    final_kind, final_path, final = runs[-1] if runs and runs[-1][0] != "backbone" else ("fusion", None, {})
    classes = list(bundle["class_names"])
    pre = bundle["backbone"]["preprocess"]
    features = bundle["features"]
    fusion_cfg = bundle["fusion"]["model_config"]
    val, val_source = (_val_record(final_path, final, out) if final_path is not None
                       else (None, f"not at hand: {NO_RUNS}"))
    per_class = (val or {}).get("per_class") or (final.get("metrics") or {}).get("per_class") or {}
    counts = final.get("train_counts") or [None] * len(classes)
    backbone_name = bundle["backbone"]["model_config"]["backbone_name"]

    lines = ["---", "library_name: chx", "pipeline_tag: image-classification",
             "tags: [chest-x-ray, multi-label, multi-view, chexfusion, medical-imaging]", "---", "",
             f"# {backbone_name} + CheXFusion fusion: {len(classes)} findings per chest X-ray study", "",
             f"A study-level, multi-label chest X-ray classifier trained with "
             f"[chx](https://pypi.org/project/chx/) {chx.__version__}: a {backbone_name} backbone with an "
             f"ML-Decoder head (stage 1), whose feature maps of up to {fusion_cfg['max_views']} views of a study "
             f"are fused by a transformer ({fusion_cfg['layers']} encoder layers, width {fusion_cfg['dim']}). "
             f"Output: one probability per finding and study. Exported on {date.today().isoformat()}.", "",
             "```bash", f"chx predict --bundle {out.name} --files frontal.png lateral.png -o predictions.csv", "```",
             "", "## Classes", "",
             f"Validation per class: {val_source}. Training positives: "
             f"{'images' if final_kind == 'backbone' else 'studies'} of the {final_kind} run's training split.", "",
             "| # | class | training positives | validation positives | AP | AUROC |", "|---|---|---|---|---|---|"]
    for i, c in enumerate(classes):
        pc = per_class.get(c) or {}
        lines.append(f"| {i} | {md_cell(c)} | {counts[i] if counts[i] is not None else 'n/a'} | "
                     f"{pc.get('support', 'n/a')} | {_fmt(pc.get('ap'))} | {_fmt(pc.get('auc'))} |")

    lines += ["", "## Training data", "", *([] if runs else [f"Not at hand: {NO_RUNS}.", ""])]
    for kind, path, ckpt in runs:
        if ckpt.get("manifest_sha256"):
            lines += [f"Manifests of the {kind} run (`{_shown(path, out, 2)}`):", "", *_manifest_lines(ckpt), ""]
        if kind == "fusion":
            store = (ckpt.get("options") or {}).get("store")
            lines += [f"The fusion model was trained from the feature store `{store and _shown(store, out)}` "
                      f"of that backbone.", ""]

    resize = "aspect ratio kept, padded with black" if pre["mode"] == "letterbox" else "stretched"
    pool = f", average-pooled {features['pool']} x {features['pool']}" if features["pool"] > 1 else ""
    tta = ("the mean of the probabilities of the images and of their horizontal flips"
           if features["flip_tta"] else "off")
    lines += ["## Preprocessing", "",
              f"- each image: decoded to grayscale in [0, 1] (PNG, JPEG or DICOM), resized to {pre['size']} x "
              f"{pre['size']} px by {pre['mode']} ({resize}), one channel, normalised as "
              f"(x - {pre['mean']}) / {pre['std']};",
              f"- the backbone's last-stage map{pool}, rounded to float16 (as the feature store holds it);",
              f"- views: at most {fusion_cfg['max_views']} per study, frontal first, then lateral, then "
              f"others (then by image id);",
              f"- flip TTA: {tta}.",
              "", "config.json holds these settings; `chx predict` applies them.", "",
              "## Validation metrics", ""]
    lines += (["| run | source | images/studies | mAP | mAUC | mAP head | mAP medium | mAP tail | class-prior mAP |",
               "|---|---|---|---|---|---|---|---|---|"] if runs else [f"Not at hand: {NO_RUNS}."])
    for kind, path, ckpt in runs:
        record, source = _val_record(path, ckpt, out)
        r = record or {}
        lines.append(f"| {kind} | {source} | {r.get('n', 'n/a')} | {_fmt(r.get('mAP'))} | {_fmt(r.get('mAUC'))} | "
                     f"{_fmt(r.get('mAP_head'))} | {_fmt(r.get('mAP_medium'))} | {_fmt(r.get('mAP_tail'))} | "
                     f"{_fmt(r.get('baseline_mAP'))} |")
    lines += ["", "Macro means skip classes without a validation positive. The backbone is scored per image, "
              "the fusion model per study. These are validation figures of the checkpoint chosen on them "
              "(best mAP): expect lower on held-out data.", "",
              "## Intended use", "",
              "Research on chest X-ray classification: benchmarking, method development, and triage or "
              "second-reader studies under a research protocol with clinical oversight.", "",
              "## Limitations", "",
              "- **Not a medical device.** Not cleared or approved for diagnosis or patient care; do not use "
              "its output for clinical decisions.",
              "- Trained on the data above only: performance on other hospitals, scanners, populations or "
              "view conventions is unknown until measured there; labels mined from reports are noisy.",
              "- Rare findings (few training positives) are the least reliable; probabilities are not "
              "calibrated for other prevalences.",
              "- Expects chest radiographs (frontal and/or lateral); other images get meaningless scores.", "",
              "## How it was made", "",
              f"With chx {chx.__version__}; options at their default are left out. Each run folder's "
              f"config.json holds every option, and `--config RUN/config.json` repeats the run.", "",
              "```bash", *_commands(runs, out, specs, export), "```", ""]
    return "\n".join(lines)
