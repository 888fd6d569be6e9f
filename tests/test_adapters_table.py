"""The table adapter: a hospital's own CSV or Parquet, columns named by options, yes/no label
strings, per-image labels combined per study, and views read from DICOM headers."""

from __future__ import annotations

import csv
from pathlib import Path

import polars as pl
import pytest

from chx.data.adapters import get_adapter
from chx.data.manifest import class_columns, read_manifest, summarize
from chx.errors import ChxError
from helpers import run_chx

HEADER = ["file", "accession", "mrn", "projection", "Effusion", "Nodule", "comment"]
ROWS = [
    ["s1/a.png", "ACC1", "M1", "PA", "yes", "no", "routine"],
    ["s1/b.png", "ACC1", "M1", "LAT", "no", "no", ""],            # disagrees with a.png on Effusion
    ["s2/a.png", "ACC2", "M1", "AP", "1", "", "portable"],
    ["s2/b.png", "ACC2", "M1", "oblique", "0", "", ""],
    ["s3/a.png", "ACC3", "M2", "PA", "Yes ", "no", ""],
    ["s3/b.png", "ACC3", "M2", "L", "YES", "no", ""],
    ["s4/a.png", "ACC4", "M3", "PA", "", "yes", ""],
    ["s4/b.png", "ACC4", "M3", "Lateral", "", "yes", ""],
]
COLUMNS = dict(path_col="file", study_col="accession", patient_col="mrn")


def write(path: Path, rows=ROWS, header=HEADER) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def write_dicom(path: Path, view: str) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"       # CR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ViewPosition = "CR", view
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_named_columns_strings_and_per_study_max(tmp_path):
    table = write(tmp_path / "hospital.csv")
    notes: list[str] = []
    df = get_adapter("table").prepare([table], None, view_col="projection", label_cols=["Effusion,Nodule"],
                                      positive=["yes"], negative=["no"], notes=notes, **COLUMNS)
    s = summarize(df)
    assert (s["images"], s["studies"], s["multi_view_studies"], s["subjects"]) == (8, 4, 4, 3)
    assert class_columns(df) == ["Effusion", "Nodule"]
    assert dict(df["view"].value_counts().iter_rows()) == {"PA": 3, "AP": 1, "LATERAL": 3, "OTHER": 1}
    assert "projection: 1 of 8 images became OTHER (oblique 1)" in notes
    assert df["Effusion"].to_list() == [1, 1, 1, 1, 1, 1, None, None]
    assert df["Nodule"].to_list() == [0, 0, None, None, 0, 0, 1, 1]
    assert any(n.startswith("labels: studies whose images had different labels: 2;") for n in notes)
    assert df["image_id"][0] == "s1/a" and df["path"][0] == "s1/a.png"


def test_all_remaining_columns_and_bad_value_named(tmp_path):
    table = write(tmp_path / "h.csv", [r[:6] for r in ROWS], HEADER[:6])
    with pytest.raises(ChxError, match=r"h\.csv: data row 1, column 'Effusion': label 'yes' is not 1, 0, "
                                       r"empty; name the strings .* --positive/--negative"):
        get_adapter("table").prepare([table], None, view_col="projection", **COLUMNS)
    df = get_adapter("table").prepare([table], None, view_col="projection", positive=["yes"],
                                      negative=["no"], **COLUMNS)
    assert class_columns(df) == ["Effusion", "Nodule"]                    # every remaining column
    with pytest.raises(ChxError, match=r"h\.csv: missing column\(s\) 'path', 'study_id', 'patient_id'; the "
                                       r"table adapter \(--path-col path, --study-col study_id"):
        get_adapter("table").prepare([table], None)


def test_views_from_dicom_headers(tmp_path):
    images = tmp_path / "dicoms"
    write_dicom(images / "s1" / "a.dcm", "PA")
    write_dicom(images / "s1" / "b", "LL")                               # no extension: DICOM by magic
    write_dicom(images / "s2" / "a.dcm", "AP")
    (images / "s2" / "b.png").write_bytes(b"\x89PNG not dicom")
    (images / "s3").mkdir()
    (images / "s3" / "a.dcm").write_bytes(b"truncated")
    table = write(tmp_path / "t.csv", [["s1/a.dcm", "A1", "M1", "1"], ["s1/b", "A1", "M1", "0"],
                                       ["s2/a.dcm", "A2", "M2", "0"], ["s2/b.png", "A2", "M2", "1"],
                                       ["s3/a.dcm", "A3", "M3", ""]],
                  ["path", "study", "patient", "Edema"])
    notes: list[str] = []
    df = get_adapter("table").prepare([table], None, images=images, study_col="study",
                                      patient_col="patient", notes=notes)
    assert df["view"].to_list() == ["PA", "LL", "AP", "OTHER", "OTHER"]
    assert any(n.startswith("view: images whose DICOM header gave the ViewPosition: 3; not DICOM files")
               and n.endswith("or unreadable: 2 (first unreadable: s3/a.dcm)") for n in notes)
    assert "images: 5 of 5 found under" in " ".join(notes)
    no_images: list[str] = []
    df = get_adapter("table").prepare([table], None, study_col="study", patient_col="patient", notes=no_images)
    assert set(df["view"]) == {"OTHER"} and no_images[0].startswith("view: no --view-col and no --images")


def test_parquet_input_and_split_without_leakage(tmp_path, capsys):
    df = pl.DataFrame({"path": [f"i{i}.png" for i in range(12)], "study_id": [f"s{i // 2}" for i in range(12)],
                       "patient_id": [f"p{i // 4}" for i in range(12)], "view": ["PA", "L"] * 6,
                       "Mass": [1, 1, 0, 0, None, None, 1, 1, 0, 0, 1, 1]})
    df.write_parquet(tmp_path / "t.parquet")
    out = tmp_path / "m.parquet"
    code, stdout, err = run_chx(capsys, "prepare", "table", tmp_path / "t.parquet", "--view-col", "view",
                                "--val-fraction", "0.34", "--seed", "2", "-o", out)
    assert code == 0, err
    assert "12 images, 6 studies (6 multi-view), 3 patients, 1 classes" in stdout
    assert "views: PA 6, LATERAL 6" in stdout and "positives (images): Mass 6" in stdout
    assert "groups by training prevalence (head > 10%, tail < 1%): head 1, medium 0, tail 0" in stdout
    m = read_manifest(out)
    assert m.group_by("subject_id").agg(pl.col("split").n_unique())["split"].max() == 1
    assert set(m["split"]) == {"train", "val"}
