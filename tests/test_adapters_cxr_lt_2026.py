"""The cxr-lt-2026 adapter on a CSV in the CXR-LT 2026 format (ImageID, StudyDate_DICOM, PatientID,
30 classes), read tolerantly, with views and studies joined from PadChest's and NIH's tables."""

from __future__ import annotations

import csv
from pathlib import Path

import polars as pl
import pytest

from chx.data.adapters import get_adapter
from chx.data.classes import CXR_LT_2026, class_key
from chx.data.manifest import class_columns, summarize
from chx.errors import ChxError
from chx.pipeline.prepare import prepare

# (ImageID, PatientID, StudyDate_DICOM, {class: 1}); every other class 0.
ROWS = [
    ("pc1.png", "P1", "20140101", {"cardiomegaly": 1, "pleural effusion": 1}),
    ("pc2.png", "P1", "20140101", {"cardiomegaly": 1}),                # disagrees with pc1 on effusion
    ("pc3.png", "P1", "20150505", {"Normal": 1}),
    ("pc4.png", "P2", "20160101", {"fracture": 1}),
    ("00000001_000.png", "1", "20100101", {"Support Devices": 1}),
    ("00000001_001.png", "1", "20100101", {"Support Devices": 1}),
]


def write(path: Path, header, rows) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def challenge_csv(path: Path, header=("ImageID", "StudyDate_DICOM", "PatientID"), classes=CXR_LT_2026,
                  extra=()) -> Path:
    return write(path, [*header, *classes, *(e[0] for e in extra)],
                 [[img, date, pid, *({class_key(k): x for k, x in v.items()}.get(class_key(c), 0) for c in classes),
                   *(e[1][i] for e in extra)]
                  for i, (img, pid, date, v) in enumerate(ROWS)])


@pytest.fixture
def sources(tmp_path) -> dict[str, Path]:
    return {
        "challenge": challenge_csv(tmp_path / "CXRLT_2026_training.csv"),
        "padchest": write(tmp_path / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv",
                          ["ImageID", "ImageDir", "StudyID", "PatientID", "Projection", "Labels"],
                          [["pc1.png", "0", "S1", "P1", "PA", "['cardiomegaly']"],
                           ["pc2.png", "0", "S1", "P1", "L", "['cardiomegaly']"],
                           ["pc3.png", "1", "S2", "P1", "AP_horizontal", "['normal']"],
                           ["pc4.png", "1", "S3", "P2", "COSTAL", "['rib fracture']"]]),
        "nih": write(tmp_path / "Data_Entry_2017_v2020.csv",
                     ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "View Position"],
                     [["00000001_000.png", "Cardiomegaly", "0", "1", "PA"],
                      ["00000001_001.png", "Cardiomegaly|Emphysema", "1", "1", "PA"]]),
    }


def test_with_padchest_and_nih_tables(sources):
    notes: list[str] = []
    df = get_adapter("cxr-lt-2026").prepare(list(sources.values()), list(CXR_LT_2026), notes=notes)
    s = summarize(df)
    assert (s["images"], s["studies"], s["multi_view_studies"], s["subjects"]) == (6, 4, 2, 3)
    assert class_columns(df) == list(CXR_LT_2026)
    assert dict(df["view"].value_counts().iter_rows()) == {"PA": 3, "LATERAL": 1, "AP": 1, "OTHER": 1}
    got = {r["image_id"]: (r["study_id"], r["path"]) for r in df.iter_rows(named=True)}
    assert got["pc1"] == ("S1", "0/pc1.png") and got["pc3"] == ("S2", "1/pc3.png")
    assert got["00000001_000"] == ("1_20100101", "00000001_000.png")
    # Labels per study: pc1 and pc2 disagreed on effusion; the study takes the max (noted).
    assert df.filter(pl.col("study_id") == "S1")["pleural effusion"].to_list() == [1, 1]
    assert any("studies whose images had different labels: 1;" in n for n in notes)
    assert df["Support Devices"].sum() == 2 and df["Normal"].sum() == 1
    assert sum(df[c].null_count() for c in CXR_LT_2026) == 0


def test_without_the_tables_views_are_other_and_studies_are_patient_days(sources):
    notes: list[str] = []
    df = get_adapter("cxr-lt-2026").prepare([sources["challenge"]], None, notes=notes)
    assert set(df["view"]) == {"OTHER"} and summarize(df)["studies"] == 4
    assert set(df["study_id"]) == {"P1_20140101", "P1_20150505", "P2_20160101", "1_20100101"}
    assert any(n.startswith("views: the CSV has none") for n in notes)
    assert "view: 6 of 6 images became OTHER (blank 6)" in notes
    undated = sources["challenge"].with_name("undated.csv")
    undated.write_text(sources["challenge"].read_text().replace(",20100101,", ",,"))
    notes = []
    df = get_adapter("cxr-lt-2026").prepare([undated], None, notes=notes)
    assert summarize(df)["studies"] == 5 and {"00000001_000", "00000001_001"} <= set(df["study_id"])
    assert "study: images without a StudyID or a study date, each its own study: 2" in notes


def test_tolerant_columns_are_named(tmp_path):
    classes = [c.upper() if c == "cardiomegaly" else c for c in CXR_LT_2026 if c not in ("sternotomy", "Kyphosis")]
    table = challenge_csv(tmp_path / "t.csv", header=("imageid", "Study Date DICOM", "Patient ID"),
                          classes=classes, extra=[("Goiter", ["0", "1", "0", "", "0", "0"]),
                                                  ("comment", ["ok", "see report", "", "", "", ""])])
    notes: list[str] = []
    own = get_adapter("cxr-lt-2026").prepare([table], None, notes=notes)
    assert "cardiomegaly" in class_columns(own) and "CARDIOMEGALY" not in class_columns(own)
    assert "Goiter" in class_columns(own) and "comment" not in class_columns(own)
    assert any("column(s) Goiter are not CXR-LT 2026 classes" in n for n in notes)
    assert any("column(s) comment are neither ids nor 0/1 labels; skipped" in n for n in notes)
    assert any("lacks 2 of the 30 CXR-LT 2026 classes (Kyphosis, sternotomy): null" in n for n in notes)
    df = get_adapter("cxr-lt-2026").prepare([table], list(CXR_LT_2026))
    assert df["sternotomy"].null_count() == 6 and df["cardiomegaly"].sum() == 2


def test_bad_value_and_missing_id_are_named(tmp_path):
    table = challenge_csv(tmp_path / "t.csv")
    text = table.read_text().splitlines()
    text[3] = text[3].replace(",0,", ",yes,", 1)
    table.write_text("\n".join(text) + "\n")
    with pytest.raises(ChxError, match=r"t\.csv: data row 3, column '[^']+': label 'yes' is not 1, 0 or empty"):
        get_adapter("cxr-lt-2026").prepare([table], None)
    write(tmp_path / "u.csv", ["ImageID", "Normal"], [["a.png", "1"]])
    with pytest.raises(ChxError, match="needs a challenge CSV"):
        get_adapter("cxr-lt-2026").prepare([tmp_path / "u.csv"], None)


def test_split_by_patient_has_no_leakage(sources, tmp_path):
    prepare("cxr-lt-2026", list(sources.values()), tmp_path / "m.parquet", val_fraction=0.34, seed=1)
    df = pl.read_parquet(tmp_path / "m.parquet")
    assert df.group_by("subject_id").agg(pl.col("split").n_unique())["split"].max() == 1
    assert set(df["split"]) <= {"train", "val"} and df["split"].null_count() == 0
