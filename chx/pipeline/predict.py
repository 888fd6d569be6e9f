"""`chx predict`: stage 1 + fusion end to end on new studies.

A bundle (`chx export`) holds both models' weights, the class names and the preprocessing; the
models run through :class:`chx.engine.predictor.Predictor` (torch), or their ONNX graphs through
:class:`chx.engine.onnx_runtime.OnnxPredictor` (``runtime="onnxruntime"``); both repeat training's
preprocessing exactly. Each image's view is what training saw (a manifest's view column), or is
stated for image files (``--views``, a DICOM's ViewPosition, the file-name rule of
:func:`chx.data.views.file_name_view`); images left without one are OTHER and, when the model
uses views, the CLI warns once (:func:`unknown_views_warning`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from chx.atomic import atomic_path
from chx.data.datasets import check_paths
from chx.data.images import dicom_tags, is_dicom
from chx.data.manifest import read_manifest
from chx.data.views import canonical_view, file_name_view
from chx.engine.ensemble import EnsemblePredictor, is_ensemble
from chx.engine.predictor import Predictor, use_images_cache
from chx.errors import ChxError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}
RUNTIMES = ("torch", "onnxruntime")


def load_predictor(runtime: str = "torch", bundle: Path | None = None, backbone: Path | None = None,
                   fusion: Path | None = None, joint: Path | None = None, device: str = "auto",
                   images_cache: str | None = None, images: Path | None = None):
    """The predictor of the models given: torch (a bundle file or folder, the checkpoints) or
    onnxruntime (the folder of `chx export --format onnx`, on the CPU). ``images_cache``
    (``--images-cache``): it reads a manifest's images from that image cache (``images``: the
    manifest's images root, for ensemble members of another size; see
    :func:`chx.engine.predictor.use_images_cache`)."""
    predictor = _load_predictor(runtime, bundle, backbone, fusion, joint, device)
    use_images_cache(predictor, images_cache, images)
    return predictor


def _load_predictor(runtime: str, bundle: Path | None, backbone: Path | None, fusion: Path | None,
                    joint: Path | None, device: str):
    if is_ensemble(bundle):
        if backbone or fusion or joint:
            raise ChxError(f"{bundle} is an ensemble bundle: give it alone as --bundle")
        if runtime == "torch" or device in ("auto", "cpu"):    # onnxruntime on another device: refused below
            return EnsemblePredictor.load(bundle, device=device, runtime=runtime)
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
    from chx.engine.predictor import read_folder_config

    predictor = OnnxPredictor.load(bundle)
    predictor.fusion_config = dict(read_folder_config(bundle)["architecture"]["fusion"])   # for the views warning
    return predictor


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
        raise ChxError(f"{printable(path)} is a {modality} image (DICOM Modality {modality}); chx predicts "
                       f"chest radiographs (CR/DX): remove it from the input")
    return canonical_view(tags["ViewPosition"])


def _is_image_file(p: Path) -> bool:
    """PNG/JPEG/DICOM by suffix, or a DICOM file without one (the DICM magic)."""
    return p.is_file() and (p.suffix.lower() in IMAGE_SUFFIXES or (p.suffix == "" and is_dicom(p)))


def printable(text) -> str:
    """``text`` (a path or a name from the file system) as valid UTF-8: bytes of a non-UTF-8 file
    name (which Python holds as surrogates) become ``\\xNN`` escapes, as outputs must hold them."""
    text = str(text)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:      # a surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


# Where an input image's view came from (the column ``view_from`` of :func:`collect_inputs`).
VIEW_SOURCES = ("manifest", "--views", "DICOM", "file name", "unknown")
VIEWS_HELP = ("PA, AP, LATERAL (or LAT, L), LL, OTHER, or auto (the DICOM ViewPosition, else the file "
              "name's view word)")


def _file_view(path: Path) -> tuple[str, str]:
    """(view, where it came from) of an image file: a DICOM's ViewPosition when it names a view,
    else a view word of the file name (:func:`chx.data.views.file_name_view`), else OTHER, unknown."""
    if is_dicom(path):
        view = _dicom_view(path)
        if view != "OTHER":
            return view, "DICOM"
    named = file_name_view(path.name)
    return (named, "file name") if named else ("OTHER", "unknown")


def parse_views(text: str, n: int) -> list[str | None]:
    """``--views PA,LATERAL``: one view per ``--files`` file, in order; None for ``auto``."""
    items = [v.strip() for v in str(text).split(",")]
    if len(items) != n or any(not v for v in items):
        raise ChxError(f"--views {text}: give one view per --files file, in the same order, separated by "
                       f"commas ({n} file{'' if n == 1 else 's'}, {len([v for v in items if v])} view(s)); "
                       f"views: {VIEWS_HELP}")
    out = []
    for v in items:
        if v.lower() == "auto":
            out.append(None)
            continue
        view = canonical_view(v)
        if view == "OTHER" and v.upper() != "OTHER":
            raise ChxError(f"--views: {v!r} is not a view; use {VIEWS_HELP}")
        out.append(view)
    return out


def _frame(image_ids: list[str], study_ids: list[str], views: list[str], files: list, sources: list[str]):
    """The rows of :func:`collect_inputs`. ``file`` is a string column, except when a file name is not
    valid UTF-8: then it holds the Path objects (a string column cannot hold such a name)."""
    names = [str(f) for f in files]
    try:
        file_col = pl.Series("file", names, dtype=pl.Utf8)
    except UnicodeEncodeError:
        file_col = pl.Series("file", [Path(f) for f in names], dtype=pl.Object)
    return pl.DataFrame({"image_id": [printable(i) for i in image_ids],
                         "study_id": [printable(s) for s in study_ids], "view": views,
                         "view_from": sources}).with_columns(file_col)


def check_manifest_file(manifest: Path | None) -> None:
    """One line when ``--manifest`` names a folder (not "missing": it is there, but not a file)."""
    if manifest is not None and Path(manifest).is_dir():
        inside = sorted(p.name for p in Path(manifest).glob("*.parquet"))
        raise ChxError(f"--manifest {printable(manifest)} is a folder: give the manifest file itself"
                       + (f" (e.g. {printable(Path(manifest) / inside[0])})" if inside else
                          " (a .parquet or .csv written by `chx prepare`)"))


def collect_inputs(images_dir: Path | None = None, files: list[Path] | None = None,
                   manifest: Path | None = None, images: Path | None = None,
                   study_id: str = "study", views: str | None = None, split: str | None = None,
                   images_cache: str | None = None) -> pl.DataFrame:
    """One row per image: image_id, study_id, view, view_from (see :data:`VIEW_SOURCES`), file.
    ``study_id`` names the ``files`` study.

    Views: a manifest's view column; for files, ``views`` (``--views PA,LATERAL``: one per file, in
    order) or else a DICOM's ViewPosition, else a view word in the file name
    (:func:`chx.data.views.file_name_view`), else OTHER. ``split``: only the manifest's studies of
    that split (every split when None). A manifest's paths must stay under ``images`` (no absolute
    paths, no '..'), as for every other reader of a manifest; symbolic links under the root are
    followed. Ids made of non-UTF-8 file names are escaped (:func:`printable`). ``images_cache``
    (``--images-cache``: the images are found in it by a manifest's image_id) goes with a manifest
    only, which then needs no ``images`` (its ``file`` column is then the manifest's paths)."""
    given = sum(x is not None and x != [] for x in (images_dir, files, manifest))
    if given != 1:
        raise ChxError("give exactly one input: --studies DIR (a folder per study), --files F... "
                       "(one study) or --manifest M with --images ROOT")
    if views is not None and not files:
        raise ChxError("--views gives the views of --files (one per file, in order); --studies takes them "
                       "from DICOM headers and file names, --manifest from its view column")
    if split is not None and manifest is None:
        raise ChxError("--split needs --manifest (the split is a column of the manifest)")
    if images_cache is not None and manifest is None:
        raise ChxError("--images-cache finds a manifest's images by their image_id: it goes with --manifest; "
                       "--files and --studies read the image files (drop --images-cache)")
    if manifest is not None:
        check_manifest_file(manifest)
        if images is None and images_cache is None:
            raise ChxError("--manifest needs --images ROOT (the manifest's paths are relative to it)")
        df = read_manifest(manifest, require_labels=False)
        check_paths(df, source=str(manifest))
        if split is not None:
            chosen = df.filter(pl.col("split") == split)
            if chosen.is_empty():
                have = sorted(s for s in df["split"].unique().to_list() if s is not None)
                raise ChxError(f"{manifest} has no image in split {split!r} (its splits: "
                               f"{', '.join(have) or 'none'}); choose another --split or drop it")
            df = chosen
        return _frame(df["image_id"].to_list(), df["study_id"].to_list(), df["view"].to_list(),
                      [Path(images or "") / p for p in df["path"].to_list()], ["manifest"] * df.height)
    rows = []
    if files:
        stated = parse_views(views, len(files)) if views is not None else [None] * len(files)
        seen = {}
        for f, view in zip(files, stated):
            f = Path(f)
            if f.is_dir():
                raise ChxError(f"--files {printable(f)} is a folder: use --studies for a folder of study "
                               f"folders, or list its image files")
            if not f.is_file():
                raise ChxError(f"--files {printable(f)} does not exist")
            key = f.resolve()
            if key in seen:
                raise ChxError(f"--files lists {printable(f)} twice (also as {printable(seen[key])}); give "
                               f"each image once (it would count twice in the study and the submission)")
            seen[key] = f
            rows.append((f.stem, str(study_id), f, *((view, "--views") if view else _file_view(f))))
    else:
        root = Path(images_dir)
        if not root.is_dir():
            raise ChxError(f"--studies {printable(root)} is not a folder (expected one sub-folder per study)")
        studies = sorted(p for p in root.iterdir() if p.is_dir())
        if not studies:
            raise ChxError(f"--studies {printable(root)} has no sub-folders; put each study's images in its "
                           f"own folder")
        for s in studies:
            imgs = sorted(p for p in s.iterdir() if _is_image_file(p))
            if not imgs:
                raise ChxError(f"study folder {printable(s)} holds no image (.png, .jpg, .dcm, or DICOM "
                               f"without a suffix); remove it or add its images")
            rows += [(f"{s.name}/{p.stem}", s.name, p, *_file_view(p)) for p in imgs]
    return _frame([r[0] for r in rows], [r[1] for r in rows], [r[3] for r in rows], [r[2] for r in rows],
                  [r[4] for r in rows])


def view_dependence(fusion_config: dict, study_size: int) -> str | None:
    """How a fusion model with this config uses the views of a study of ``study_size`` images
    (None: not at all): their types (view embedding, experts), their slot order, their choice."""
    if fusion_config.get("view_embedding"):
        return "a view-type embedding"
    if fusion_config.get("view_experts"):
        return "view experts (one projection per view type)"
    if fusion_config.get("experts"):
        return "a mixture of experts gated by the view type"
    if study_size > int(fusion_config.get("max_views", 4)):
        return f"a choice of {fusion_config.get('max_views', 4)} views by type (frontal first)"
    if study_size > 1 and fusion_config.get("segment_embedding", True):
        return "the order of the views (frontal, lateral, other)"
    return None


def unknown_views_warning(inputs: pl.DataFrame, fusion_config: dict | None) -> str | None:
    """One line (or None) when a model that uses views meets images whose view nobody stated
    (typed OTHER): the train/serve skew of plain image files; what to do about it."""
    if fusion_config is None or "view_from" not in inputs.columns:
        return None
    unknown = inputs.filter(pl.col("view_from") == "unknown")
    if unknown.is_empty():
        return None
    sizes = inputs.group_by("study_id").len()
    studies = sizes.filter(pl.col("study_id").is_in(unknown["study_id"].unique().implode()))
    uses = [u for u in (view_dependence(fusion_config, n) for n in studies["len"].to_list()) if u]
    if not uses:
        return None
    return (f"warning: {unknown.height:,} of {inputs.height:,} image(s) have no known view (e.g. "
            f"{unknown['image_id'][0]}) and are typed OTHER, but this model uses {uses[0]}: state the views "
            f"with --views PA,LATERAL (one per --files file), a manifest's view column, or a view word in "
            f"the file names (x_pa.png, x_lateral.jpg; see --help)")


def fusion_config_of(predictor) -> dict | None:
    """The fusion model's architecture config of a predictor (torch or ONNX Runtime)."""
    fusion = getattr(predictor, "fusion", None)
    return getattr(fusion, "config", None) or getattr(predictor, "fusion_config", None)


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


def predict(predictor: Predictor, inputs: pl.DataFrame, out: Path, fmt: str = "csv", batch_size: int = 16,
            workers: int = 2) -> pl.DataFrame:
    """Predict every study of ``inputs`` with ``predictor`` (a :class:`Predictor` or an
    :class:`~chx.engine.onnx_runtime.OnnxPredictor`: see :func:`load_predictor`) and write ``out``
    (csv, json, or the CXR-LT submission). The torch predictor batches across studies: ``batch_size``
    images per backbone step (decoded by ``workers`` DataLoader processes), ``batch_size`` studies
    per fusion step."""
    groups = [(study, [Path(f) for f in group["file"]], group["view"].to_list(), group["image_id"].to_list())
              for (study,), group in inputs.group_by("study_id", maintain_order=True)]
    study_ids = [g[0] for g in groups]
    if hasattr(predictor, "predict_studies"):
        probs = predictor.predict_studies([g[1:] for g in groups], batch_size=batch_size, workers=workers)
    else:
        from tqdm.auto import tqdm

        probs = np.stack([predictor.predict_study(*g[1:]) for g in tqdm(groups, desc="predict", unit="study",
                                                                          leave=False, disable=None)])
    table = pl.DataFrame({"study_id": study_ids}).with_columns(
        [pl.Series(c, probs[:, i]) for i, c in enumerate(predictor.class_names)])
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
                else pl.Series([printable(Path(f).name) for f in inputs["file"]], dtype=pl.Utf8))
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
    from chx.atomic import json_text

    with atomic_path(out) as tmp:
        if kind == "json":
            tmp.write_text(json_text(table.to_dicts(), indent=1))   # valid JSON: NaN -> null
        elif kind == "parquet":
            table.write_parquet(tmp)
        else:
            table.write_csv(tmp)
