"""NIH ChestX-ray14 (Wang et al., "ChestX-ray8", CVPR 2017; NIH Clinical Center, CC0).

Source: ``Data_Entry_2017.csv`` or ``Data_Entry_2017_v2020.csv`` (``.gz`` is fine; a folder is
searched for ``Data_Entry_2017*.csv*``): one row per image with ``Image Index`` (file name),
``Finding Labels`` ('|'-joined, or 'No Finding'), ``Patient ID`` and ``View Position`` (PA/AP).

Mapping:
- image_id = file stem, path = file name (``--images`` finds it under e.g. ``images_001/images/``);
  subject_id = Patient ID; each image is its own study (study_id = image_id: follow-ups are separate
  visits and NIH has no lateral views).
- All 14 findings and No Finding are annotated (0/1): 'No Finding' makes No Finding 1 and every
  finding 0. Onto CXR-LT: Effusion -> Pleural Effusion, Pleural_Thickening -> Pleural Thickening,
  the other 12 by name; the 11 CXR-LT classes NIH lacks (e.g. Support Devices, Fracture,
  Lung Opacity) are null. ``classes=None`` keeps NIH's own names.
- A label outside the 15 names is an error (naming the file and label), not silently dropped.

Counts (v2020 table, pinned by tests/test_adapters.py): 112,120 images, 30,805 patients,
No Finding 60,361, Infiltration 19,894, Effusion 13,317, Hernia 227; views PA 67,310, AP 44,810.
Restricted to the 1,000 images of ``nih-64px`` (``only_existing=True``): 1,000 images, 264 patients.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from chx.data.adapters.common import (Notes, expand_sources, finish, map_views, read_table,
                                      reject_options)
from chx.errors import ChxError

NAME = "nih"
COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "View Position")
NIH_CLASSES: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
    "Hernia", "Infiltration", "Mass", "No Finding", "Nodule", "Pleural_Thickening", "Pneumonia",
    "Pneumothorax",
)
SYNONYMS: dict[str, str | None] = {"Effusion": "Pleural Effusion",
                                   "Pleural_Thickening": "Pleural Thickening"}


def _read(path: Path) -> pl.DataFrame:
    df = read_table(path, COLUMNS, what="the nih adapter (NIH Data_Entry_2017.csv)")
    labels = pl.col("Finding Labels").str.split("|").list.eval(pl.element().str.strip_chars())
    seen = df.select(labels.alias("l")).explode("l")["l"].drop_nulls().unique()
    unknown = sorted(set(seen.to_list()) - set(NIH_CLASSES))
    if unknown:
        raise ChxError(f"{path}: unknown finding label(s) {', '.join(map(repr, unknown[:5]))} in "
                       f"'Finding Labels'; NIH labels are {', '.join(NIH_CLASSES)}")
    return df.with_columns(labels.alias("__labels"))


def prepare(sources: list[Path], classes: list[str] | None, images: Path | None = None,
            only_existing: bool = False, *, notes: Notes | None = None, **options) -> pl.DataFrame:
    """NIH Data_Entry table(s) -> manifest (see the module docstring)."""
    reject_options(NAME, options)
    paths = expand_sources(sources, ["Data_Entry_2017*.csv", "Data_Entry_2017*.csv.gz"],
                           what="NIH's Data_Entry_2017.csv (or the folder holding it)")
    df = pl.concat([_read(p) for p in paths])
    name = pl.col("Image Index").str.strip_chars()
    stem = name.str.replace(r"\.[^.]*$", "")
    ids = df.select(stem.alias("image_id"), stem.alias("study_id"),
                    pl.col("Patient ID").str.strip_chars().alias("subject_id"), name.alias("path"))
    ids = ids.with_columns(map_views(df["View Position"], notes, column="View Position").alias("view"))
    native = df.select([pl.col("__labels").list.contains(c).cast(pl.Float32).alias(c)
                        for c in NIH_CLASSES])
    return finish(ids, native, classes, SYNONYMS, dataset=NAME,
                  source=", ".join(map(str, paths)), images=images, only_existing=only_existing,
                  per_study=False, notes=notes)
