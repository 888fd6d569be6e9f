"""CXR-LT 2023 / 2024 challenge labels (Holste et al., "Towards long-tailed, multi-label disease
classification from chest X-ray: overview of the CXR-LT challenge", MedIA 2024; Lin et al.,
CXR-LT 2024, MedIA 2025), on MIMIC-CXR-JPG images (PhysioNet credentialed access).

Source: one or more challenge CSVs (e.g. train + development; a folder is searched for
``*.csv``): one row per image with ``dicom_id``, ``subject_id``, ``study_id``, ``ViewPosition``
and ``path`` (relative to the MIMIC-CXR-JPG root, ``files/p10/p10000032/s5.../<dicom_id>.jpg``),
then one 0/1 column per class (26 in 2023, 40 in 2024 task 1: ``--classes cxr-lt-2024-task1``,
or ``cxr-lt-2024-task2`` for the 26 of the gold-standard task, "Normal" for "No Finding").

Mapping:
- image_id = dicom_id; study_id, subject_id as given; path as given (``--images`` resolves it
  under the MIMIC-CXR-JPG root or any folder above or below it).
- view: ViewPosition through :mod:`chx.data.views` (PA, AP, LATERAL, LL; XTABLE LATERAL ->
  LATERAL; AP AXIAL, decubitus, oblique, SWIMMERS and blank -> OTHER; the OTHER count is noted).
- class columns: every column that is neither an id column above nor a known metadata column
  (:data:`METADATA_COLUMNS`, e.g. ``split``, ``fold``, DICOM header fields); values 1, 0 or blank
  (null). Anything else is an error naming the file, row and column. The challenge's own split
  columns are not carried over: ``split`` is null (``chx prepare --val-fraction`` splits by
  patient).
- Classes are matched to the target list by name (class key); a target class the CSVs lack is
  null. CXR-LT labels are per study (from the report); should the images of a study disagree,
  each study takes the per-class max (1 if any image is 1, else 0 if any is 0, else null).

No real CXR-LT file is shipped (credentialed data): tests/test_adapters.py checks the adapter on a
small table in the challenge format.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from chx.data.adapters.common import (Notes, expand_sources, finish, map_views, parse_labels,
                                      read_table, reject_options)
from chx.errors import ChxError

NAME = "cxr-lt"
ID_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition", "path")
# Columns seen in CXR-LT and MIMIC-CXR tables that are not classes (compared case-insensitively).
METADATA_COLUMNS = frozenset(c.casefold() for c in (
    "", "index", "Unnamed: 0", "split", "fold", "fpath", "image_path", "jpg_path",
    "PerformedProcedureStepDescription", "ViewCodeSequence_CodeMeaning", "Rows", "Columns",
    "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning", "gender", "sex", "age", "anchor_age",
))


def _read(path: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    df = read_table(path, ID_COLUMNS, what="the cxr-lt adapter (CXR-LT challenge CSV)")
    classes = [c for c in df.columns
               if c not in ID_COLUMNS and c.strip().casefold() not in METADATA_COLUMNS]
    if not classes:
        raise ChxError(f"{path}: no class columns; a CXR-LT CSV has one 0/1 column per class after "
                       f"{', '.join(ID_COLUMNS)}")
    return df.select([pl.col(c).str.strip_chars() for c in ID_COLUMNS]), parse_labels(df, classes, path)


def prepare(sources: list[Path], classes: list[str] | None, images: Path | None = None,
            only_existing: bool = False, *, notes: Notes | None = None, **options) -> pl.DataFrame:
    """CXR-LT challenge CSV(s) -> manifest (see the module docstring)."""
    reject_options(NAME, options)
    paths = expand_sources(sources, ["*.csv", "*.csv.gz"],
                           what="CXR-LT challenge CSV(s) (or the folder holding them)")
    read = [_read(p) for p in paths]
    df = pl.concat([d for d, _ in read])
    # Several CSVs may name different class sets: a class a CSV lacks is null for its rows.
    native = pl.concat([lab for _, lab in read], how="diagonal")
    ids = df.select(pl.col("dicom_id").alias("image_id"), "study_id", "subject_id", "path").with_columns(
        map_views(df["ViewPosition"], notes, column="ViewPosition").alias("view"))
    return finish(ids, native, classes, {}, dataset=NAME, source=", ".join(map(str, paths)),
                  images=images, only_existing=only_existing, notes=notes)
