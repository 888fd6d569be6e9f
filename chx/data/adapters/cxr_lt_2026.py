"""CXR-LT 2026 challenge labels (Dong et al., "Overview of the CXR-LT 2026 challenge", ISBI 2026):
PadChest and NIH ChestX-ray14 images, 30 classes (:data:`chx.data.classes.CXR_LT_2026`).

Source: the challenge CSV(s) (``CXRLT_2026_training.csv`` and the like), in the format we know of:
one row per image with ``ImageID`` (the PNG's file name), ``StudyDate_DICOM``, ``PatientID`` and one
0/1 column per class. Read tolerantly: id columns are found whatever their case and punctuation
(``imageid``, ``Patient ID``); class columns are matched to the 30 by class key and renamed to their
list spelling; index columns (``Unnamed: 0``, ``index``) are skipped; a column that is none of these
is kept as an extra class when its values are 0/1/blank, and skipped otherwise: both are named in
a note, as are the 30 classes a CSV lacks (null). The CSV gives no view; also give PadChest's labels
CSV (``ImageDir``, ``StudyID``, ``Projection``) and/or NIH's ``Data_Entry_2017*.csv`` (``View
Position``) as sources and the views (and PadChest's studies and folders) are joined by ImageID.
Sources are told apart by their columns; a folder is searched for ``*.csv(.gz)``.

Mapping:
- image_id = ImageID without ``.png``; subject_id = PatientID; path = ImageID, or
  ``ImageDir/ImageID`` for a PadChest image when PadChest's table is given.
- study_id: the CSV's own ``StudyID`` column if it has one; else PadChest's StudyID for images in
  PadChest's table; else ``<PatientID>_<StudyDate_DICOM>`` (one patient's images of one day); an
  image without a date is its own study.
- view: a ``Projection`` / ``ViewPosition`` column of the CSV, else PadChest's Projection or NIH's
  View Position, through :mod:`chx.data.views` (PadChest's AP_horizontal -> AP, L -> LATERAL,
  COSTAL -> OTHER); an image found in neither table is OTHER (the count is noted).
- labels: 1, 0 (also 1.0, 0.0) or blank (null); anything else is an error naming the file, row and
  column. Should a study's images disagree, each study takes the per-class max (noted).

Counts (pinned by tests/test_adapters_cxr_lt_2026.py on tables in this format): 6 images of 3
patients (4 PadChest, 2 NIH), 4 studies (2 multi-view); with both tables the views are PA 3,
LATERAL 1, AP 1, OTHER 1 (COSTAL); without them all 6 are OTHER.
"""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl

from chx.data.adapters.common import (Notes, expand_sources, finish, map_views, note, parse_labels,
                                      read_table, reject_options, table_columns)
from chx.data.classes import CXR_LT_2026, class_key
from chx.errors import ChxError

NAME = "cxr-lt-2026"
SKIPPED = frozenset({"", "index", "unnamed0", "split", "fold", "path"})
VIEW_COLUMNS = ("projection", "viewposition")


def _norm(column: str) -> str:
    """Column name for tolerant matching: letters and digits only, case-folded."""
    return re.sub(r"[^0-9a-z]", "", column.casefold())


def _column(df: pl.DataFrame, *names: str) -> str | None:
    """The first column of ``df`` whose :func:`_norm` is one of ``names`` (already normalised)."""
    by_norm = {_norm(c): c for c in df.columns}
    return next((by_norm[n] for n in names if n in by_norm), None)


def _sort_sources(sources: list[Path]) -> tuple[list[Path], Path | None, Path | None]:
    """(challenge CSVs, PadChest table or None, NIH table or None), told apart by their header."""
    files = expand_sources(sources, ["*.csv", "*.csv.gz"],
                           what="the CXR-LT 2026 CSV(s), optionally with PadChest's labels CSV and "
                                "NIH's Data_Entry_2017.csv (or the folder holding them)")
    challenge, padchest, nih = [], [], []
    for f in files:
        cols = {_norm(c) for c in table_columns(f)}
        if "imageindex" in cols:
            nih.append(f)
        elif {"imageid", "imagedir", "labels"} <= cols:
            padchest.append(f)
        elif {"imageid", "patientid"} <= cols:
            challenge.append(f)
    if not challenge or len(padchest) > 1 or len(nih) > 1:
        raise ChxError(f"cxr-lt-2026 needs a challenge CSV (ImageID, PatientID, class columns) and at "
                       f"most one PadChest and one NIH table; found {len(challenge)}, {len(padchest)} "
                       f"and {len(nih)} among {', '.join(map(str, files))}")
    return challenge, (padchest or [None])[0], (nih or [None])[0]


def _read(path: Path, notes: Notes | None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(id columns image/patient/date/study/view, label columns named as in CXR_LT_2026)."""
    df = read_table(path, (), what="the cxr-lt-2026 adapter")
    image, patient = _column(df, "imageid"), _column(df, "patientid")
    if image is None or patient is None:
        raise ChxError(f"{path}: no {'ImageID' if image is None else 'PatientID'} column; a CXR-LT 2026 "
                       f"CSV has ImageID, StudyDate_DICOM, PatientID and one column per class (found: "
                       f"{', '.join(df.columns[:12])}{', ...' if df.width > 12 else ''})")
    date, study = _column(df, "studydatedicom", "studydate"), _column(df, "studyid")
    view = _column(df, *VIEW_COLUMNS)
    used = {c for c in (image, patient, date, study, view) if c}
    known = {class_key(c): c for c in CXR_LT_2026}
    rest = [c for c in df.columns if c not in used and _norm(c) not in SKIPPED]
    classes = {c: known[class_key(c)] for c in rest if class_key(c) in known}
    extra, skipped = [], []
    for c in (c for c in rest if c not in classes):
        raw = df[c].str.strip_chars().replace("", None)
        ok = raw.is_null() | raw.cast(pl.Float64, strict=False).is_in([0.0, 1.0]).fill_null(False)
        (extra if ok.all() else skipped).append(c)
    if extra:
        note(notes, f"{path.name}: column(s) {', '.join(extra)} are not CXR-LT 2026 classes; read as labels "
                    f"(kept with --classes data, or a list naming them)")
    if skipped:
        note(notes, f"{path.name}: column(s) {', '.join(skipped)} are neither ids nor 0/1 labels; skipped")
    lacking = [c for c in CXR_LT_2026 if c not in classes.values()]
    if lacking:
        note(notes, f"{path.name}: lacks {len(lacking)} of the 30 CXR-LT 2026 classes "
                    f"({', '.join(lacking[:5])}{', ...' if len(lacking) > 5 else ''}): null")
    labels = parse_labels(df, [*classes, *extra], path).rename(classes)
    ids = df.select(
        pl.col(image).str.strip_chars().alias("ImageID"), pl.col(patient).str.strip_chars().alias("patient"),
        (pl.col(date).str.strip_chars() if date else pl.lit(None, pl.Utf8)).alias("date"),
        (pl.col(study).str.strip_chars() if study else pl.lit(None, pl.Utf8)).alias("study"),
        (pl.col(view) if view else pl.lit(None, pl.Utf8)).alias("view"))
    return ids, labels


def _padchest(path: Path | None) -> pl.DataFrame:
    """ImageID -> PadChest's folder, study and Projection (an empty table without ``path``)."""
    schema = {"ImageID": pl.Utf8, "pc_dir": pl.Utf8, "pc_study": pl.Utf8, "pc_view": pl.Utf8}
    if path is None:
        return pl.DataFrame(schema=schema)
    df = read_table(path, ("ImageID", "ImageDir", "StudyID", "Projection"),
                    what="the cxr-lt-2026 adapter (PadChest's labels CSV, for views and studies)")
    columns = zip(("ImageID", "ImageDir", "StudyID", "Projection"), schema)
    return df.select([pl.col(c).str.strip_chars().alias(n) for c, n in columns]).unique("ImageID", keep="first")


def _nih(path: Path | None) -> pl.DataFrame:
    """ImageID -> NIH's View Position (an empty table without ``path``)."""
    schema = {"ImageID": pl.Utf8, "nih_view": pl.Utf8}
    if path is None:
        return pl.DataFrame(schema=schema)
    df = read_table(path, ("Image Index", "View Position"),
                    what="the cxr-lt-2026 adapter (NIH's Data_Entry_2017.csv, for views)")
    return df.select(pl.col("Image Index").str.strip_chars().alias("ImageID"),
                     pl.col("View Position").alias("nih_view")).unique("ImageID", keep="first")


def prepare(sources: list[Path], classes: list[str] | None, images: Path | None = None,
            only_existing: bool = False, *, notes: Notes | None = None, **options) -> pl.DataFrame:
    """CXR-LT 2026 CSV(s) (+ PadChest / NIH tables) -> manifest (see the module docstring)."""
    reject_options(NAME, options)
    challenge, padchest_file, nih_file = _sort_sources(list(sources))
    read = [_read(p, notes) for p in challenge]
    native = pl.concat([lab for _, lab in read], how="diagonal")
    df = (pl.concat([ids for ids, _ in read])
          .join(_padchest(padchest_file), on="ImageID", how="left", maintain_order="left")
          .join(_nih(nih_file), on="ImageID", how="left", maintain_order="left"))
    if padchest_file is None and nih_file is None and df["view"].is_null().all():
        note(notes, "views: the CSV has none; give PadChest's labels CSV and NIH's Data_Entry_2017.csv "
                    "as sources too to read them")
    alone = df.filter(pl.all_horizontal(pl.col("study", "pc_study", "date").is_null())).height
    if alone:
        note(notes, f"study: images without a StudyID or a study date, each its own study: {alone:,}")
    image_id = pl.col("ImageID").str.replace(r"(?i)\.png$", "")
    day = pl.concat_str([pl.col("patient"), pl.col("date")], separator="_")
    path = pl.when(pl.col("pc_dir").is_not_null()).then(
        pl.concat_str([pl.col("pc_dir"), pl.col("ImageID")], separator="/")).otherwise(pl.col("ImageID"))
    ids = df.select(image_id.alias("image_id"),
                    pl.coalesce("study", "pc_study", day, image_id).alias("study_id"),
                    pl.col("patient").alias("subject_id"), path.alias("path"))
    views = df.select(pl.coalesce("view", "pc_view", "nih_view"))["view"]
    ids = ids.with_columns(map_views(views, notes, column="view").alias("view"))
    return finish(ids, native, classes, {}, dataset=NAME, source=", ".join(map(str, challenge)),
                  images=images, only_existing=only_existing, notes=notes)
