"""Ensembles: several models' study probabilities averaged (`chx ensemble`; predict and evaluate).

An ensemble bundle is a folder: ``ensemble.json`` (format, class names, members with their kind,
weight and sha256, an integrity record) and ``members/``, a copy of every member, so the folder is
self-contained. A member is anything that predicts a study from its image files:

    bundle    a bundle file or hf folder of `chx export` (stage 1 + fusion), or a train-joint
              checkpoint: :class:`~chx.engine.predictor.Predictor`, its views and flip TTA;
    backbone  a stage-1 checkpoint: each image's probabilities (hflip TTA as trained), averaged
              over the study's images (the ``mean`` of :mod:`chx.pipeline.aggregate`);
    onnx      an ONNX folder of `chx export --ensemble ENS --format onnx` (every member of such an
              ensemble): :class:`~chx.engine.onnx_runtime.OnnxPredictor`, under --runtime onnxruntime.

Members may differ in backbone, input size and store; they must predict the same classes in the
same order (:func:`chx.engine.compat.require_same_classes`). The ensemble's probabilities are the
members' weighted mean (weights positive, normalised; equal by default). On load every member file
is hashed against the record (a replaced or edited member is one line) and the record against
ensemble.json's members, weights and classes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from chx.data.image_cache import ImageCache, open_image_cache, rebuild_hint
from chx.data.manifest import file_sha256
from chx.data.transforms import Preprocess
from chx.engine.compat import require_same_classes
from chx.engine.distributed import resolve_device
from chx.engine.inference import predict_images
from chx.engine.predictor import (ImageFiles, Predictor, bundle_spec, integrity_record, make_bundle, read_folder_config,
                                  require_finite_weights)
from chx.errors import ChxError
from chx.models import load_checkpoint, load_model

ENSEMBLE_FORMAT = "chx-ensemble-1"
ENSEMBLE_FILE = "ensemble.json"
MEMBERS_DIR = "members"
INTEGRITY_VERSION = 1
MEMBER_KINDS = ("bundle", "backbone", "onnx")


def is_ensemble(path) -> bool:
    """Whether ``path`` is an ensemble bundle folder (it holds ensemble.json)."""
    return path is not None and Path(path).is_dir() and (Path(path) / ENSEMBLE_FILE).is_file()


def member_kind(path: Path) -> tuple[str, list[str]]:
    """(kind, class names) of a would-be member: ``bundle`` (an export file or hf folder, or a
    train-joint checkpoint) or ``backbone`` (a stage-1 checkpoint); anything else is one line."""
    path = Path(path)
    if is_ensemble(path):
        raise ChxError(f"{path} is itself an ensemble: give its members (or the bundles it was made of)")
    if path.is_dir():
        return "bundle", list(read_folder_config(path)["class_names"])
    if not path.exists():
        raise ChxError(f"ensemble member {path} does not exist")
    ckpt = load_checkpoint(path)
    kind = ckpt.get("kind")
    if kind == "fusion":
        raise ChxError(f"{path} is a fusion checkpoint: it predicts from its backbone's features; export it "
                       f"with that backbone (`chx export --backbone B --fusion {path}`) and give the bundle")
    if kind not in ("bundle", "joint", "backbone"):
        raise ChxError(f"{path} is a {kind} checkpoint; an ensemble member is a bundle or hf folder of `chx "
                       f"export`, a train-joint checkpoint or a stage-1 checkpoint")
    return ("backbone" if kind == "backbone" else "bundle"), list(ckpt["class_names"])


def require_member_classes(classes: list[str], want: list[str], member: str, first: str) -> None:
    """One line naming ``member`` and the classes in which it differs from the ensemble's (``first``'s)."""
    extra = [c for c in classes if c not in want]
    missing = [c for c in want if c not in classes]
    which = "; ".join(part for part in (f"only it has {', '.join(map(repr, extra))}" if extra else "",
                                        f"it lacks {', '.join(map(repr, missing))}" if missing else "") if part)
    require_same_classes(classes, want, f"the ensemble ({first})", f"ensemble member {member}",
                         fix=(which + "; " if which else "the same classes in another order; ")
                         + "every member must predict the same classes in the same order")


def parse_weights(text: str | None, n: int) -> list[float]:
    """``--weights 2,1,1``: one positive number per member, normalised to sum 1 (None: equal)."""
    if text is None:
        return [1.0 / n] * n
    items = [t.strip() for t in str(text).split(",")]
    try:
        values = [float(t) for t in items]
    except ValueError:
        raise ChxError(f"--weights {text}: give numbers separated by commas, one per member (e.g. 2,1,1)") from None
    if len(values) != n:
        raise ChxError(f"--weights {text}: {len(values)} weight(s) for {n} member(s); give one per member, in "
                       f"the members' order")
    if not all(np.isfinite(v) and v > 0 for v in values):
        raise ChxError(f"--weights {text}: every weight must be a positive finite number")
    total = sum(values)
    return [v / total for v in values]


def sealed_bundle(backbone: Path, fusion: Path) -> dict:
    """The bundle of a stage-1 and a fusion checkpoint with its integrity record, as `chx export` writes it."""
    bundle = make_bundle(backbone, fusion)
    bundle_spec(bundle, str(fusion))
    require_finite_weights(bundle, str(fusion))
    bundle["integrity"] = integrity_record(bundle)
    return bundle


# ----------------------------------------------------------------------------------------- the record

def member_sha256(path: Path) -> str:
    """sha256 of a member: a file's bytes; a folder's files (relative names and their sha256, sorted)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    lines = sorted(f"{p.relative_to(path).as_posix()}:{file_sha256(p)}" for p in path.rglob("*") if p.is_file())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _sha256_json(obj) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def ensemble_record(class_names: list[str], members: list[dict]) -> dict:
    """The integrity record of an ensemble: sha256 of its classes and its members (name, path,
    kind, weight, each member's sha256)."""
    spec = {"class_names": list(class_names), "members": [dict(m) for m in members]}
    return {"version": INTEGRITY_VERSION, "spec_sha256": _sha256_json(spec)}


def ensemble_doc(class_names: list[str], members: list[dict]) -> dict:
    """ensemble.json's content."""
    return {"format": ENSEMBLE_FORMAT, "library_name": "chx", "combine": "weighted mean of probabilities",
            "class_names": list(class_names), "members": members,
            "integrity": ensemble_record(class_names, members)}


def read_ensemble(folder: Path) -> dict:
    """ensemble.json of ``folder``, checked: format, classes, members inside the folder, weights,
    the integrity record, every member's sha256."""
    folder = Path(folder)
    path = folder / ENSEMBLE_FILE
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise ChxError(f"{path} is not valid JSON; make the ensemble again with `chx ensemble`") from None
    if not isinstance(doc, dict) or doc.get("format") != ENSEMBLE_FORMAT:
        raise ChxError(f"{path} is not a chx ensemble (expected format {ENSEMBLE_FORMAT}); make it with "
                       f"`chx ensemble`")
    members, classes = doc.get("members"), doc.get("class_names")
    if (not isinstance(members, list) or not members or not all(isinstance(m, dict) for m in members)
            or not isinstance(classes, list) or not classes):
        raise ChxError(f"{path} lacks its members or classes; it was edited or is damaged: make it again")
    record = doc.get("integrity") or {}
    try:
        want = ensemble_record(classes, members)
    except (TypeError, ValueError):
        raise ChxError(f"{path} holds values that are not plain JSON; make the ensemble again") from None
    if record.get("spec_sha256") != want["spec_sha256"]:
        raise ChxError(f"{path}: its members, weights or classes do not match the sha256 recorded when it was "
                       f"made; it was edited: make the ensemble again with `chx ensemble`")
    for m in members:
        rel = Path(str(m.get("path", "")))
        if rel.is_absolute() or ".." in rel.parts or not rel.parts or m.get("kind") not in MEMBER_KINDS:
            raise ChxError(f"{path}: member {m.get('name')!r} has no valid path or kind; make it again")
        if not (folder / rel).exists():
            raise ChxError(f"{folder}: member {m.get('name')!r} is missing ({rel}); copy the whole ensemble "
                           f"folder or make it again")
        if member_sha256(folder / rel) != m.get("sha256"):
            raise ChxError(f"{folder}: member {m.get('name')!r} ({rel}) is not the file the ensemble was made "
                           f"of (its sha256 differs); it was replaced or damaged: make the ensemble again")
    return doc


# ------------------------------------------------------------------------------------------ predictors

@dataclass
class StageOnePredictor:
    """A stage-1 model on studies: every image's probabilities (hflip TTA as trained), averaged over
    the study's images."""
    model: torch.nn.Module
    pre: Preprocess
    tta: bool
    class_names: list[str]
    device: torch.device
    cache: ImageCache | None = None    # --images-cache (use_images_cache)

    def use_images_cache(self, path: str | None) -> list[str]:
        """Read the images from the image cache ``path`` by image id (see :meth:`Predictor.use_images_cache`)."""
        self.cache = open_image_cache(path, self.pre)
        return []

    @classmethod
    def load(cls, checkpoint: Path, device: str = "auto") -> "StageOnePredictor":
        ckpt = load_checkpoint(checkpoint, kind="backbone")
        dev = resolve_device(device)
        return cls(load_model(ckpt, kind="backbone").to(dev), Preprocess.from_dict(ckpt["preprocess"]),
                   bool(ckpt.get("tta", True)), list(ckpt["class_names"]), dev)

    @torch.no_grad()
    def predict_studies(self, studies, batch_size: int = 16, workers: int = 2,
                        show_progress: bool = True) -> np.ndarray:
        files = [Path(f) for paths, _, _ in studies for f in paths]
        ids = [i for _, _, image_ids in studies for i in image_ids]
        probs = predict_images(self.model, ImageFiles(files, self.pre, self.cache, ids), batch_size=batch_size,
                               workers=workers if len(files) > batch_size else 0, device=self.device,
                               tta=self.tta, desc="predict stage 1", show_progress=show_progress)
        ends = np.cumsum([len(s[0]) for s in studies])
        out = np.zeros((len(studies), len(self.class_names)), np.float32)
        for s, (start, end) in enumerate(zip(np.concatenate([[0], ends[:-1]]), ends)):
            if end > start:
                out[s] = probs[start:end].mean(0)
        return out


def load_member(path: Path, kind: str, device: str = "auto"):
    """The predictor of one member (``kind`` as :func:`member_kind` gives it, or ``onnx``: on the CPU)."""
    if kind == "backbone":
        return StageOnePredictor.load(path, device)
    if kind == "onnx":
        from chx.engine.onnx_runtime import OnnxPredictor

        return OnnxPredictor.load(path)
    if Path(path).is_file() and load_checkpoint(path).get("kind") == "joint":
        return Predictor.load(joint=path, device=device)
    return Predictor.load(Path(path), device=device)


def require_runtime(doc: dict, folder: Path, runtime: str) -> None:
    """One line when the ensemble's members do not run on ``runtime`` (ONNX members: onnxruntime only)."""
    onnx = [m.get("kind") == "onnx" for m in doc["members"]]
    if runtime == "torch" and any(onnx):
        raise ChxError(f"{folder} is an ensemble of ONNX exports: run it with --runtime onnxruntime (`chx predict "
                       f"--bundle {folder} --runtime onnxruntime`), or use the ensemble it was exported from")
    if runtime != "torch" and not all(onnx):
        raise ChxError(f"{folder} is an ensemble of torch models: use --runtime torch, or export it with `chx export "
                       f"--ensemble {folder} --format onnx` for --runtime onnxruntime")


@dataclass
class EnsemblePredictor:
    """Members' study probabilities and their weighted mean (what `chx predict` writes)."""
    members: list
    names: list[str]
    weights: np.ndarray
    class_names: list[str]
    source: str

    @classmethod
    def load(cls, folder: Path, device: str = "auto", runtime: str = "torch") -> "EnsemblePredictor":
        """The ensemble ``folder``; ``runtime`` onnxruntime for one of ONNX members, torch otherwise."""
        doc = read_ensemble(folder)
        require_runtime(doc, folder, runtime)
        classes = list(doc["class_names"])
        weights = np.array([float(m.get("weight", 0)) for m in doc["members"]], np.float64)
        if not (np.all(np.isfinite(weights)) and np.all(weights > 0) and abs(weights.sum() - 1) < 1e-6):
            raise ChxError(f"{folder}: the member weights must be positive and sum to 1; make the ensemble again")
        members = []
        for m in doc["members"]:
            p = load_member(Path(folder) / m["path"], m["kind"], device)
            require_member_classes(list(p.class_names), classes, m["name"], str(folder))
            members.append(p)
        return cls(members, [str(m["name"]) for m in doc["members"]], weights, classes, str(folder))

    def use_images_cache(self, path: str | None) -> list[str]:
        """Members whose preprocessing the image cache ``path`` holds read their images from it; the
        others read the files. Returns those others ("name (size px mode)"); one line when the cache
        serves no member (it was made at another size or resize mode)."""
        for m in self.members:
            m.cache = None
        if path is None:
            return []
        cache = ImageCache(path, None)
        served = [cache.serves(m.pre) for m in self.members]
        if not any(served):
            sizes = ", ".join(sorted({f"{m.pre.size} px {m.pre.mode}" for m in self.members}))
            raise ChxError(f"image cache {path} holds {cache.size} px {cache.mode} images but no member of the "
                           f"ensemble {self.source} preprocesses so ({sizes}); rebuild it with "
                           f"{rebuild_hint(path, self.members[0].pre)}")
        for m, ok in zip(self.members, served):
            m.cache = cache if ok else None
        return [f"{name} ({m.pre.size} px {m.pre.mode})" for name, m, ok in zip(self.names, self.members, served)
                if not ok]

    @classmethod
    def on_manifest(cls, folder: Path, manifest: Path | None, images: Path | None, images_cache: str | None,
                    split: str, device: str = "auto") -> tuple["EnsemblePredictor", pl.DataFrame, Path | None]:
        """(the ensemble ``folder``, the manifest it is scored on, its images root: ``images``, else
        the one the manifest records unless an image cache is given) for evaluate and compare,
        checked: the same classes, ``split`` present, images at hand (a root, a cache, or both)."""
        from chx.data.manifest import class_columns, images_root, read_manifest
        from chx.engine.predictor import use_images_cache

        if not is_ensemble(folder):
            raise ChxError(f"{folder} is not an ensemble bundle (a folder with {ENSEMBLE_FILE}, made by `chx "
                           f"ensemble`)")
        if manifest is None:
            raise ChxError("an ensemble is scored per study on images: give --manifest and --images (or "
                           "--images-cache)")
        if images is None and images_cache is None:
            images = images_root(manifest)    # one line: the manifest records no root, or it is gone
        df = read_manifest(manifest)
        ens = cls.load(folder, device=device)
        use_images_cache(ens, images_cache, images)
        require_same_classes(class_columns(df), list(ens.class_names), str(manifest), str(folder))
        available = sorted(set(df["split"].drop_nulls().to_list()))
        if split not in available:
            raise ChxError(f"split {split!r} is not in the data (it has: {', '.join(available) or 'no splits'}); "
                           f"use --split with one of them")
        return ens, df, images

    @property
    def fusion_config(self) -> dict | None:
        """The first fusion member's architecture (for predict's unknown-views warning)."""
        return next((getattr(m, "fusion_config", None) or m.fusion.config for m in self.members
                     if hasattr(m, "fusion")), None)

    def combine(self, member_probs: np.ndarray) -> np.ndarray:
        """The weighted mean [S, K] of members' probabilities [M, S, K] (one member: itself exactly)."""
        return np.tensordot(self.weights, member_probs.astype(np.float64), axes=1).astype(np.float32)

    def member_studies(self, studies, batch_size: int = 16, workers: int = 2,
                       show_progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(every member's probabilities [M, S, K], the ensemble's [S, K]) of the same ``studies``."""
        per = np.stack([np.asarray(m.predict_studies(studies, batch_size=batch_size, workers=workers,
                                                     show_progress=show_progress), np.float32)
                        for m in self.members])
        return per, self.combine(per)

    def score_split(self, df, split: str, images: Path | None, batch_size: int = 16,
                    workers: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """A manifest's ``split`` per study, for evaluate and compare: (members' probabilities
        [M, S, K], the ensemble's [S, K], study labels [S, K] (the maximum over the study's images;
        NaN: not annotated), study ids). ``images``: the manifest's images root (None: every member
        reads an image cache, :meth:`use_images_cache`)."""
        from chx.data.datasets import label_matrix

        part = df.filter(pl.col("split") == split)
        groups = list(part.group_by("study_id", maintain_order=True))
        studies = [([Path(images or "") / p for p in g["path"]], g["view"].to_list(), g["image_id"].to_list())
                   for _, g in groups]
        classes = list(self.class_names)
        labels = label_matrix(part.group_by("study_id", maintain_order=True).agg(pl.col(classes).max()), classes)
        per, combined = self.member_studies(studies, batch_size=batch_size, workers=workers)
        return per, combined, labels, [str(k[0]) for k, _ in groups]

    def predict_studies(self, studies, batch_size: int = 16, workers: int = 2,
                        show_progress: bool = True) -> np.ndarray:
        return self.member_studies(studies, batch_size, workers, show_progress)[1]

    def predict_study(self, paths: list[Path], views: list[str], image_ids: list[str]) -> np.ndarray:
        return self.predict_studies([(paths, views, image_ids)], workers=0)[0]
