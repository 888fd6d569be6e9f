"""The brax adapter on a table in BRAX's native format (master_spreadsheet_update.csv): exams as
studies, BRAX's view names, -1 by --uncertain, per-exam labels."""

from __future__ import annotations

import csv
from pathlib import Path

import polars as pl
import pytest

from chx.data.adapters import get_adapter
from chx.data.classes import CXR_LT_2023
from chx.data.manifest import summarize
from chx.errors import ChxError
from chx.pipeline.prepare import prepare

LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Lung Opacity",
          "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
          "Pleural Other", "Fracture", "Support devices")            # BRAX's spelling varies in case
# (patient, accession, image number, ViewPosition, Cardiomegaly)
ROWS = [
    ("A", "1001", 1, "PA", "1"), ("A", "1001", 2, "L", "0"),        # one exam's images disagree
    ("A", "1002", 1, "AP", "-1"), ("A", "1002", 2, "AP LLD", "-1"),
    ("B", "2001", 1, "PA", "0"), ("B", "2001", 2, "RL", "0"), ("B", "2001", 3, "RLO", "0"),
    ("B", "2001", 4, "L", "0"),
    ("C", "3001", 1, "PA", "1"),
]


def write_brax(path: Path, rows=ROWS) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["DicomPath", "PngPath", "PatientID", "PatientSex", "PatientAge", "AccessionNumber",
                    "ViewPosition", "Rows", "Columns", *LABELS])
        for patient, acc, n, view, card in rows:
            png = f"images/id_{patient}/Study_{acc}/Series_1/image-{n}.png"
            w.writerow([png.replace(".png", ".dcm"), png, patient, "F", "62", acc, view, "2048", "2500",
                        *(card if c == "Cardiomegaly" else ("1" if c == "Support devices" and acc == "2001" else "")
                          for c in LABELS)])
    return path


@pytest.fixture
def table(tmp_path) -> Path:
    return write_brax(tmp_path / "master_spreadsheet_update.csv")


def test_counts_views_and_uncertain(table):
    notes: list[str] = []
    df = get_adapter("brax").prepare([table], list(CXR_LT_2023), notes=notes)
    s = summarize(df)
    assert (s["images"], s["studies"], s["multi_view_studies"], s["subjects"]) == (9, 4, 3, 3)
    assert dict(df["view"].value_counts().iter_rows()) == {"PA": 3, "AP": 1, "LATERAL": 3, "OTHER": 2}
    assert "ViewPosition: 2 of 9 images became OTHER (AP LLD 1, RLO 1)" in notes
    assert df["image_id"].n_unique() == 9 and df["image_id"][0] == "images/id_A/Study_1001/Series_1/image-1"
    assert df["Cardiomegaly"].to_list() == [1, 1, None, None, 0, 0, 0, 0, 1]
    assert any("studies whose images had different labels: 1;" in n for n in notes)
    ones = get_adapter("brax").prepare([table], list(CXR_LT_2023), uncertain="ones")
    assert ones["Cardiomegaly"].to_list()[2:4] == [1, 1]
    assert df["Support Devices"].to_list() == [None] * 4 + [1] * 4 + [None]    # found by class key
    assert df["Tortuous Aorta"].null_count() == 9
    # Labels are the exam's: all images of a study agree.
    assert df.group_by("study_id").agg(pl.col("Cardiomegaly").n_unique())["Cardiomegaly"].max() == 1


def test_bad_value_and_missing_label_column_are_named(tmp_path):
    table = write_brax(tmp_path / "master_spreadsheet_update.csv", [*ROWS[:4], ("B", "2001", 1, "PA", "2")])
    with pytest.raises(ChxError, match=r"master_spreadsheet_update\.csv: data row 5, column 'Cardiomegaly': "
                                       r"label '2' is not 1, 0, -1 or empty"):
        get_adapter("brax").prepare([table], None)
    cut = tmp_path / "master_spreadsheet_cut.csv"
    cut.write_text("PngPath,PatientID,AccessionNumber,ViewPosition,Cardiomegaly\na.png,A,1,PA,1\n")
    with pytest.raises(ChxError, match="missing label column.*'No Finding'"):
        get_adapter("brax").prepare([cut], None)


def test_split_by_patient_has_no_leakage(table, tmp_path):
    s = prepare("brax", [table], tmp_path / "b.parquet", val_fraction=0.34, seed=0,
                options={"uncertain": "zeros"})
    df = pl.read_parquet(tmp_path / "b.parquet")
    assert df.group_by("subject_id").agg(pl.col("split").n_unique())["split"].max() == 1
    assert s["positives"]["Cardiomegaly"] == 3 and df["Cardiomegaly"].null_count() == 0
