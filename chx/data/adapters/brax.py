"""BRAX, the Brazilian labelled chest X-ray dataset (Reis et al., Scientific Data 2022; PhysioNet,
credentialed access).

Source: ``master_spreadsheet_update.csv`` (``.gz`` is fine; a folder is searched for it): one row
per image with ``PngPath``, ``DicomPath``, ``PatientID``, ``AccessionNumber`` (the exam),
``ViewPosition`` and the 14 CheXpert labels (blank, 0, -1 uncertain, 1; the label columns are found
by class key, so their case does not matter).

Mapping:
- image_id = PngPath without its suffix (BRAX's file names repeat across exams, its paths do not);
  path = PngPath; study_id = AccessionNumber; subject_id = PatientID.
- view, through :mod:`chx.data.views`: PA -> PA; AP -> AP; L and RL -> LATERAL; the decubitus
  (AP LLD, LT-DECUB) and oblique (RLO) views -> OTHER (the count is noted).
- labels: blank -> null, 1 / 0 as is, -1 by ``--uncertain`` as for chexpert. The labels come from
  the exam's report; should an exam's images disagree, each takes the per-class max (noted). The
  14 names are CXR-LT classes; the other 12 are null.

Counts (pinned by tests/test_adapters_brax.py on a table in this format): 9 images of 4 exams
(3 multi-view) of 3 patients; views PA 3, AP 1, LATERAL 3 (L 2, RL 1), OTHER 2 (AP LLD, RLO);
Cardiomegaly 1 on 3 images (one exam's images disagree: the max is taken), -1 on 2 (null with
ignore, 1 with ones).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from chx.data.adapters.chexpert import CHEXPERT_CLASSES
from chx.data.adapters.common import (UNCERTAIN, Notes, expand_sources, finish, map_views,
                                      parse_labels, read_table, reject_options, uncertain_value)
from chx.data.classes import class_key
from chx.errors import ChxError

NAME = "brax"
OPTIONS = (UNCERTAIN,)
ID_COLUMNS = ("PngPath", "PatientID", "AccessionNumber", "ViewPosition")


def _read(path: Path, minus_one: float | None) -> tuple[pl.DataFrame, pl.DataFrame]:
    df = read_table(path, ID_COLUMNS, what="the brax adapter (BRAX master_spreadsheet_update.csv)")
    by_key = {class_key(c): c for c in df.columns}
    missing = [c for c in CHEXPERT_CLASSES if class_key(c) not in by_key]
    if missing:
        raise ChxError(f"{path}: missing label column(s) {', '.join(map(repr, missing))}; BRAX's table "
                       f"has {', '.join(ID_COLUMNS)} and the 14 CheXpert labels")
    columns = [by_key[class_key(c)] for c in CHEXPERT_CLASSES]
    labels = parse_labels(df, columns, path, minus_one=minus_one).rename(dict(zip(columns, CHEXPERT_CLASSES)))
    return df.select([pl.col(c).str.strip_chars() for c in ID_COLUMNS]), labels


def prepare(sources: list[Path], classes: list[str] | None, images: Path | None = None,
            only_existing: bool = False, *, uncertain: str = "ignore", notes: Notes | None = None,
            **options) -> pl.DataFrame:
    """BRAX master spreadsheet -> manifest, one row per image (see the module docstring)."""
    reject_options(NAME, options)
    minus_one = uncertain_value(uncertain)
    paths = expand_sources(sources, ["master_spreadsheet*.csv", "master_spreadsheet*.csv.gz"],
                           what="BRAX's master_spreadsheet_update.csv (or the folder holding it)")
    read = [_read(p, minus_one) for p in paths]
    df = pl.concat([d for d, _ in read])
    ids = df.select(
        pl.col("PngPath").str.replace_all(r"\\", "/").str.replace(r"\.[^./]*$", "").alias("image_id"),
        pl.col("AccessionNumber").alias("study_id"), pl.col("PatientID").alias("subject_id"),
        pl.col("PngPath").alias("path"),
    ).with_columns(map_views(df["ViewPosition"], notes, column="ViewPosition").alias("view"))
    return finish(ids, pl.concat([lab for _, lab in read]), classes, {}, dataset=NAME,
                  source=", ".join(map(str, paths)), images=images, only_existing=only_existing,
                  notes=notes)
