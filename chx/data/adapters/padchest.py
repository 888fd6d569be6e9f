"""PadChest (Bustos et al., "PadChest", Medical Image Analysis 2020; BIMCV, research use agreement).

Source: ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` (``.gz`` is fine; a folder is
searched for ``PADCHEST*.csv(.gz)``): one row per image with ``ImageID`` (the PNG's file name),
``ImageDir`` (the numbered folder holding it), ``StudyID``, ``PatientID``, ``Projection`` and
``Labels``, a Python-list string of the report's findings (``['pleural effusion', 'cardiomegaly']``),
among ~30 other columns (not used).

Mapping:
- One row per image: image_id = ImageID without ``.png``; study_id = StudyID; subject_id =
  PatientID; path = ``ImageDir/ImageID`` (16-bit PNG; ``--images`` resolves it under the root).
- Projection, through :mod:`chx.data.views`: PA -> PA; L -> LATERAL; AP -> AP; AP_horizontal (a
  supine AP) -> AP; COSTAL (rib views) -> OTHER (kept, the count noted); EXCLUDE -> the row is
  dropped and counted (PadChest's own mark for images not to use); anything else -> OTHER (noted).
- Labels is parsed without eval: it must be a bracketed list of quoted strings (else an error
  naming the file, row and value); each label is stripped and lower-cased. Rows whose Labels is
  empty (blank, ``[]``, ``['']``) are dropped and counted. Labels come from the study's report;
  should a study's images disagree, each study takes the per-class max.
- ``--classes data``: PadChest's own labels, one class per label seen (sorted); an image is 1 for
  the labels of its list and 0 for every other.
- Onto CXR-LT / CheXpert names, only where the mapping is unambiguous (:data:`SYNONYMS`; a label
  also matches a target class of its own name, e.g. cardiomegaly, pneumothorax, nodule, mass):
  normal -> No Finding; pulmonary fibrosis -> Fibrosis; pulmonary edema -> Edema; hiatal hernia ->
  Hernia; infiltrates -> Infiltration; pneumoperitoneo -> Pneumoperitoneum; aortic atheromatosis ->
  Calcification of the Aorta (as for IU X-ray); subtypes onto their class: loculated pleural
  effusion -> Pleural Effusion; apical pleural thickening -> Pleural Thickening; multiple nodules ->
  Nodule; pulmonary mass -> Mass; laminar, lobar, segmental, total, basal and round atelectasis ->
  Atelectasis; rib, clavicle, vertebral, humeral and callus rib fracture -> Fracture. Mapped classes
  are 0 when the report lists none of their labels. Not mapped (null): Support Devices (PadChest
  names dozens of devices), Enlarged Cardiomediastinum, Lung Opacity, Lung Lesion, Pleural Other,
  Tortuous Aorta (aortic elongation is not the same finding).

Counts (pinned by tests/test_adapters_padchest.py on a table in this format): 10 rows; 1 EXCLUDE and
2 empty-Labels rows dropped; 7 images, 4 studies (3 multi-view), 3 patients; views PA 3, LATERAL 2,
AP 1, OTHER 1 (COSTAL).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from chx.data.adapters.common import (Notes, expand_sources, finish, map_views, note, read_table,
                                      reject_options)
from chx.errors import ChxError

NAME = "padchest"
COLUMNS = ("ImageID", "ImageDir", "StudyID", "PatientID", "Projection", "Labels")
EXCLUDED_PROJECTION = "EXCLUDE"
NORMAL = "normal"
SYNONYMS: dict[str, str | None] = {
    NORMAL: "No Finding",
    "pulmonary fibrosis": "Fibrosis",
    "pulmonary edema": "Edema",
    "hiatal hernia": "Hernia",
    "infiltrates": "Infiltration",
    "pneumoperitoneo": "Pneumoperitoneum",
    "aortic atheromatosis": "Calcification of the Aorta",
    "loculated pleural effusion": "Pleural Effusion",
    "apical pleural thickening": "Pleural Thickening",
    "multiple nodules": "Nodule",
    "pulmonary mass": "Mass",
    **{f"{kind} atelectasis": "Atelectasis" for kind in ("laminar", "lobar", "segmental", "total", "round")},
    "atelectasis basal": "Atelectasis",
    **{f"{bone} fracture": "Fracture" for bone in ("rib", "clavicle", "vertebral", "humeral", "callus rib")},
}
# Classes a mapped label lands on by its own name: kept as columns even when no image has them,
# so that a mapped class is 0 (not null) for a report that does not list it.
OWN_NAMED = ("cardiomegaly", "pleural effusion", "pneumothorax", "consolidation", "pneumonia",
             "emphysema", "atelectasis", "nodule", "mass", "pleural thickening", "fracture",
             "subcutaneous emphysema", "pneumomediastinum")

_QUOTED = r"""(?:'[^']*'|"[^"]*")"""
# A Python list of string literals, nothing else: the only shape parsed (no eval).
_LIST = rf"^\s*\[\s*(?:{_QUOTED}\s*(?:,\s*{_QUOTED}\s*)*,?\s*)?\]\s*$"


def _read(path: Path, notes: Notes | None) -> pl.DataFrame:
    df = read_table(path, COLUMNS, what="the padchest adapter (PADCHEST_chest_x_ray_images_labels_160K.csv)")
    df = df.select([pl.col(c).str.strip_chars() for c in COLUMNS])
    bad = df["Labels"].is_not_null() & ~df["Labels"].str.contains(_LIST)
    if bad.any():
        row = int(bad.arg_true()[0])
        raise ChxError(f"{path}: data row {row + 1}, column 'Labels': {df['Labels'][row]!r} is not a list "
                       f"of quoted labels like ['pleural effusion', 'cardiomegaly']")
    labels = (pl.col("Labels").fill_null("[]").str.extract_all(_QUOTED)
              .list.eval(pl.element().str.slice(1, pl.element().str.len_chars() - 2)
                         .str.strip_chars().str.to_lowercase())
              .list.eval(pl.element().filter(pl.element() != "")))
    df = df.with_columns(labels.alias("__labels"))
    excluded = (df["Projection"].str.to_uppercase() == EXCLUDED_PROJECTION).fill_null(False)
    empty = (df["__labels"].list.len() == 0) & ~excluded
    if excluded.any():
        note(notes, f"Projection: {EXCLUDED_PROJECTION} rows of {path.name} dropped: {int(excluded.sum()):,}")
    if empty.any():
        note(notes, f"Labels: rows of {path.name} with empty Labels dropped: {int(empty.sum()):,}")
    return df.filter(~excluded & ~empty)


def prepare(sources: list[Path], classes: list[str] | None, images: Path | None = None,
            only_existing: bool = False, *, notes: Notes | None = None, **options) -> pl.DataFrame:
    """PadChest labels CSV -> manifest, one row per image (see the module docstring)."""
    reject_options(NAME, options)
    paths = expand_sources(sources, ["PADCHEST*.csv", "PADCHEST*.csv.gz"],
                           what="the padchest labels CSV "
                                "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv (or the folder holding it)")
    df = pl.concat([_read(p, notes) for p in paths])
    if df.height == 0:
        raise ChxError(f"{', '.join(map(str, paths))}: no row with labels and a usable Projection")
    seen = sorted(set(df.select(pl.col("__labels").explode())["__labels"].drop_nulls().to_list()))
    names = seen if classes is None else sorted(set(seen) | set(SYNONYMS) | set(OWN_NAMED))
    native = df.select([pl.col("__labels").list.contains(n).cast(pl.Float32).alias(n) for n in names])
    image_id = pl.col("ImageID").str.replace(r"(?i)\.png$", "")
    ids = df.select(
        image_id.alias("image_id"), pl.col("StudyID").alias("study_id"),
        pl.col("PatientID").alias("subject_id"),
        pl.concat_str([pl.col("ImageDir"), pl.col("ImageID")], separator="/").alias("path"),
    ).with_columns(map_views(df["Projection"], notes, column="Projection").alias("view"))
    return finish(ids, native, classes, SYNONYMS, dataset=NAME, source=", ".join(map(str, paths)),
                  images=images, only_existing=only_existing, notes=notes)
