"""CheXpert (Irvin et al., "CheXpert", AAAI 2019; Stanford research use agreement).

Source: ``train.csv`` and/or ``valid.csv`` of CheXpert-v1.0 or -v1.0-small (``.gz`` is fine; a
folder is searched for ``train.csv`` and ``valid.csv``): one row per image with ``Path`` (e.g.
``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``), ``Frontal/Lateral``,
``AP/PA`` and 14 labels: 1.0 positive, 0.0 negative, -1.0 uncertain, blank not mentioned.

Mapping:
- subject_id = ``patient00001``; study_id = ``patient00001/study1``; image_id = the path without
  its suffix and its leading dataset/split folders (``patient00001/study1/view1_frontal``; train and
  valid patients are disjoint, and the split folder is kept in front should ids collide);
  path = ``Path`` as given (``--images`` resolves it under any root).
- view: through :mod:`chx.data.views`: Lateral -> LATERAL; Frontal with AP/PA -> AP or PA;
  a frontal image whose AP/PA names no frontal view (LL 16, RL 1 in train) -> OTHER (noted).
- labels: blank -> null, 1.0/0.0 as is, -1.0 by option ``uncertain``: "ignore" (default, -1 ->
  null, as TorchXRayVision does), "ones" (-> 1) or "zeros" (-> 0). The 14 label names are CXR-LT
  classes; the other 12 CXR-LT classes are null.
- CheXpert's labels come from the study's report, so all images of a study carry the same labels:
  checked on the train table, 0 of 187,641 studies disagree. Should a table disagree, each study
  takes the per-class max over its images (1 if any image is 1, else 0 if any is 0, else null).

Counts (train table, pinned by tests/test_adapters.py): 223,414 images, 64,540 patients, 187,641
studies (33,994 with more than one image); views AP 161,590, PA 29,420, LATERAL 32,387,
OTHER 17. Cardiomegaly positives: 27,000 with "ignore" and "zeros", 35,087 with "ones";
negatives: 11,116 with "ignore" and "ones", 19,203 with "zeros".
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from chx.data.adapters.common import (UNCERTAIN, Notes, count_listing, expand_sources, finish, note,
                                      parse_labels, read_table, reject_options, uncertain_value)
from chx.data.views import FRONTAL_VIEWS, LATERAL_VIEWS, canonical_view_expr
from chx.errors import ChxError

NAME = "chexpert"
ID_COLUMNS = ("Path", "Frontal/Lateral", "AP/PA")
CHEXPERT_CLASSES: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)
OPTIONS = (UNCERTAIN,)


def _read(path: Path, minus_one: float | None) -> tuple[pl.DataFrame, pl.DataFrame]:
    df = read_table(path, (*ID_COLUMNS, *CHEXPERT_CLASSES),
                    what="the chexpert adapter (CheXpert train.csv / valid.csv)")
    parts = df["Path"].str.strip_chars().str.replace_all(r"\\", "/").str.split("/")
    # .../<split>/patientNNNNN/studyN/viewK_frontal.jpg: count from the end.
    bad = (parts.list.len() < 4) | ~parts.list.get(-3, null_on_oob=True).str.starts_with("patient")
    if bad.fill_null(True).any():
        row = int(bad.fill_null(True).arg_true()[0])
        raise ChxError(f"{path}: data row {row + 1}, column 'Path': {df['Path'][row]!r} is not "
                       f"like CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg")
    labels = parse_labels(df, CHEXPERT_CLASSES, path, minus_one=minus_one)
    return df.with_columns(parts.alias("__parts")), labels


def prepare(sources: list[Path], classes: list[str] | None, images: Path | None = None,
            only_existing: bool = False, *, uncertain: str = "ignore", notes: Notes | None = None,
            **options) -> pl.DataFrame:
    """CheXpert train.csv / valid.csv -> manifest (see the module docstring)."""
    reject_options(NAME, options)
    minus_one = uncertain_value(uncertain)
    paths = expand_sources(sources, ["train.csv", "valid.csv", "train.csv.gz", "valid.csv.gz"],
                           what="CheXpert's train.csv / valid.csv (or the folder holding them)")
    read = [_read(p, minus_one) for p in paths]
    df = pl.concat([d for d, _ in read], how="diagonal")
    native = pl.concat([lab for _, lab in read])

    parts = pl.col("__parts")
    patient, study = parts.list.get(-3), parts.list.get(-2)
    view_file = parts.list.get(-1).str.replace(r"\.[^.]*$", "")
    image_id = pl.concat_str([patient, study, view_file], separator="/")
    lateral = canonical_view_expr(pl.col("Frontal/Lateral"))
    frontal = canonical_view_expr(pl.col("AP/PA"))
    ids = df.select(
        image_id.alias("image_id"),
        pl.concat_str([patient, study], separator="/").alias("study_id"),
        patient.alias("subject_id"),
        pl.when(lateral.is_in(LATERAL_VIEWS)).then(lateral)
        .when(frontal.is_in(FRONTAL_VIEWS)).then(frontal)
        .otherwise(pl.lit("OTHER")).alias("view"),
        pl.col("Path").str.strip_chars().alias("path"),
        parts.list.get(-4, null_on_oob=True).fill_null("").alias("__split"),
    )
    other = df.filter(ids["view"] == "OTHER")
    if other.height:
        pairs = other.group_by(pl.concat_str([pl.col("Frontal/Lateral"), pl.col("AP/PA")], separator=" ",
                                             ignore_nulls=True)).len().iter_rows()
        note(notes, f"Frontal/Lateral, AP/PA: {other.height:,} of {ids.height:,} images became OTHER "
                    f"({count_listing(pairs)})")
    if ids["image_id"].is_duplicated().any():
        ids = ids.with_columns(pl.concat_str([pl.col("__split"), pl.col("image_id")], separator="/")
                               .alias("image_id"))
    return finish(ids.drop("__split"), native, classes, {}, dataset=NAME,
                  source=", ".join(map(str, paths)), images=images, only_existing=only_existing,
                  notes=notes)
