"""IU X-ray / Open-i (Demner-Fushman et al., JAMIA 2016; Indiana University via NLM Open-i).

Source: a folder holding ``indiana_reports.csv`` and ``indiana_projections.csv``, or the two files
(told apart by their columns). Reports: one row per study, ``uid`` and ``MeSH`` (findings joined
by ';', each ``Finding/modifier/...``, e.g. ``Opacity/lung/base/left``; 'normal' = no finding,
'No Indexing' = not indexed). Projections: ``uid``, ``filename``, ``projection`` (Frontal/Lateral).

Mapping:
- One row per image (the projections table, joined to its report): study_id = subject_id = uid,
  because IU gives no patient id beyond the report (a patient with two reports counts twice);
  image_id = filename stem (``1_IM-0001-4001.dcm``); path = filename. Images are optional.
- view: Frontal -> PA (IU studies are outpatient PA + lateral pairs), then through
  :mod:`chx.data.views` (Lateral -> LATERAL; anything else OTHER, noted).
- Labels are per report (``MeSH``; the shorter ``Problems`` column is not used). A term's finding
  is the text before its first '/', matched by class key (case, spacing: 'Subcutaneous  Emphysema'
  and 'Subcutaneous Emphysema' are one class). 'normal' -> No Finding 1, every other class 0;
  'No Indexing' -> the whole study null.
- ``classes=None``: every MeSH finding is a class (spelt as most often in the data), plus
  No Finding; a study lacking a finding is 0.
- Onto CXR-LT, by :data:`CXR_LT_RULES` (CXR-LT class <- MeSH finding [with a modifier]):
  Atelectasis <- Pulmonary Atelectasis; Calcification of the Aorta <- Calcinosis/aorta...,
  Atherosclerosis/aorta... (on a radiograph aortic atherosclerosis is seen as calcification);
  Cardiomegaly <- Cardiomegaly, Cardiac Shadow/enlarged; Consolidation; Edema <- Pulmonary Edema;
  Emphysema <- Emphysema, Pulmonary Emphysema, Bullous Emphysema; Fibrosis <- Pulmonary Fibrosis,
  Fibrosis; Fracture <- Fractures, Bone; Hernia <- Hernia, Hiatal, Hernia, Diaphragmatic;
  Infiltration <- Infiltrate; Lung Opacity <- Opacity, Airspace Disease; Mass; Nodule;
  Pleural Effusion; Pleural Thickening <- Thickening/pleura...; Pneumonia; Pneumoperitoneum;
  Pneumothorax <- Pneumothorax, Hydropneumothorax, Hemopneumothorax; Subcutaneous Emphysema;
  Support Devices <- Catheters, Indwelling, Tube, Inserted, Implanted Medical Device, Medical Device,
  Stents, Surgical Instruments; Tortuous Aorta <- Aorta/tortuous, Aorta, Thoracic/tortuous;
  No Finding <- normal. For these a study without the term is 0 (a report-level negative).
  Enlarged Cardiomediastinum, Lung Lesion, Pleural Other and Pneumomediastinum cannot be read off
  the MeSH terms and are null. Other target lists match MeSH findings by name.

Counts (shared copy, pinned by tests/test_adapters.py): 3,851 reports; 7,466 images (PA 3,818,
LATERAL 3,648) of 3,851 studies, 3,405 of them with more than one image; 92 'No Indexing'
studies (172 images, all classes null). Onto CXR-LT, positive images: No Finding 2,695,
Cardiomegaly 693, Lung Opacity 979, Pleural Effusion 286, Calcification of the Aorta 390,
Tortuous Aorta 453. With classes=None: 117 classes (116 MeSH findings + No Finding).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from chx.data.adapters.common import (Notes, expand_sources, finish, map_views, read_table,
                                      reject_options, table_columns)
from chx.data.classes import class_key
from chx.errors import ChxError

NAME = "iu-xray"
REPORT_COLUMNS = ("uid", "MeSH")
PROJECTION_COLUMNS = ("uid", "filename", "projection")
NORMAL, NOT_INDEXED, NO_FINDING = "normal", "no indexing", "No Finding"

# (CXR-LT class, MeSH finding, modifier prefix or None): a term counts for the class when its
# finding matches (by class key) and, if a prefix is given, one of its modifiers starts with it.
CXR_LT_RULES: tuple[tuple[str, str, str | None], ...] = (
    ("Atelectasis", "Pulmonary Atelectasis", None),
    ("Calcification of the Aorta", "Calcinosis", "aorta"),
    ("Calcification of the Aorta", "Atherosclerosis", "aorta"),
    ("Cardiomegaly", "Cardiomegaly", None),
    ("Cardiomegaly", "Cardiac Shadow", "enlarged"),
    ("Consolidation", "Consolidation", None),
    ("Edema", "Pulmonary Edema", None),
    ("Emphysema", "Emphysema", None),
    ("Emphysema", "Pulmonary Emphysema", None),
    ("Emphysema", "Bullous Emphysema", None),
    ("Fibrosis", "Pulmonary Fibrosis", None),
    ("Fibrosis", "Fibrosis", None),
    ("Fracture", "Fractures, Bone", None),
    ("Hernia", "Hernia, Hiatal", None),
    ("Hernia", "Hernia, Diaphragmatic", None),
    ("Infiltration", "Infiltrate", None),
    ("Lung Opacity", "Opacity", None),
    ("Lung Opacity", "Airspace Disease", None),
    ("Mass", "Mass", None),
    ("Nodule", "Nodule", None),
    ("Pleural Effusion", "Pleural Effusion", None),
    ("Pleural Thickening", "Thickening", "pleura"),
    ("Pneumonia", "Pneumonia", None),
    ("Pneumoperitoneum", "Pneumoperitoneum", None),
    ("Pneumothorax", "Pneumothorax", None),
    ("Pneumothorax", "Hydropneumothorax", None),
    ("Pneumothorax", "Hemopneumothorax", None),
    ("Subcutaneous Emphysema", "Subcutaneous Emphysema", None),
    ("Support Devices", "Catheters, Indwelling", None),
    ("Support Devices", "Tube, Inserted", None),
    ("Support Devices", "Implanted Medical Device", None),
    ("Support Devices", "Medical Device", None),
    ("Support Devices", "Stents", None),
    ("Support Devices", "Surgical Instruments", None),
    ("Tortuous Aorta", "Aorta", "tortuous"),
    ("Tortuous Aorta", "Aorta, Thoracic", "tortuous"),
)


def _split_sources(sources: list[Path]) -> tuple[Path, Path]:
    files = expand_sources(sources, ["*.csv", "*.csv.gz"],
                           what="IU X-ray's indiana_reports.csv and indiana_projections.csv "
                                "(or the folder holding them)")
    reports = [f for f in files if "MeSH" in table_columns(f)]
    projections = [f for f in files if "projection" in table_columns(f)]
    if len(reports) != 1 or len(projections) != 1:
        raise ChxError(f"iu-xray needs one reports table (columns {', '.join(REPORT_COLUMNS)}) and one "
                       f"projections table (columns {', '.join(PROJECTION_COLUMNS)}); found "
                       f"{len(reports)} and {len(projections)} among {', '.join(map(str, files))}")
    return reports[0], projections[0]


def _terms(reports: pl.DataFrame) -> pl.DataFrame:
    """One row per (uid, MeSH term): finding, its class key, and lower-cased modifiers."""
    terms = (reports.select("uid", pl.col("MeSH").fill_null("").str.split(";").alias("term"))
             .explode("term").with_columns(pl.col("term").str.strip_chars())
             .filter(pl.col("term") != ""))
    parts = pl.col("term").str.split("/").list.eval(pl.element().str.strip_chars())
    return terms.select(
        "uid",
        parts.list.first().str.replace_all(r"\s+", " ").alias("finding"),
        parts.list.first().str.replace_all(r"_", " ").str.replace_all(r"\s+", " ").str.to_lowercase()
        .alias("key"),
        parts.list.slice(1).list.eval(pl.element().str.to_lowercase()).alias("mods"))


def _rule_hits(terms: pl.DataFrame) -> pl.DataFrame:
    """(uid, class) for every term that a CXR-LT rule maps onto a CXR-LT class."""
    frames = []
    for target, finding, prefix in CXR_LT_RULES:
        hit = pl.col("key") == class_key(finding)
        if prefix is not None:
            hit = hit & pl.col("mods").list.eval(pl.element().str.starts_with(prefix)).list.any()
        frames.append(terms.filter(hit).select("uid", pl.lit(target).alias("class")))
    return pl.concat(frames)


def prepare(sources: list[Path], classes: list[str] | None, images: Path | None = None,
            only_existing: bool = False, *, notes: Notes | None = None, **options) -> pl.DataFrame:
    """IU X-ray reports + projections -> manifest, one row per image (see the module docstring)."""
    reject_options(NAME, options)
    report_file, projection_file = _split_sources(list(sources))
    reports = read_table(report_file, REPORT_COLUMNS, what="the iu-xray adapter (indiana_reports.csv)")
    projections = read_table(projection_file, PROJECTION_COLUMNS,
                             what="the iu-xray adapter (indiana_projections.csv)")
    reports = reports.with_columns(pl.col("uid").str.strip_chars())
    terms = _terms(reports)
    unindexed = set(terms.filter(pl.col("key") == NOT_INDEXED)["uid"].to_list())
    terms = terms.filter(pl.col("key") != NOT_INDEXED)

    # The dataset's own classes: one per finding key, spelt as most often in the data.
    spelling = (terms.filter(pl.col("key") != NORMAL).group_by("key", "finding").len()
                .sort(["len", "finding"], descending=[True, False]).unique("key", keep="first"))
    own = terms.join(spelling.select("key", pl.col("finding").alias("class")), on="key", how="inner")
    hits = own.select("uid", "class")
    names = sorted(spelling["finding"].to_list(), key=str.casefold)
    if classes is not None:
        # The CXR-LT rules first; MeSH findings by their own names for anything else the target asks.
        derived = _rule_hits(terms)
        derived_keys = {class_key(t) for t, _, _ in CXR_LT_RULES}
        shadowed = [n for n in names if class_key(n) in derived_keys]
        hits = pl.concat([derived, hits.filter(~pl.col("class").is_in(shadowed))])
        names = [*dict.fromkeys(t for t, _, _ in CXR_LT_RULES),
                 *[n for n in names if class_key(n) not in derived_keys]]
    normal = terms.filter(pl.col("key") == NORMAL).select("uid", pl.lit(NO_FINDING).alias("class"))
    names = [NO_FINDING, *[n for n in names if class_key(n) != class_key(NO_FINDING)]]
    per_study = (pl.concat([hits, normal]).group_by("uid").agg(pl.col("class").unique().alias("__c")))

    df = (projections.select([pl.col(c).str.strip_chars() for c in PROJECTION_COLUMNS])
          .join(reports.select("uid"), on="uid", how="inner", maintain_order="left")
          .join(per_study, on="uid", how="left", maintain_order="left"))
    if df.height == 0:
        raise ChxError(f"{projection_file}: no image belongs to a report in {report_file} (uid)")
    null_study = pl.col("uid").is_in(list(unindexed))
    native = df.select([
        pl.when(null_study).then(None)
        .otherwise(pl.col("__c").fill_null([]).list.contains(n).cast(pl.Float32)).alias(n)
        for n in names])
    stem = pl.col("filename").str.replace(r"\.[^.]*$", "")
    # IU's "Frontal" names no view; its frontal images are PA (see the module docstring).
    projection = df["projection"].str.replace(r"(?i)^\s*frontal\s*$", "PA")
    ids = df.select(
        stem.alias("image_id"), pl.col("uid").alias("study_id"), pl.col("uid").alias("subject_id"),
        pl.col("filename").alias("path")
    ).with_columns(map_views(projection, notes, column="projection").alias("view"))
    return finish(ids, native, classes, {}, dataset=NAME,
                  source=f"{report_file}, {projection_file}", images=images,
                  only_existing=only_existing, per_study=False, notes=notes)
