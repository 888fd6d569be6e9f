"""The padchest adapter on a table in PadChest's native format: Projection per value, the Labels
list parsed without eval, empty and EXCLUDE rows dropped and counted, harmonised names."""

from __future__ import annotations

import csv
from pathlib import Path

import polars as pl
import pytest

from chx.data.adapters import get_adapter
from chx.data.adapters.padchest import SYNONYMS
from chx.data.classes import CXR_LT_2023, CXR_LT_2024_TASK1
from chx.data.manifest import class_columns, summarize
from chx.errors import ChxError
from chx.pipeline.prepare import prepare

HEADER = ["ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
          "PatientSex_DICOM", "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric",
          "Modality_DICOM", "ReportID", "Report", "MethodLabel", "Labels", "Localizations"]
# (ImageID, ImageDir, StudyID, PatientID, Projection, Labels)
ROWS = [
    ("img1.png", "0", "S1", "P1", "PA", "['pleural effusion', 'cardiomegaly']"),
    ("img2.png", "0", "S1", "P1", "L", "['pleural effusion', 'cardiomegaly']"),
    ("img3.png", "1", "S2", "P1", "AP_horizontal", "['normal']"),
    ("img4.png", "1", "S3", "P2", "PA", "[' loculated pleural effusion', 'NSG tube']"),
    ("img5.png", "1", "S3", "P2", "COSTAL", "[' loculated pleural effusion', 'NSG tube']"),
    ("img6.png", "2", "S4", "P3", "PA", "['rib fracture', \"chilaiditi sign\"]"),
    ("img7.png", "2", "S4", "P3", "L", "['rib fracture', \"chilaiditi sign\"]"),
    ("img8.png", "2", "S5", "P3", "EXCLUDE", "['exclude']"),
    ("img9.png", "3", "S6", "P4", "PA", ""),
    ("img10.png", "3", "S7", "P4", "PA", "['']"),
]


def write_padchest(path: Path, rows=ROWS) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for image, folder, study, patient, projection, labels in rows:
            w.writerow([image, folder, "20140101", study, patient, "1950", "M", "POSTEROANTERIOR",
                        projection, "Manual review of DICOM fields", "No", "CR", f"R{study}",
                        "cardiomegalia, \"derrame\" pleural", "Physician", labels, "['loc right']"])
    return path


@pytest.fixture
def table(tmp_path) -> Path:
    return write_padchest(tmp_path / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv")


def test_counts_projections_and_dropped_rows(table):
    notes: list[str] = []
    df = get_adapter("padchest").prepare([table], list(CXR_LT_2023), notes=notes)
    s = summarize(df)
    assert (s["images"], s["studies"], s["multi_view_studies"], s["subjects"]) == (7, 4, 3, 3)
    assert dict(df["view"].value_counts().iter_rows()) == {"PA": 3, "LATERAL": 2, "AP": 1, "OTHER": 1}
    assert dict(zip(df["image_id"], df["view"]))["img5"] == "OTHER"            # COSTAL
    assert dict(zip(df["image_id"], df["path"]))["img4"] == "1/img4.png"
    assert f"Projection: EXCLUDE rows of {table.name} dropped: 1" in notes
    assert f"Labels: rows of {table.name} with empty Labels dropped: 2" in notes
    assert "Projection: 1 of 7 images became OTHER (COSTAL 1)" in notes


def test_labels_harmonised_where_unambiguous(table):
    df = get_adapter("padchest").prepare([table], list(CXR_LT_2023))
    by_image = {c: dict(zip(df["image_id"], df[c])) for c in class_columns(df)}
    assert [i for i, v in by_image["Pleural Effusion"].items() if v == 1] == ["img1", "img2", "img4", "img5"]
    assert [i for i, v in by_image["Cardiomegaly"].items() if v == 1] == ["img1", "img2"]
    assert [i for i, v in by_image["No Finding"].items() if v == 1] == ["img3"]
    assert [i for i, v in by_image["Fracture"].items() if v == 1] == ["img6", "img7"]   # rib fracture
    assert df["Pneumothorax"].null_count() == 0 and df["Pneumothorax"].sum() == 0   # mapped, not seen: 0
    for c in ("Support Devices", "Lung Opacity", "Enlarged Cardiomediastinum", "Tortuous Aorta"):
        assert df[c].null_count() == 7, c                                          # not mapped: null
    # Labels are the study's: all images of a study agree.
    assert df.group_by("study_id").agg([pl.col(c).n_unique() for c in CXR_LT_2023]).select(
        pl.max_horizontal(CXR_LT_2023)).to_series().max() == 1
    task1 = get_adapter("padchest").prepare([table], list(CXR_LT_2024_TASK1))
    assert task1["Normal"].to_list() == df["No Finding"].to_list()
    assert task1["Rib Fracture"].sum() == 2 and task1["Lobar Atelectasis"].null_count() == 0


def test_own_classes_are_the_stripped_lower_cased_labels(table):
    df = get_adapter("padchest").prepare([table], None)
    assert class_columns(df) == ["cardiomegaly", "chilaiditi sign", "loculated pleural effusion", "normal",
                                 "nsg tube", "pleural effusion", "rib fracture"]
    assert all(k == k.strip().lower() for k in SYNONYMS)


def test_labels_are_parsed_never_evaluated(tmp_path):
    for labels, row in (("pleural effusion", 2), ("['a', __import__('os').system('touch x')]", 2),
                        ("['unclosed]", 2)):
        rows = [ROWS[0], ("bad.png", "0", "S9", "P9", "PA", labels)]
        table = write_padchest(tmp_path / "PADCHEST_x.csv", rows)
        with pytest.raises(ChxError, match=rf"PADCHEST_x\.csv: data row {row}, column 'Labels': .* is not a list "
                                           r"of quoted labels"):
            get_adapter("padchest").prepare([table], None)
    assert not (tmp_path / "x").exists()


def test_split_by_patient_has_no_leakage(table, tmp_path):
    out = tmp_path / "pc.parquet"
    s = prepare("padchest", [table.parent], out, val_fraction=0.34, seed=0)
    df = pl.read_parquet(out)
    assert df.group_by("subject_id").agg(pl.col("split").n_unique())["split"].max() == 1
    assert s["views"] == {"PA": 3, "AP": 1, "LATERAL": 2, "OTHER": 1} and len(s["notes"]) == 3
