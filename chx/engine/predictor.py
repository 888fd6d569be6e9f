"""The predictor: both models of a bundle, loaded once, applied to one study's image files.

Used by `chx predict` (and any stage that runs the models on new images). A bundle holds both
models' weights (EMA weights when a run kept them), the class names and the preprocessing, so
prediction repeats training's preprocessing exactly: same size, letterbox, normalisation, pooling
and float16 rounding of the feature maps as the store. Deterministic: a study's views are chosen
and ordered as in evaluation (frontal, lateral, other; then image id).

A bundle is a file (`chx export`, a chx checkpoint) or a folder in the Hugging Face layout
(`chx export --format hf`): ``config.json`` (architecture, classes, preprocessing, features; the
ONNX folder of `chx export --format onnx` holds the same file) and ``model.safetensors`` (both
models' weights, keys prefixed ``backbone.`` and ``fusion.``). Both load offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hashlib
import json
import sys

import numpy as np
import torch

from chx.data.image_cache import ImageCache, open_image_cache
from chx.data.images import load_image
from chx.data.transforms import Preprocess, eval_transform
from chx.data.views import OTHER_TYPE, deterministic_view_order, view_types
from chx.engine.compat import require_same_backbone, require_same_classes
from chx.engine.distributed import resolve_device
from chx.engine.inference import amp_of, feature_maps, fusion_probs
from chx.errors import ChxError
from chx.models import eval_weights, load_checkpoint, load_model, weights_hash
from chx.models.joint import joint_parts

FOLDER_FORMAT = "chx-export-1"            # config.json's "format" in an hf or onnx export folder
FOLDER_CONFIG, FOLDER_WEIGHTS = "config.json", "model.safetensors"
PARTS = ("backbone", "fusion")


def make_bundle(backbone: Path, fusion: Path) -> dict:
    """The bundle of a stage-1 and a fusion checkpoint (checked to belong together), in memory."""
    b = load_checkpoint(backbone, kind="backbone")
    f = load_checkpoint(fusion, kind="fusion")
    require_same_classes(f["class_names"], b["class_names"], str(fusion), str(backbone),
                         fix="export a fusion model trained on this backbone's features")
    weights = eval_weights(b)
    fp = f.get("store_fingerprint") or {}
    require_same_backbone(fp, weights_hash(weights), str(fusion), str(backbone))
    return {
        "kind": "bundle",
        "class_names": list(b["class_names"]),
        "backbone": {"model_config": b["model_config"], "state_dict": weights,
                     "preprocess": b["preprocess"]},
        "fusion": {"model_config": f["model_config"], "state_dict": eval_weights(f)},
        # the store's --precision (absent: float32), repeated on a GPU by predict
        "features": {"pool": int(fp.get("pool", 1)), "flip_tta": bool(fp.get("flip", False)),
                     **({"precision": fp["precision"]} if fp.get("precision") else {})},
        "sources": {"backbone": str(backbone), "fusion": str(fusion)},
    }


def joint_bundle(joint: Path) -> dict:
    """The bundle of a `chx train-joint` checkpoint (its fine-tuned backbone and fusion model, which
    belong together by construction), in memory; flip TTA as the run validated."""
    j = load_checkpoint(joint, kind="joint")
    parts = joint_parts(j, eval_weights(j))
    return {
        "kind": "bundle",
        "class_names": list(j["class_names"]),
        "backbone": {**parts["backbone"], "preprocess": j["preprocess"]},
        "fusion": parts["fusion"],
        "features": {"pool": parts["pool"], "flip_tta": bool(j.get("tta", True))},
        "sources": {"joint": str(joint)},
    }


def folder_config(bundle: dict) -> dict:
    """The config.json of an export folder: everything in a bundle except the weights, and a copy
    of its integrity record (the weights' own copy is the one checked)."""
    return {"format": FOLDER_FORMAT, "library_name": "chx", **export_spec(bundle),
            "integrity": bundle.get("integrity") or integrity_record(bundle)}


# ----------------------------------------------------------------------------- export integrity
#
# Every export carries its spec (class names, preprocessing, features, architecture) twice: in
# plain sight (config.json, the bundle dict) and as sha256 hashes of its canonical JSON inside the
# weights (safetensors metadata, each ONNX graph's metadata_props, the bundle's "integrity"). On
# load the spec in plain sight is hashed again and compared, part by part, so an edited class list
# or preprocessing is one line, never a relabelled output. The record's export_id hashes the spec
# and both models' weights: a bundle's or safetensors' weights are hashed again on load, and both
# ONNX graphs must carry the export_id of their config.json (graphs of another export are refused).
# Exports of an older chx have no record: they load with a warning (structure and shapes are still
# checked), and exporting again adds it.

SPEC_KEYS = ("class_names", "preprocessing", "features", "architecture")
INTEGRITY_KEY = "chx_integrity"          # the record's key in safetensors metadata / ONNX metadata_props
INTEGRITY_VERSION = 1


def export_spec(bundle: dict) -> dict:
    """What an export's hash covers: class names, preprocessing, features, both architectures."""
    return {"class_names": list(bundle["class_names"]),
            "preprocessing": dict(bundle["backbone"]["preprocess"]),
            "features": dict(bundle["features"]),
            "architecture": {part: bundle[part]["model_config"] for part in PARTS}}


def _sha256_json(obj) -> str:
    """sha256 of ``obj``'s canonical JSON (sorted keys, no spaces; tuples as lists)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _export_id(spec_sha256: str, backbone_weights: str, fusion_weights: str) -> str:
    return hashlib.sha256(f"{spec_sha256}:{backbone_weights}:{fusion_weights}".encode()).hexdigest()


def integrity_record(bundle: dict) -> dict:
    """The integrity record of a bundle: the spec's sha256 (whole and per part) and the export id."""
    spec = export_spec(bundle)
    spec_sha = _sha256_json(spec)
    return {"version": INTEGRITY_VERSION, "spec_sha256": spec_sha,
            "parts": {k: _sha256_json(spec[k]) for k in SPEC_KEYS},
            "export_id": _export_id(spec_sha, *(weights_hash(bundle[p]["state_dict"]) for p in PARTS))}


def require_finite_weights(bundle: dict, source: str) -> None:
    """ChxError naming the first tensor of either model with a NaN or an infinity."""
    for part in PARTS:
        for key, t in bundle[part]["state_dict"].items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ChxError(f"{source}: its {part} weight {key} holds non-finite values (NaN or inf); "
                               f"such a model predicts NaN: export a checkpoint of a run that stayed finite")


def check_spec(spec: dict, source: str) -> None:
    """The structure of an export's spec (class names distinct strings, preprocessing valid,
    features, both architectures naming as many classes as the list): one line when broken."""
    names = spec.get("class_names")
    if (not isinstance(names, list) or not names
            or not all(isinstance(c, str) and c.strip() for c in names)):
        raise ChxError(f"{source}: class_names must be a non-empty list of names; the export was edited "
                       f"or is damaged: export the model again")
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise ChxError(f"{source}: class names must be distinct, but {dup[0]!r} appears "
                       f"{names.count(dup[0])} times; the export was edited or is damaged: export it again")
    try:
        Preprocess.from_dict(spec.get("preprocessing"))
    except ChxError as e:
        raise ChxError(f"{source}: {e}") from None
    features = spec.get("features")
    if (not isinstance(features, dict) or not isinstance(features.get("pool"), int)
            or isinstance(features.get("pool"), bool) or features["pool"] < 1
            or not isinstance(features.get("flip_tta"), bool)
            or features.get("precision", "bfloat16") not in ("bfloat16", "float16")):
        raise ChxError(f"{source}: features must hold pool (a positive integer), flip_tta (true or "
                       f"false) and may hold precision (bfloat16 or float16), got {features!r}; the export was "
                       f"edited or is damaged: export it again")
    arch = spec.get("architecture")
    if not isinstance(arch, dict) or not all(isinstance(arch.get(p), dict) for p in PARTS):
        raise ChxError(f"{source}: architecture must hold the backbone's and the fusion model's "
                       f"configuration; the export was edited or is damaged: export it again")
    fusion = arch["fusion"]
    for key in ("in_dim", "max_views"):
        value = fusion.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ChxError(f"{source}: architecture.fusion.{key} must be a positive integer, got {value!r}; "
                           f"the export was edited or is damaged: export it again")
    for part in PARTS:
        k = arch[part].get("num_classes")
        if k != len(names):
            raise ChxError(f"{source}: its {part} predicts {k} classes but it names {len(names)}; the "
                           f"bundle is damaged or was edited: export it again")


_NOT_A_FOLDER = object()


def check_integrity(spec: dict, record, source: str, where: str, weights: dict | None = None,
                    config_record=_NOT_A_FOLDER) -> None:
    """``spec`` (from config.json or the bundle) against the integrity ``record`` stored in the
    weights (``where`` names them); ``weights``: both models' state dicts, hashed against the
    export id (None for ONNX graphs). ``config_record``: an export folder's config.json copy of the
    record, whose export id must be the weights' (files of two exports mixed in one folder).
    No record (an export of an older chx): a warning on stderr."""
    if record is None and isinstance(config_record, dict):
        raise ChxError(f"{source}: {where} carries no integrity record but its {FOLDER_CONFIG} does: the files "
                       f"of two exports were mixed, or it was rewritten: export the model again")
    if record is None:
        sys.stderr.write(f"warning: {source} has no integrity record (exported by an older chx): its "
                         f"classes and preprocessing cannot be checked against its weights; export it "
                         f"again to add one\n")
        return
    if (not isinstance(record, dict) or record.get("version") != INTEGRITY_VERSION
            or not isinstance(record.get("parts"), dict)):
        raise ChxError(f"{source}: the integrity record in {where} is unreadable (made by a newer chx, "
                       f"or damaged); upgrade chx or export the model again")
    edited = [k for k in SPEC_KEYS if _sha256_json(spec[k]) != record["parts"].get(k)]
    if edited or _sha256_json(spec) != record.get("spec_sha256"):
        what = ", ".join(edited) or "settings"
        raise ChxError(f"{source}: the sha256 recorded in {where} at export does not match its {what}; "
                       f"the export was edited or its files were mixed: export the model again")
    if weights is not None:
        got = _export_id(record["spec_sha256"], *(weights_hash(weights[p]) for p in PARTS))
        if got != record.get("export_id"):
            raise ChxError(f"{source}: the weights in {where} are not the ones exported (their sha256 "
                           f"differs from the export id); the file is damaged or was replaced: export "
                           f"the model again")
    if config_record is not _NOT_A_FOLDER:
        want = config_record.get("export_id") if isinstance(config_record, dict) else None
        if record.get("export_id") != want:
            raise ChxError(f"{source}: {where} belongs to another export than its {FOLDER_CONFIG} (export id "
                           f"{str(record.get('export_id'))[:12]} vs {str(want)[:12]}); the files of two "
                           f"exports were mixed: export the model again")


def parse_integrity(text: str | None, source: str, where: str):
    """The integrity record of a metadata string (None when absent)."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        raise ChxError(f"{source}: the integrity record in {where} is not valid JSON; the file is damaged: "
                       f"export the model again") from None


def folder_spec(config: dict, path) -> dict:
    """The spec of an export folder's config.json, its structure checked."""
    missing = [k for k in SPEC_KEYS if k not in config]
    if missing:
        raise ChxError(f"{path} lacks {', '.join(repr(k) for k in missing)}; it was edited or is damaged: "
                       f"export the model again")
    spec = {k: config[k] for k in SPEC_KEYS}
    check_spec(spec, str(path))
    return spec


def bundle_spec(bundle: dict, source: str) -> dict:
    """The spec of a bundle dict (a .chx file or checkpoints), its structure checked."""
    try:
        spec = export_spec(bundle)
    except (KeyError, TypeError, ValueError) as e:
        raise ChxError(f"{source}: the bundle lacks {e}; it is damaged or was edited: export it again") from None
    check_spec(spec, source)
    return spec


def folder_tensors(bundle: dict) -> dict[str, torch.Tensor]:
    """Both models' weights as one flat dict for model.safetensors (``backbone.`` / ``fusion.``)."""
    return {f"{part}.{k}": v.detach().cpu().contiguous() for part in PARTS
            for k, v in bundle[part]["state_dict"].items()}


def read_folder_config(folder: Path) -> dict:
    """config.json of an export folder, checked to be one chx wrote."""
    path = Path(folder) / FOLDER_CONFIG
    if not path.is_file():
        raise ChxError(f"{folder} is a folder without {FOLDER_CONFIG}: give a folder written by "
                       f"`chx export --format hf` (or onnx), or a bundle file")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ChxError(f"{path} is not valid JSON; export the model again") from None
    if not isinstance(config, dict) or config.get("format") != FOLDER_FORMAT:
        raise ChxError(f"{path} is not a chx export (expected format {FOLDER_FORMAT}); export the model "
                       f"with `chx export --format hf`")
    return config


def load_folder_bundle(folder: Path) -> dict:
    """The bundle of an hf export folder (config.json + model.safetensors), read offline; its
    config.json checked against the integrity record in model.safetensors' metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    config = read_folder_config(folder)
    spec = folder_spec(config, Path(folder) / FOLDER_CONFIG)
    weights = Path(folder) / FOLDER_WEIGHTS
    if not weights.is_file():
        raise ChxError(f"{folder} has no {FOLDER_WEIGHTS} (an ONNX export?): use --runtime onnxruntime, "
                       f"or export with --format hf")
    try:
        tensors = load_file(weights)
        with safe_open(weights, "pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # truncated or foreign file: safetensors raises its own error types
        raise ChxError(f"{weights} cannot be read ({type(e).__name__}); it is truncated or not a "
                       f"safetensors file: export the model again") from None
    parts = {part: {k[len(part) + 1:]: v for k, v in tensors.items() if k.startswith(part + ".")}
             for part in PARTS}
    record = parse_integrity(metadata.get(INTEGRITY_KEY), str(folder), FOLDER_WEIGHTS)
    check_integrity(spec, record, str(folder), FOLDER_WEIGHTS, weights=parts,
                    config_record=config.get("integrity"))
    return {"kind": "bundle", "class_names": list(config["class_names"]),
            "backbone": {"model_config": config["architecture"]["backbone"], "state_dict": parts["backbone"],
                         "preprocess": config["preprocessing"]},
            "fusion": {"model_config": config["architecture"]["fusion"], "state_dict": parts["fusion"]},
            "features": config["features"]}


def load_bundle_file(path: Path) -> dict:
    """The bundle of a `chx export` file, its spec checked against its integrity record."""
    data = load_checkpoint(path, kind="bundle")
    check_integrity(bundle_spec(data, str(path)), data.get("integrity"), str(path), "the bundle",
                    weights={p: data[p]["state_dict"] for p in PARTS})
    return data


def load_images(pre: Preprocess, paths: list[Path], cache: ImageCache | None = None,
                image_ids: list[str] | None = None) -> torch.Tensor:
    """Decoded, preprocessed images [V, 1, S, S] float32 exactly as training and extraction saw them
    (from the image ``cache`` by ``image_ids`` when one is given: the same tensors)."""
    items = ImageFiles(paths, pre, cache, image_ids)
    return torch.stack([items[i]["image"] for i in range(len(items))])


def study_views(views: list[str], image_ids: list[str], max_views: int) -> tuple[list[int], list[int]]:
    """The images a study is predicted from, in slot order (at most ``max_views``, deterministic),
    and their view types: (indices into the study's images, view type ids)."""
    order = deterministic_view_order(views, image_ids)[:max_views]
    return order, view_types(views[i] for i in order)


@dataclass
class Predictor:
    backbone: torch.nn.Module
    fusion: torch.nn.Module
    pre: Preprocess
    pool: int
    flip_tta: bool
    class_names: list[str]
    device: torch.device
    amp: torch.dtype | None = None     # the store's --precision, on a GPU (None: float32)
    cache: ImageCache | None = None    # --images-cache: images read from it by image id (use_images_cache)

    @classmethod
    def load(cls, bundle: Path | None = None, backbone: Path | None = None, fusion: Path | None = None,
             device: str = "auto", joint: Path | None = None) -> "Predictor":
        if joint is not None:
            if bundle is not None or backbone is not None or fusion is not None:
                raise ChxError("--joint holds both models: give it alone, without --bundle, --backbone "
                               "or --fusion")
            data = joint_bundle(joint)
        elif bundle is None:
            if backbone is None or fusion is None:
                raise ChxError("give --bundle FILE (from `chx export`), both --backbone and --fusion, or "
                               "--joint (a train-joint checkpoint)")
            data = make_bundle(backbone, fusion)
        elif Path(bundle).is_dir():
            data = load_folder_bundle(bundle)
        else:
            data = load_bundle_file(bundle)
        dev = resolve_device(device)
        source = str(bundle or fusion or joint)
        bundle_spec(data, source)     # distinct class names, valid preprocessing, class counts
        classes = list(data["class_names"])
        bb = load_model({**data["backbone"], "source": source}, kind="backbone")
        fu = load_model({**data["fusion"], "source": source}, kind="fusion")
        for kind, m in (("backbone", bb), ("fusion", fu)):
            if m.config["num_classes"] != len(classes):
                raise ChxError(f"{source}: its {kind} predicts {m.config['num_classes']} classes but it "
                               f"names {len(classes)}; the bundle is damaged or was edited: export it again")
        if fu.config["in_dim"] != bb.feature_dim:
            raise ChxError(f"{source}: its fusion model reads {fu.config['in_dim']}-channel features but its "
                           f"backbone gives {bb.feature_dim}; the bundle is damaged or was edited: export it again")
        return cls(bb.to(dev), fu.to(dev), Preprocess.from_dict(data["backbone"]["preprocess"]),
                   data["features"]["pool"], data["features"]["flip_tta"], classes, dev,
                   amp_of(data["features"].get("precision"), dev))

    def use_images_cache(self, path: str | None) -> list[str]:
        """Read the images from the image cache ``path`` (`chx cache-images`) by image id instead of
        their files (None: the files); one line when it was made at another size or resize mode.
        Returns the parts it cannot serve (none: see :meth:`EnsemblePredictor.use_images_cache`)."""
        self.cache = open_image_cache(path, self.pre)
        return []

    @torch.no_grad()
    def images(self, paths: list[Path], image_ids: list[str] | None = None) -> torch.Tensor:
        """Decoded, preprocessed images [V, 1, S, S] exactly as training and extraction saw them
        (from the image cache by ``image_ids`` after :meth:`use_images_cache`)."""
        return load_images(self.pre, paths, self.cache, image_ids).to(self.device)

    @torch.no_grad()
    def predict_study(self, paths: list[Path], views: list[str], image_ids: list[str]) -> np.ndarray:
        """Study probabilities [K] from its image files (views: PA/AP/LATERAL/LL/OTHER)."""
        return self.predict_studies([(paths, views, image_ids)], workers=0)[0]

    @torch.no_grad()
    def predict_studies(self, studies: list[tuple[list[Path], list[str], list[str]]], batch_size: int = 16,
                        workers: int = 2, show_progress: bool = True) -> np.ndarray:
        """Study probabilities [S, K] of ``studies`` ((files, views, image ids) each), batched across
        studies: one DataLoader decodes every chosen image of every study (``workers`` processes)
        while the backbone runs on ``batch_size`` images at a time; each complete run of
        ``batch_size`` studies then goes through fusion at once (views padded and masked, as
        evaluation's batches). The same maps, views and order as :meth:`predict_study`."""
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        from chx.workers import batches, worker_init

        plans = [study_views(views, ids, self.fusion.max_views) for _, views, ids in studies]
        files = [studies[s][0][i] for s, (order, _) in enumerate(plans) for i in order]
        ids = [studies[s][2][i] for s, (order, _) in enumerate(plans) for i in order]
        ends = np.cumsum([len(order) for order, _ in plans])        # images up to each study's last
        k = len(self.class_names)
        if not files:
            return np.zeros((len(studies), k), np.float32)
        loader = DataLoader(ImageFiles(files, self.pre, self.cache, ids), batch_size=batch_size, shuffle=False,
                            num_workers=workers if len(files) > batch_size else 0,
                            pin_memory=self.device.type == "cuda", worker_init_fn=worker_init)
        pending = {"maps": [], "flips": []}        # maps of images not yet through fusion, in order
        out, done, seen = [], 0, 0                 # done: studies already through fusion

        def take(key: str, n: int) -> torch.Tensor | None:
            """The first ``n`` pending maps of ``key`` (float32); the rest stay pending."""
            if not pending[key]:
                return None
            m = torch.cat(pending[key])
            pending[key] = [m[n:]]
            return m[:n].float()

        def fuse(upto: int) -> None:
            """Studies done..upto-1 (all their images' maps are in) through fusion."""
            nonlocal done
            n = int(ends[upto - 1]) - (int(ends[done - 1]) if done else 0)
            m, mf = take("maps", n), take("flips", n)
            sizes = [len(plans[s][0]) for s in range(done, upto)]
            types = [plans[s][1] for s in range(done, upto)]
            out.append(fusion_probs(self.fusion, *self._study_batch(m, sizes, types, mf)).cpu().numpy())
            done = upto

        with batches(loader) as it:                                 # workers end on any exit
            for batch in tqdm(it, total=len(loader), desc="predict", unit="batch", leave=False,
                              disable=None if show_progress else True):
                x = batch["image"].to(self.device, non_blocking=True)
                pending["maps"].append(feature_maps(self.backbone, x, self.pool, amp=self.amp))
                if self.flip_tta:
                    pending["flips"].append(feature_maps(self.backbone, x, self.pool, flip=True, amp=self.amp))
                seen += len(x)
                complete = int(np.searchsorted(ends, seen, side="right"))    # studies whose images are all in
                while complete - done >= batch_size:
                    fuse(done + batch_size)
        while done < len(studies):
            fuse(min(done + batch_size, len(studies)))
        return np.concatenate(out)

    def _study_batch(self, maps: torch.Tensor, sizes: list[int], types: list[list[int]],
                     flips: torch.Tensor | None):
        """Consecutive studies' maps [N, C, h, w] -> fusion_probs' arguments: maps [B, V, C, h, w]
        padded with zeros, the view mask, the view types (padding: OTHER), the flipped maps."""
        v = max(sizes)
        mask = torch.zeros(len(sizes), v, dtype=torch.bool, device=self.device)
        typ = torch.full((len(sizes), v), OTHER_TYPE, dtype=torch.long)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        batches = []
        for m in (maps, flips):
            if m is None:
                batches.append(None)
                continue
            b = m.new_zeros(len(sizes), v, *m.shape[1:])
            for i, (s, n) in enumerate(zip(starts, sizes)):
                b[i, :n] = m[s:s + n]
            batches.append(b)
        for i, n in enumerate(sizes):
            mask[i, :n] = True
            typ[i, :n] = torch.tensor(types[i])
        return batches[0], mask, typ.to(self.device), batches[1]


def use_images_cache(model, path: str | None, images: Path | None) -> None:
    """``--images-cache PATH`` for a predictor or explainer of a manifest's images (found by image id).
    ``images``: the manifest's images root (None: not given), needed by ensemble members the cache
    does not serve (another size): one line without it, a note on stderr with it."""
    if path is None:
        return
    others = model.use_images_cache(path)
    if others and images is None:
        raise ChxError(f"image cache {path} holds none of the images of {', '.join(others)} (another size): give "
                       f"--images ROOT so that they read the files, or leave them out of the ensemble")
    if others:
        sys.stderr.write(f"note: {', '.join(others)} read the image files: the cache {path} holds other sizes\n")


class ImageFiles(torch.utils.data.Dataset):
    """Image files decoded and preprocessed as training saw them, for a DataLoader: items
    ``{"image": [1, S, S]}`` (what :func:`chx.engine.inference.predict_images` takes too). With an
    image ``cache`` (``--images-cache``) item i is read from its row of ``image_ids[i]`` instead of
    its file: the same tensor (an id the cache lacks is one line, here, before any work)."""

    def __init__(self, files: list[Path], pre: Preprocess, cache: ImageCache | None = None,
                 image_ids: list[str] | None = None):
        self.files, self.pre, self.norm, self.cache = list(files), pre, eval_transform(pre), cache
        self.rows = None if cache is None else cache.rows_of(list(image_ids))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        if self.cache is not None:
            return {"image": self.norm(self.cache.read(int(self.rows[i])))}
        return {"image": self.norm(load_image(self.files[i], self.pre.size, self.pre.mode))}
