"""Your own table: any CSV (``.csv``, ``.csv.gz``) or Parquet file with one row per image, for a
hospital's or a lab's data. Options name its columns.

Source: one or more tables with the same columns (a folder is searched for ``*.csv``,
``*.csv.gz`` and ``*.parquet``). Columns: ``--path-col`` (the image file, relative to ``--images``;
default ``path``), ``--study-col`` (default ``study_id``), ``--patient-col`` (default
``patient_id``), optionally ``--view-col``, and the labels: ``--label-cols`` (repeat it, or give a
comma-separated list; default: every remaining column).

Mapping:
- image_id = the path without its suffix (paths are unique, so ids are); path as given;
  study_id, subject_id from their columns (an empty one is an error naming the row).
- view: ``--view-col`` through :mod:`chx.data.views` (PA, AP, LATERAL, LL; L, LAT, RL -> LATERAL;
  anything else OTHER, the count noted). Without it, and with ``--images``, each DICOM file's header
  ViewPosition is read (pydicom, ``stop_before_pixels``) and mapped the same way; files that are
  not DICOM, missing or unreadable are OTHER (noted). Without either, every view is OTHER (noted).
- labels: 1, 0 (also 1.0, 0.0) or blank (null), and the strings of ``--positive`` / ``--negative``
  (case and surrounding spaces ignored, e.g. ``--positive yes --negative no``). Anything else is an
  error naming the file, row, column and value. Labels may be per image: each study takes the
  per-class max over its images (1 if any is 1, else 0 if any is 0), and the studies whose images
  disagreed are counted in a note. The default class list is the table's ("data").

Counts (pinned by tests/test_adapters_table.py on tables in this format): 8 images, 4 studies
(4 multi-view), 3 patients; views PA 3, AP 1, LATERAL 3, OTHER 1 (oblique); with yes/no strings,
Effusion positive on 6 images after the per-study max (2 studies' images disagreed), 2 null. From
DICOM headers: PA, LL and AP read from 3 files; a PNG and a truncated .dcm are OTHER.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from chx.data.adapters.common import (AdapterOption, Notes, expand_sources, finish, map_views, note,
                                      read_table, reject_options)
from chx.data.manifest import LABEL_DTYPE
from chx.errors import ChxError

NAME = "table"
OPTIONS = (
    AdapterOption("path_col", str, "path", "column with each image's file (relative to --images).",
                  metavar="COL"),
    AdapterOption("study_col", str, "study_id", "column with each image's study (exam) id.", metavar="COL"),
    AdapterOption("patient_col", str, "patient_id", "column with each image's patient id.", metavar="COL"),
    AdapterOption("view_col", str, None, "column with each image's view (PA, AP, L, LATERAL, LL, ...).",
                  metavar="COL", default_text="none: the DICOM header's ViewPosition with --images"),
    AdapterOption("label_cols", str, (), "label column(s); repeat, or separate with commas.",
                  multiple=True, metavar="COLS", default_text="every remaining column"),
    AdapterOption("positive", str, (), "a label string meaning positive (besides 1); repeatable.",
                  multiple=True, metavar="TEXT", default_text="1"),
    AdapterOption("negative", str, (), "a label string meaning negative (besides 0); repeatable.",
                  multiple=True, metavar="TEXT", default_text="0"),
)


def _split_names(values) -> list[str]:
    return [n.strip() for v in values for n in str(v).split(",") if n.strip()]


def _labels(df: pl.DataFrame, columns: list[str], source: Path, positive: list[str],
            negative: list[str]) -> pl.DataFrame:
    """Label strings -> Float32 1/0/null; ChxError naming the first value that is none of these."""
    words = {**{w.casefold(): 1.0 for w in positive}, **{w.casefold(): 0.0 for w in negative}}
    out = []
    for c in columns:
        raw = df[c].cast(pl.Utf8).str.strip_chars().replace("", None)
        value = pl.select(pl.coalesce(raw.str.to_lowercase().replace_strict(words, default=None,
                                                                           return_dtype=pl.Float64),
                                      raw.cast(pl.Float64, strict=False))).to_series()
        bad = (raw.is_not_null() & (value.is_null() | ~value.is_in([0.0, 1.0]))).fill_null(False)
        if bad.any():
            row = int(bad.arg_true()[0])
            extra = "".join(f", {w!r}" for w in (*positive, *negative))
            raise ChxError(f"{source}: data row {row + 1}, column {c!r}: label {df[c][row]!r} is not 1, 0, "
                           f"empty{extra}; name the strings that mean yes/no with --positive/--negative, "
                           f"or the label columns with --label-cols")
        out.append(value.cast(LABEL_DTYPE).alias(c))
    return pl.DataFrame(out)


def _dicom_views(root: Path, notes: Notes | None):
    """A ``located`` step for :func:`finish`: each DICOM file's ViewPosition as the view."""
    from chx.data.images import dicom_tags, is_dicom

    def views(df: pl.DataFrame) -> pl.DataFrame:
        native, read, failed = [], 0, []
        for rel in df["path"]:
            file = root / rel
            if not (file.is_file() and is_dicom(file)):
                native.append(None)
                continue
            tags = dicom_tags(file, "ViewPosition")
            if tags is None:   # an unreadable header: OTHER, counted below (pixels are read later)
                native.append(None)
                failed.append(rel)
            else:
                native.append(tags["ViewPosition"])
                read += 1
        note(notes, f"view: images whose DICOM header gave the ViewPosition: {read:,}; not DICOM files "
                    f"under {root}, or unreadable: {df.height - read:,}"
                    + (f" (first unreadable: {failed[0]})" if failed else ""))
        views = map_views(pl.Series(native, dtype=pl.Utf8), notes, column="view")
        return df.with_columns(views.alias("view"))
    return views


def prepare(sources: list[Path], classes: list[str] | None, images: Path | None = None,
            only_existing: bool = False, *, path_col: str = "path", study_col: str = "study_id",
            patient_col: str = "patient_id", view_col: str | None = None, label_cols=(),
            positive=(), negative=(), notes: Notes | None = None, **options) -> pl.DataFrame:
    """Any CSV/Parquet table -> manifest, one row per image (see the module docstring)."""
    reject_options(NAME, options)
    paths = expand_sources(sources, ["*.csv", "*.csv.gz", "*.parquet"], what="a CSV or Parquet table")
    wanted = _split_names(label_cols)
    id_cols = [path_col, study_col, patient_col, *([view_col] if view_col else [])]
    what = f"the table adapter (--path-col {path_col}, --study-col {study_col}, --patient-col {patient_col})"
    frames = [read_table(p, [*id_cols, *wanted], what=what) for p in paths]
    columns = wanted or [c for c in frames[0].columns if c not in id_cols]
    if not columns:
        raise ChxError(f"{paths[0]}: no label columns besides {', '.join(id_cols)}; name them with "
                       f"--label-cols")
    native = pl.concat([_labels(f, columns, p, _split_names(positive), _split_names(negative))
                        for f, p in zip(frames, paths)], how="diagonal")
    df = pl.concat([f.select(id_cols) for f in frames])
    path = pl.col(path_col).str.strip_chars().str.replace_all(r"\\", "/")
    ids = df.select(path.str.replace(r"\.[^./]*$", "").alias("image_id"),
                    pl.col(study_col).str.strip_chars().alias("study_id"),
                    pl.col(patient_col).str.strip_chars().alias("subject_id"), path.alias("path"))
    located = None
    if view_col:
        ids = ids.with_columns(map_views(df[view_col], notes, column=view_col).alias("view"))
    else:
        ids = ids.with_columns(pl.lit("OTHER").alias("view"))
        if images is None:
            note(notes, "view: no --view-col and no --images: every view is OTHER; give --view-col, "
                        "or --images to read DICOM headers")
        else:
            located = _dicom_views(Path(images), notes)
    return finish(ids, native, classes, {}, dataset=NAME, source=", ".join(map(str, paths)),
                  images=images, only_existing=only_existing, notes=notes, located=located)
