"""COVID-19 image data collection (Cohen, Morrison, Dao, arXiv 2003.11597; ieee8023/
covid-chestxray-dataset).

Source: ``metadata.csv`` (a folder is searched for it): one row per image with ``patientid``,
``offset`` (days since first presentation, often blank), ``finding`` (a diagnosis, several joined
by ', '), ``view``, ``modality`` and ``filename``.

Mapping:
- X-ray rows only (``modality``); CT rows are skipped.
- subject_id = patientid; a study is patient + day: study_id = ``p<patientid>_d<offset>``, a blank
  offset being its own value ``NA`` (e.g. ``p5_dNA``).
- image_id = filename stem; path = filename (``--images`` finds it under ``images/``). The
  collection lists some files twice under two patient ids (the same Eurorad case entered twice:
  patients 285/339 and 287/340 share 5 files in this copy). Patients that share a file are one
  patient (every row of the later id takes the first id), and a file listed again is dropped (its
  first row kept), so the same image can never sit in two splits.
- view: through :mod:`chx.data.views`: PA; AP and AP Supine -> AP; L -> LATERAL; blank and '?'
  -> OTHER.
- finding split on ', ' into classes; 'todo' (not yet labelled) -> every class null (unlabelled
  data, e.g. for pseudo labels); otherwise the named classes 1 and all others 0 ('No Finding' is
  a class like the rest). The default class list is the data's ("data"): the sorted findings seen,
  'todo' excluded. Onto another list (e.g. CXR-LT) only No Finding maps: the collection's
  'Pneumonia' is a diagnosis of unstated cause while COVID-19, bacterial and viral rows are
  pneumonias too, so a 0 there would be false; it is left null (on any given class list: use
  the default "data" to keep it).
- All images of a study carry the same finding in this table (checked); a table where they do not
  would be combined per study (1 if any image is 1, else 0 if any is 0, else null).

Counts (shared test copy, pinned by tests/test_adapters.py): 396 X-ray images, 328 studies
(58 with more than one image), 198 patients, 391 distinct files (all found under ``images/``);
14 classes; COVID-19 217, ARDS 13, No Finding 12; 78 'todo' images with all classes null; views
PA 194, AP 120, LATERAL 43, OTHER 39.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from chx.data.adapters.common import (Notes, expand_sources, finish, map_views, read_table,
                                      reject_options)

NAME = "covid"
COLUMNS = ("patientid", "offset", "finding", "view", "modality", "filename")
UNLABELLED = "todo"
SYNONYMS: dict[str, str | None] = {"Pneumonia": None}


def prepare(sources: list[Path], classes: list[str] | None, images: Path | None = None,
            only_existing: bool = False, *, notes: Notes | None = None, **options) -> pl.DataFrame:
    """covid-chestxray-dataset metadata.csv -> manifest (see the module docstring)."""
    reject_options(NAME, options)
    paths = expand_sources(sources, ["metadata.csv"],
                           what="the collection's metadata.csv (or the folder holding it)")
    df = pl.concat([read_table(p, COLUMNS, what="the covid adapter (covid-chestxray-dataset "
                                                "metadata.csv)") for p in paths], how="diagonal")
    df = df.filter(pl.col("modality").str.strip_chars().str.to_lowercase() == "x-ray")
    # Patients sharing a file are the same patient: map each to the first id listing that file.
    fname = pl.col("filename").str.strip_chars()
    shared = (df.with_row_index("__row")
              .with_columns(fname.alias("__file"), pl.col("patientid").str.strip_chars().alias("__pid"))
              .filter(pl.col("__file").is_duplicated())
              .with_columns(pl.col("__pid").first().over("__file", order_by="__row").alias("__alias"))
              .select("__pid", "__alias").filter(pl.col("__pid") != pl.col("__alias"))
              .unique("__pid", keep="first", maintain_order=True))
    df = (df.with_columns(pl.col("patientid").str.strip_chars())
          .join(shared, left_on="patientid", right_on="__pid", how="left", maintain_order="left")
          .with_columns(pl.coalesce("__alias", "patientid").alias("patientid")).drop("__alias")
          .unique(fname, keep="first", maintain_order=True))
    findings = (pl.col("finding").fill_null("").str.split(",")
                .list.eval(pl.element().str.strip_chars()).list.eval(pl.element().filter(pl.element() != "")))
    df = df.with_columns(findings.alias("__findings"))
    names = sorted(set(df.select(pl.col("__findings").explode())["__findings"].drop_nulls().to_list())
                   - {UNLABELLED}, key=str.casefold)
    unlabelled = pl.col("__findings").list.contains(UNLABELLED) | (pl.col("__findings").list.len() == 0)
    native = df.select([pl.when(unlabelled).then(None)
                        .otherwise(pl.col("__findings").list.contains(n).cast(pl.Float32)).alias(n)
                        for n in names])

    patient = pl.col("patientid").str.strip_chars()
    offset = pl.col("offset").str.strip_chars().replace("", None).fill_null("NA")
    filename = pl.col("filename").str.strip_chars()
    stem = filename.str.replace(r"\.[^.]*$", "")
    study = pl.concat_str([pl.lit("p"), patient, pl.lit("_d"), offset])
    ids = df.select(
        stem.alias("image_id"),
        study.alias("study_id"), patient.alias("subject_id"), filename.alias("path")
    ).with_columns(map_views(df["view"], notes, column="view").alias("view"))
    return finish(ids, native, classes, SYNONYMS, dataset=NAME, source=", ".join(map(str, paths)),
                  images=images, only_existing=only_existing, notes=notes)
