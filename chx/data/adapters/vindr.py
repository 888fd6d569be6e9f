"""VinDr-CXR (Nguyen et al., "VinDr-CXR", Scientific Data 2022; Kaggle VinBigData release).

Source: ``train.csv`` (``.gz`` is fine; a folder is searched for ``train.csv``): one row per
image x reader x box, with ``image_id``, ``class_name`` (14 findings or 'No finding') and
``rad_id`` (the reader; boxes are not used here).

Mapping:
- One row per image: image_id; study_id = subject_id = image_id, because VinDr-CXR publishes no
  patient id (so a patient-level split cannot be guaranteed); view PA, because the dataset paper
  describes its images as frontal (posteroanterior) radiographs; path = ``train/<image_id>.dicom``
  (with ``--images``, files converted to another extension are found by name too).
- A finding is 1 when at least ``min_readers`` distinct readers marked it (option, default 1),
  else 0. 'No finding' is 1 exactly when no other finding is 1 (after that threshold), so it is
  consistent with the findings rather than with the readers' own 'No finding' rows.
- Onto CXR-LT: Atelectasis, Cardiomegaly, Consolidation, Infiltration, Lung Opacity,
  Pneumothorax by name; Pleural effusion -> Pleural Effusion, Pleural thickening -> Pleural
  Thickening, Pulmonary fibrosis -> Fibrosis, No finding -> No Finding. Aortic enlargement,
  Calcification (any site, not only the aorta), ILD, Nodule/Mass (one class for two CXR-LT
  classes) and Other lesion have no CXR-LT equivalent and are dropped (no CXR-LT name matches
  them; a target list naming them gets them); the 16 CXR-LT classes VinDr lacks are null.
  ``classes=None`` keeps all 15 VinDr classes with VinDr's names.

Counts (train table, pinned by tests/test_adapters.py): 67,914 rows, 15,000 images (3 readers
each). With min_readers=1: No finding 10,606 (= the images every reader called 'No finding'),
Cardiomegaly 2,300, Pleural effusion 1,032, Pneumothorax 96; with min_readers=2: No finding 10,648,
Cardiomegaly 1,817, Pleural effusion 634, Pneumothorax 58.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from chx.data.adapters.common import (AdapterOption, Notes, expand_sources, finish, read_table,
                                      reject_options)
from chx.errors import ChxError

NAME = "vindr"
COLUMNS = ("image_id", "class_name", "rad_id")
NO_FINDING = "No finding"
VINDR_CLASSES: tuple[str, ...] = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
    "Infiltration", "Lung Opacity", NO_FINDING, "Nodule/Mass", "Other lesion", "Pleural effusion",
    "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis",
)
OPTIONS = (AdapterOption("min_readers", int, 1, "a finding is positive when at least this many "
                                               "readers marked it.", minimum=1),)
SYNONYMS: dict[str, str | None] = {
    "Pleural effusion": "Pleural Effusion",
    "Pleural thickening": "Pleural Thickening",
    "Pulmonary fibrosis": "Fibrosis",
    "No finding": "No Finding",
}


def _read(path: Path) -> pl.DataFrame:
    df = read_table(path, COLUMNS, what="the vindr adapter (VinDr-CXR train.csv)")
    df = df.select([pl.col(c).str.strip_chars() for c in COLUMNS])
    unknown = sorted(set(df["class_name"].drop_nulls().unique().to_list()) - set(VINDR_CLASSES))
    if unknown:
        raise ChxError(f"{path}: unknown class_name(s) {', '.join(map(repr, unknown[:5]))}; VinDr-CXR "
                       f"classes are {', '.join(VINDR_CLASSES)}")
    return df


def prepare(sources: list[Path], classes: list[str] | None, images: Path | None = None,
            only_existing: bool = False, *, min_readers: int = 1, notes: Notes | None = None,
            **options) -> pl.DataFrame:
    """VinDr-CXR train.csv -> manifest, one row per image (see the module docstring)."""
    reject_options(NAME, options)
    if not isinstance(min_readers, int) or min_readers < 1:
        raise ChxError(f"--min-readers {min_readers!r}: give a whole number of readers, at least 1")
    paths = expand_sources(sources, ["train.csv", "train.csv.gz"],
                           what="VinDr-CXR's train.csv (or the folder holding it)")
    df = pl.concat([_read(p) for p in paths])
    image_ids = df.select(pl.col("image_id").unique(maintain_order=True))
    readers = (df.filter(pl.col("class_name") != NO_FINDING)
               .group_by("image_id", "class_name").agg(pl.col("rad_id").n_unique().alias("n")))
    findings = [c for c in VINDR_CLASSES if c != NO_FINDING]
    wide = image_ids.join(
        readers.pivot(on="class_name", index="image_id", values="n") if readers.height else
        pl.DataFrame(schema={"image_id": pl.Utf8}),
        on="image_id", how="left", maintain_order="left")
    native = wide.select([
        (pl.col(c).fill_null(0) >= min_readers if c in wide.columns else pl.lit(False))
        .cast(pl.Float32).alias(c) for c in findings])
    native = native.with_columns((pl.sum_horizontal(findings) == 0).cast(pl.Float32).alias(NO_FINDING))
    native = native.select(VINDR_CLASSES)
    ids = image_ids.select(
        pl.col("image_id"), pl.col("image_id").alias("study_id"), pl.col("image_id").alias("subject_id"),
        pl.lit("PA").alias("view"), pl.concat_str([pl.lit("train/"), pl.col("image_id"), pl.lit(".dicom")])
        .alias("path"))
    return finish(ids, native, classes, SYNONYMS, dataset=NAME, source=", ".join(map(str, paths)),
                  images=images, only_existing=only_existing, per_study=False, notes=notes)
