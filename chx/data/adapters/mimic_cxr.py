"""MIMIC-CXR-JPG v2 (Johnson et al., PhysioNet 2019; credentialed access), from its own CSVs.

Source: the label table ``mimic-cxr-2.0.0-chexpert.csv(.gz)`` or ``-negbio.csv(.gz)`` (one row
per study: ``subject_id``, ``study_id`` and the 14 CheXpert labels, 1.0 / 0.0 / -1.0 uncertain /
blank not mentioned), the image table ``mimic-cxr-2.0.0-metadata.csv(.gz)`` (one row per image:
``dicom_id``, ``subject_id``, ``study_id``, ``ViewPosition``, ...) and optionally the official split
``mimic-cxr-2.0.0-split.csv(.gz)`` (``dicom_id``, ..., ``split``). Files are told apart by their
columns; a folder is searched for ``mimic-cxr-2.0.0-*.csv(.gz)`` (holding both label tables, it
uses -chexpert, noted).

Mapping:
- One row per image of the metadata: image_id = dicom_id; study_id, subject_id as given;
  path = ``files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg`` (the JPG release's
  layout; ``--images`` resolves it under the release root or a folder above or below it).
- Labels are per study: each image takes the label row of its (subject_id, study_id). A study
  without a label row gets no invented labels: its images are dropped, and the count noted; so are
  label rows without any image. A study listed twice in the label table is an error.
- values: blank -> null, 1.0 / 0.0 as is, -1.0 by ``--uncertain`` as for chexpert (ignore -> null,
  ones -> 1, zeros -> 0). The 14 names are CXR-LT classes; the other 12 CXR-LT classes are null.
- view: ViewPosition through :mod:`chx.data.views` (PA, AP, LATERAL, LL; XTABLE LATERAL ->
  LATERAL; blank, LAO, RAO, SWIMMERS, AP AXIAL, LLD/RLD ... -> OTHER, the count noted).
- split: the official one (train, validate -> val, test); images missing from the split table are
  unassigned (noted). Without a split table, split is null.

Counts (pinned by tests/test_adapters_mimic.py on a table in this format): 9 metadata images of
6 studies; 1 study (2 images) without a label row dropped, 1 label row without images; 7 images,
5 studies (2 multi-view), 3 patients; views PA 2, AP 1, LATERAL 2, LL 1, OTHER 1 (blank).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from chx.data.adapters.chexpert import CHEXPERT_CLASSES
from chx.data.adapters.common import (UNCERTAIN, Notes, expand_sources, finish, map_views, note,
                                      parse_labels, read_table, reject_options, table_columns,
                                      uncertain_value)
from chx.errors import ChxError

NAME = "mimic-cxr"
OPTIONS = (UNCERTAIN,)
KEYS = ("subject_id", "study_id")
META_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition")
SPLIT_COLUMNS = ("dicom_id", "split")
SPLITS = {"train": "train", "validate": "val", "test": "test"}


def _sort_sources(sources: list[Path], notes: Notes | None) -> tuple[Path, Path, Path | None]:
    """(labels, metadata, split or None), told apart by their header."""
    files = expand_sources(sources, ["mimic-cxr-2.0.0-*.csv", "mimic-cxr-2.0.0-*.csv.gz"],
                           what="MIMIC-CXR-JPG's mimic-cxr-2.0.0-chexpert (or -negbio), -metadata and "
                                "optionally -split CSVs (or the folder holding them)")
    kinds: dict[str, list[Path]] = {"labels": [], "metadata": [], "split": []}
    for f in files:
        cols = set(table_columns(f))
        if "ViewPosition" in cols and "dicom_id" in cols:
            kinds["metadata"].append(f)
        elif "split" in cols and "dicom_id" in cols:
            kinds["split"].append(f)
        elif set(KEYS) <= cols and set(CHEXPERT_CLASSES) & cols:
            kinds["labels"].append(f)
    chexpert = [f for f in kinds["labels"] if "chexpert" in f.name]
    if len(kinds["labels"]) == 2 and len(chexpert) == 1:   # a release folder holds both labellers'
        other = next(f for f in kinds["labels"] if f not in chexpert)
        note(notes, f"labels: using {chexpert[0].name}; give {other.name} (with the metadata) "
                    f"instead of the folder to use it")
        kinds["labels"] = chexpert
    if len(kinds["labels"]) != 1 or len(kinds["metadata"]) != 1 or len(kinds["split"]) > 1:
        raise ChxError(f"mimic-cxr needs one label table (-chexpert or -negbio: subject_id, study_id, "
                       f"the 14 labels), one -metadata table (dicom_id, ViewPosition, ...) and at most "
                       f"one -split table; found {len(kinds['labels'])}, {len(kinds['metadata'])} and "
                       f"{len(kinds['split'])} among {', '.join(map(str, files))}")
    return kinds["labels"][0], kinds["metadata"][0], (kinds["split"] or [None])[0]


def _labels(path: Path, minus_one: float | None) -> pl.DataFrame:
    """One row per study: the keys and the 14 labels (Float32, null = not mentioned)."""
    df = read_table(path, (*KEYS, *CHEXPERT_CLASSES),
                    what="the mimic-cxr adapter (mimic-cxr-2.0.0-chexpert.csv or -negbio.csv)")
    keys = df.select([pl.col(c).str.strip_chars() for c in KEYS])
    dup = keys.is_duplicated()
    if dup.any():
        rows = [int(i) + 1 for i in dup.arg_true()[:2]]
        raise ChxError(f"{path}: data rows {rows[0]} and {rows[1]}: study {keys['study_id'][rows[0] - 1]} "
                       f"is listed twice; a label table has one row per study")
    return pl.concat([keys, parse_labels(df, CHEXPERT_CLASSES, path, minus_one=minus_one)],
                     how="horizontal")


def _split(path: Path) -> pl.DataFrame:
    df = read_table(path, SPLIT_COLUMNS, what="the mimic-cxr adapter (mimic-cxr-2.0.0-split.csv)")
    df = df.select(pl.col("dicom_id").str.strip_chars(), pl.col("split").str.strip_chars())
    bad = ~df["split"].is_in(list(SPLITS))
    if bad.any():
        row = int(bad.arg_true()[0])
        raise ChxError(f"{path}: data row {row + 1}, column 'split': {df['split'][row]!r} is not one of "
                       f"{', '.join(SPLITS)}")
    return df.select("dicom_id", pl.col("split").replace_strict(SPLITS))


def prepare(sources: list[Path], classes: list[str] | None, images: Path | None = None,
            only_existing: bool = False, *, uncertain: str = "ignore", notes: Notes | None = None,
            **options) -> pl.DataFrame:
    """MIMIC-CXR-JPG label + metadata (+ split) tables -> manifest (see the module docstring)."""
    reject_options(NAME, options)
    minus_one = uncertain_value(uncertain)
    label_file, meta_file, split_file = _sort_sources(list(sources), notes)
    labels = _labels(label_file, minus_one)
    meta = read_table(meta_file, META_COLUMNS, what="the mimic-cxr adapter (mimic-cxr-2.0.0-metadata.csv)")
    meta = meta.select([pl.col(c).str.strip_chars() for c in META_COLUMNS])

    unlabelled = meta.join(labels.select(KEYS), on=list(KEYS), how="anti")
    if unlabelled.height:
        note(notes, f"labels: studies without a row in {label_file.name}: "
                    f"{unlabelled.select(KEYS).n_unique():,} ({unlabelled.height:,} images), dropped "
                    f"(no invented labels)")
    imageless = labels.join(meta.select(KEYS), on=list(KEYS), how="anti").height
    if imageless:
        note(notes, f"labels: rows of {label_file.name} without an image in {meta_file.name}: "
                    f"{imageless:,}, not used")
    df = meta.join(labels, on=list(KEYS), how="inner", maintain_order="left")
    if df.height == 0:
        raise ChxError(f"{meta_file}: no image belongs to a study of {label_file} (subject_id, study_id); "
                       f"give the label and metadata tables of the same release")

    if split_file is not None:
        df = df.join(_split(split_file), on="dicom_id", how="left", maintain_order="left")
        unsplit = int(df["split"].is_null().sum())
        if unsplit:
            note(notes, f"split: images not in {split_file.name}: {unsplit:,}, left unassigned")
    subject, study = pl.col("subject_id"), pl.col("study_id")
    path = pl.concat_str([pl.lit("files/p"), subject.str.slice(0, 2), pl.lit("/p"), subject,
                          pl.lit("/s"), study, pl.lit("/"), pl.col("dicom_id"), pl.lit(".jpg")])
    ids = df.select(pl.col("dicom_id").alias("image_id"), "study_id", "subject_id", path.alias("path"),
                    *(["split"] if split_file is not None else [])
                    ).with_columns(map_views(df["ViewPosition"], notes, column="ViewPosition").alias("view"))
    return finish(ids, df.select(CHEXPERT_CLASSES), classes, {}, dataset=NAME,
                  source=f"{label_file}, {meta_file}", images=images, only_existing=only_existing,
                  per_study=False, notes=notes)
