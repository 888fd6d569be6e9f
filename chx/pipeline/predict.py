"""`chx predict`: stage 1 + fusion end to end on new studies.

A bundle (`chx export`) holds both models' weights, the class names and the preprocessing; the
models run through :class:`chx.engine.predictor.Predictor` (torch), or their ONNX graphs through
:class:`chx.engine.onnx_runtime.OnnxPredictor` (``runtime="onnxruntime"``); both repeat training's
preprocessing exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from chx.atomic import atomic_path
from chx.data.datasets import check_paths
from chx.data.images import dicom_tags, is_dicom
from chx.data.manifest import read_manifest
from chx.data.views import canonical_view
from chx.engine.predictor import Predictor
from chx.errors import ChxError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}
RUNTIMES = ("torch", "onnxruntime")


def load_predictor(runtime: str = "torch", bundle: Path | None = None, backbone: Path | None = None,
                   fusion: Path | None = None, joint: Path | None = None, device: str = "auto"):
    """The predictor of the models given: torch (a bundle file or folder, the checkpoints) or
    onnxruntime (the folder of `chx export --format onnx`, on the CPU)."""
    if runtime == "torch":
        return Predictor.load(bundle, backbone, fusion, device=device, joint=joint)
    if runtime != "onnxruntime":
        raise ChxError(f"--runtime {runtime}: use one of {', '.join(RUNTIMES)}")
    if bundle is None or not Path(bundle).is_dir() or backbone or fusion or joint:
        raise ChxError("--runtime onnxruntime runs the folder of `chx export --format onnx`: give it as "
                       "--bundle DIR (without --backbone, --fusion or --joint)")
    if device not in ("auto", "cpu"):
        raise ChxError(f"--runtime onnxruntime runs on the CPU: drop --device {device} (or use --runtime torch)")
    from chx.engine.onnx_runtime import OnnxPredictor

    return OnnxPredictor.load(bundle)


# DICOM modalities of projection radiographs; anything else (CT, MR, US, ...) is not a chest X-ray.
RADIOGRAPH_MODALITIES = {"CR", "DX", "DR", "RG", "PX", "OT", ""}


def _dicom_view(path: Path) -> str:
    """The canonical view of a DICOM file's ViewPosition (OTHER when absent or unreadable); a file
    of another modality than a radiograph (CT, MR, ...) is refused with one line."""
    tags = dicom_tags(path, "ViewPosition", "Modality")
    if tags is None:
        return "OTHER"
    modality = tags["Modality"].upper()
    if modality not in RADIOGRAPH_MODALITIES:
        raise ChxError(f"{path} is a {modality} image (DICOM Modality {modality}); chx predicts chest "
                       f"radiographs (CR/DX): remove it from the input")
    return canonical_view(tags["ViewPosition"])


def _is_image_file(p: Path) -> bool:
    """PNG/JPEG/DICOM by suffix, or a DICOM file without one (the DICM magic)."""
    return p.is_file() and (p.suffix.lower() in IMAGE_SUFFIXES or (p.suffix == "" and is_dicom(p)))


def collect_inputs(images_dir: Path | None = None, files: list[Path] | None = None,
                   manifest: Path | None = None, images: Path | None = None,
                   study_id: str = "study") -> pl.DataFrame:
    """One row per image: image_id, study_id, view, file. ``study_id`` names the ``files`` study.

    A manifest's paths must stay under ``images`` (no absolute paths, no '..'), as for every other
    reader of a manifest; symbolic links under the root are followed."""
    given = sum(x is not None and x != [] for x in (images_dir, files, manifest))
    if given != 1:
        raise ChxError("give exactly one input: --studies DIR (a folder per study), --files F... "
                       "(one study) or --manifest M with --images ROOT")
    if manifest is not None:
        if images is None:
            raise ChxError("--manifest needs --images ROOT (the manifest's paths are relative to it)")
        df = read_manifest(manifest, require_labels=False)
        check_paths(df, source=str(manifest))
        return df.select("image_id", "study_id", "view",
                         pl.col("path").map_elements(lambda p: str(Path(images) / p), return_dtype=pl.Utf8)
                         .alias("file"))
    rows = []
    if files:
        for f in files:
            if not Path(f).is_file():
                raise ChxError(f"{f} does not exist")
            rows.append((Path(f).stem, str(study_id), Path(f)))
    else:
        root = Path(images_dir)
        if not root.is_dir():
            raise ChxError(f"--studies {root} is not a folder (expected one sub-folder per study)")
        studies = sorted(p for p in root.iterdir() if p.is_dir())
        if not studies:
            raise ChxError(f"--studies {root} has no sub-folders; put each study's images in its own folder")
        for s in studies:
            imgs = sorted(p for p in s.iterdir() if _is_image_file(p))
            if not imgs:
                raise ChxError(f"study folder {s} holds no image (.png, .jpg, .dcm, or DICOM without a "
                               f"suffix); remove it or add its images")
            rows += [(f"{s.name}/{p.stem}", s.name, p) for p in imgs]
    return pl.DataFrame({
        "image_id": [r[0] for r in rows], "study_id": [r[1] for r in rows],
        "view": [_dicom_view(r[2]) if is_dicom(r[2]) else "OTHER" for r in rows],
        "file": [str(r[2]) for r in rows]})


SUFFIX_FORMATS = {".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Per-image challenge submissions (CSV): the key column and where its value comes from.
SUBMISSIONS = {"cxr-lt": ("dicom_id", "image_id"),        # CXR-LT 2023/2024: MIMIC's dicom_id
               "cxr-lt-2026": ("ImageID", "file name")}  # CXR-LT 2026: the image's file name


def output_format(out: Path, fmt: str | None) -> str:
    """The format of ``-o out``: ``fmt`` when given (it must agree with a .json/.parquet/.csv
    suffix), else the suffix's (csv for any other suffix)."""
    by_suffix = SUFFIX_FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        return by_suffix or "csv"
    written = "csv" if fmt in SUBMISSIONS else fmt
    if by_suffix is not None and by_suffix != written:
        raise ChxError(f"-o {out} ends in {Path(out).suffix} but --format {fmt} writes {written}; name the "
                       f"file .{written} or drop --format")
    return fmt


def predict(predictor: Predictor, inputs: pl.DataFrame, out: Path, fmt: str = "csv") -> pl.DataFrame:
    """Predict every study of ``inputs`` with ``predictor`` (a :class:`Predictor` or an
    :class:`~chx.engine.onnx_runtime.OnnxPredictor`: see :func:`load_predictor`) and write ``out``
    (csv, json, or the CXR-LT submission)."""
    from tqdm.auto import tqdm

    study_ids, probs = [], []
    for (study,), group in tqdm(inputs.group_by("study_id", maintain_order=True), desc="predict",
                                unit="study", leave=False, disable=None):
        study_ids.append(study)
        probs.append(predictor.predict_study([Path(f) for f in group["file"]], group["view"].to_list(),
                                             group["image_id"].to_list()))
    table = pl.DataFrame({"study_id": study_ids}).with_columns(
        [pl.Series(c, np.stack(probs)[:, i]) for i, c in enumerate(predictor.class_names)])
    if fmt in SUBMISSIONS:
        # The challenges want one row per image: join study probabilities BY KEY, never by position.
        key, image_key = SUBMISSIONS[fmt]
        if fmt == "cxr-lt-2026":
            from chx.data.classes import CXR_LT_2026

            if list(predictor.class_names) != list(CXR_LT_2026):
                raise ChxError(f"--format cxr-lt-2026 needs a model of the 30 CXR-LT 2026 classes in the "
                               f"challenge order; this one has {len(predictor.class_names)} other classes "
                               f"(prepare with --classes cxr-lt-2026)")
        keys = (inputs["image_id"] if image_key == "image_id"
                else inputs["file"].map_elements(lambda f: Path(f).name, return_dtype=pl.Utf8))
        table = (pl.DataFrame({key: keys, "study_id": inputs["study_id"]})
                 .join(table, on="study_id", how="left", maintain_order="left").drop("study_id"))
        missing = table.filter(pl.any_horizontal(pl.col(predictor.class_names).is_null()))
        if missing.height or table.height != inputs.height:
            raise ChxError(f"{missing.height} image(s) got no prediction (e.g. {missing[key][:1].to_list()}); "
                           f"nothing was written")
    _write_table(table, out, "csv" if fmt in SUBMISSIONS else fmt)
    return table


def _write_table(table: pl.DataFrame, out: Path, kind: str) -> None:
    """Atomic write: csv, parquet or json (a list of row objects)."""
    import json

    with atomic_path(out) as tmp:
        if kind == "json":
            tmp.write_text(json.dumps(table.to_dicts(), indent=1))
        elif kind == "parquet":
            table.write_parquet(tmp)
        else:
            table.write_csv(tmp)
