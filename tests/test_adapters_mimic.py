"""The mimic-cxr adapter on MIMIC-CXR-JPG's own CSVs, written here in their native format: study
labels joined to images, dropped studies counted, official split, views through chx.data.views."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import polars as pl
import pytest

from chx.data.adapters import get_adapter
from chx.data.classes import CXR_LT_2023
from chx.data.manifest import read_manifest, summarize
from chx.errors import ChxError
from helpers import run_chx

LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
          "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
          "Pneumonia", "Pneumothorax", "Support Devices")
# (subject_id, study_id, {label: value}); blank for every label not named.
STUDIES = [
    ("10000032", "50414267", {"Cardiomegaly": "1.0", "Edema": "-1.0"}),
    ("10000032", "53189527", {"No Finding": "1.0"}),
    ("10000764", "57375967", {"Pleural Effusion": "1.0", "Cardiomegaly": "0.0", "Edema": "-1.0"}),
    ("10000898", "50771383", {"Support Devices": "1.0", "Pneumothorax": "0.0"}),
    ("10000898", "54205396", {}),
    ("10001111", "58888888", {"Atelectasis": "1.0"}),             # a label row without images
]
# (dicom_id, subject_id, study_id, ViewPosition, official split)
IMAGES = [
    ("d1", "10000032", "50414267", "PA", "train"),
    ("d2", "10000032", "50414267", "LATERAL", "train"),
    ("d3", "10000032", "53189527", "AP", "train"),
    ("d4", "10000764", "57375967", "PA", "validate"),
    ("d5", "10000764", "57375967", "LL", "validate"),
    ("d6", "10000898", "50771383", "", "test"),
    ("d7", "10000898", "54205396", "LATERAL", "test"),
    ("d8", "10000032", "59999999", "PA", "train"),                # study 59999999 has no label row
    ("d9", "10000032", "59999999", "LATERAL", "train"),
]


def write(path: Path, header, rows) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def mimic_files(root: Path, studies=STUDIES) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    labels = write(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *LABELS],
                   [[s, st, *(v.get(c, "") for c in LABELS)] for s, st, v in studies])
    meta = write(root / "mimic-cxr-2.0.0-metadata.csv.gz",
                 ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                  "Rows", "Columns", "StudyDate", "StudyTime"],
                 [[d, s, st, "CHEST (PA AND LAT)", v, "3056", "2544", "21800506", "213014.531"]
                  for d, s, st, v, _ in IMAGES])
    split = write(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
                  [[d, st, s, sp] for d, s, st, _, sp in IMAGES])
    return {"labels": labels, "meta": meta, "split": split}


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    return mimic_files(tmp_path / "mimic")


def test_counts_views_paths_and_dropped_studies(files):
    notes: list[str] = []
    df = get_adapter("mimic-cxr").prepare(list(files.values()), list(CXR_LT_2023), notes=notes)
    s = summarize(df)
    assert (s["images"], s["studies"], s["multi_view_studies"], s["subjects"]) == (7, 5, 2, 3)
    assert dict(df["view"].value_counts().iter_rows()) == {"PA": 2, "AP": 1, "LATERAL": 2, "LL": 1, "OTHER": 1}
    assert int(df["view"].is_in(["LATERAL", "LL"]).sum()) == 3
    assert "59999999" not in set(df["study_id"])
    assert df.filter(pl.col("image_id") == "d1")["path"][0] == "files/p10/p10000032/s50414267/d1.jpg"
    assert "labels: studies without a row in mimic-cxr-2.0.0-chexpert.csv.gz: 1 (2 images), dropped " \
           "(no invented labels)" in notes
    assert "labels: rows of mimic-cxr-2.0.0-chexpert.csv.gz without an image in " \
           "mimic-cxr-2.0.0-metadata.csv.gz: 1, not used" in notes
    assert any(n.startswith("ViewPosition: 1 of 7 images became OTHER (blank 1)") for n in notes)


def test_labels_are_the_studys_with_uncertain_policies(files):
    sources = list(files.values())
    by = {p: get_adapter("mimic-cxr").prepare(sources, list(CXR_LT_2023), uncertain=p)
          for p in ("ignore", "ones", "zeros")}
    df = by["ignore"]
    # Study-level agreement: every image carries its study's label row.
    per_study = df.group_by("study_id").agg([pl.col(c).drop_nulls().n_unique() for c in CXR_LT_2023])
    assert all(per_study[c].max() <= 1 for c in CXR_LT_2023)
    card = dict(zip(df["image_id"], df["Cardiomegaly"]))
    assert card == {"d1": 1, "d2": 1, "d3": None, "d4": 0, "d5": 0, "d6": None, "d7": None}
    assert [by[p]["Edema"].to_list()[:2] for p in ("ignore", "ones", "zeros")] == [[None, None], [1, 1], [0, 0]]
    assert df["Edema"].null_count() == 7 and by["ones"]["Edema"].null_count() == 3
    assert df["Tortuous Aorta"].null_count() == 7                    # not a CheXpert label: null
    assert df.filter(pl.col("study_id") == "54205396")["No Finding"].null_count() == 1


def test_official_split_is_kept_and_has_no_patient_leakage(files, tmp_path, capsys):
    df = get_adapter("mimic-cxr").prepare(list(files.values()), list(CXR_LT_2023))
    assert dict(zip(df["image_id"], df["split"])) == {
        "d1": "train", "d2": "train", "d3": "train", "d4": "val", "d5": "val", "d6": "test", "d7": "test"}
    assert df.group_by("subject_id").agg(pl.col("split").n_unique())["split"].max() == 1
    out = tmp_path / "m.parquet"
    code, stdout, err = run_chx(capsys, "prepare", "mimic-cxr", files["labels"].parent, "--val-fraction", "0.34",
                                "--seed", "3", "-o", out)
    assert code == 0, err
    assert "note: split: --val-fraction/--test-fraction replace the split" in stdout
    assert "views: PA 2, AP 1, LATERAL 2, LL 1, OTHER 1" in stdout
    resplit = read_manifest(out)
    assert resplit.group_by("subject_id").agg(pl.col("split").n_unique())["split"].max() == 1


def test_images_root_found_counted_and_wrong_root_refused(files, tmp_path):
    root = tmp_path / "mimic-cxr-jpg" / "2.0.0"
    for rel in ("files/p10/p10000032/s50414267/d1.jpg", "files/p10/p10000764/s57375967/d4.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    notes: list[str] = []
    df = get_adapter("mimic-cxr").prepare(list(files.values()), None, images=tmp_path / "mimic-cxr-jpg",
                                          only_existing=True, notes=notes)
    assert sorted(df["path"]) == ["2.0.0/files/p10/p10000032/s50414267/d1.jpg",
                                  "2.0.0/files/p10/p10000764/s57375967/d4.jpg"]
    assert "images: 2 of 7 found under" in notes[-1] and "5 missing, dropped" in notes[-1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChxError, match=r"none of the 7 images listed in .* was found under .*empty; check --images"):
        get_adapter("mimic-cxr").prepare(list(files.values()), None, images=tmp_path / "empty")


def test_bad_rows_and_sources_are_named(tmp_path):
    bad = [("10000032", "50414267", {"Cardiomegaly": "2.0"}), *STUDIES[1:]]
    files = mimic_files(tmp_path / "a", bad)
    with pytest.raises(ChxError, match=r"chexpert\.csv\.gz: data row 1, column 'Cardiomegaly': label '2\.0'"):
        get_adapter("mimic-cxr").prepare(list(files.values()), None, uncertain="ones")
    files = mimic_files(tmp_path / "b", [*STUDIES, STUDIES[0]])
    with pytest.raises(ChxError, match=r"chexpert\.csv\.gz: data rows 1 and 7: study 50414267 is listed twice"):
        get_adapter("mimic-cxr").prepare(list(files.values()), None)
    with pytest.raises(ChxError, match="one -metadata table .* found 1, 0 and 0"):
        get_adapter("mimic-cxr").prepare([files["labels"]], None)
    files = mimic_files(tmp_path / "c")
    write(files["split"], ["dicom_id", "split"], [["d1", "holdout"]])
    with pytest.raises(ChxError, match=r"split\.csv\.gz: data row 1, column 'split': 'holdout'"):
        get_adapter("mimic-cxr").prepare(list(files.values()), None)


def test_a_folder_with_both_label_tables_uses_chexpert(files):
    negbio = files["labels"].with_name("mimic-cxr-2.0.0-negbio.csv.gz")
    negbio.write_bytes(files["labels"].read_bytes())
    notes: list[str] = []
    df = get_adapter("mimic-cxr").prepare([files["labels"].parent], None, notes=notes)
    assert df.height == 7 and any("using mimic-cxr-2.0.0-chexpert.csv.gz" in n for n in notes)
