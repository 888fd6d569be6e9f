"""The manifest schema and its validator: each rule names the first bad row and column."""

from __future__ import annotations

import polars as pl
import pytest

from chx.data.manifest import read_manifest, summarize, validate, write_manifest
from chx.errors import ManifestError


def make(rows=None, **overrides) -> pl.DataFrame:
    base = {
        "image_id": ["a1", "a2", "b1"],
        "study_id": ["A", "A", "B"],
        "subject_id": ["p1", "p1", "p2"],
        "view": ["PA", "LATERAL", "AP"],
        "path": ["a1.png", "a2.png", "b1.png"],
        "split": ["train", "train", "val"],
        "Edema": [1.0, 1.0, 0.0],
        "Mass": [None, None, 1.0],
    }
    base.update(overrides)
    return pl.DataFrame(base)


def test_valid_manifest_passes_and_normalises_dtypes():
    df = validate(make())
    assert df["Edema"].dtype == pl.Float32
    assert df["Mass"].null_count() == 2


@pytest.mark.parametrize("overrides, expected", [
    ({"image_id": ["a1", "a1", "b1"]}, "row 2, column image_id: duplicate image_id 'a1'"),
    ({"view": ["PA", "SIDEWAYS", "AP"]}, "row 2 (image_id a2), column view: unknown view 'SIDEWAYS'"),
    ({"Edema": [1.0, 2.0, 0.0]}, "column 'Edema': label 2.0 is not allowed"),
    ({"Edema": [1.0, 0.0, 0.0]}, "row 2 (image_id a2), column 'Edema': study 'A' has images with different labels"),
    ({"Mass": [None, 0.0, 1.0]}, "row 2 (image_id a2), column 'Mass': study 'A' has images with different labels"),
    ({"split": ["train", "dev", "val"]}, "row 2 (image_id a2), column split: unknown split 'dev'"),
    ({"split": ["train", "train", "val"], "subject_id": ["p1", "p1", "p1"]}, "subject_id 'p1' appears in more than one split"),
    ({"path": ["a1.png", "", "b1.png"]}, "row 2 (image_id a2), column path: empty value"),
    ({"Edema": ["1", "yes", "0"]}, "row 2 (image_id a2), column 'Edema': label 'yes' is not a number"),
])
def test_validator_names_first_bad_row_and_column(overrides, expected):
    with pytest.raises(ManifestError) as e:
        validate(make(**overrides), source="m.csv")
    assert expected in str(e.value)
    assert str(e.value).startswith("m.csv: ")


def test_missing_column_is_named():
    with pytest.raises(ManifestError, match="missing column\\(s\\) view"):
        validate(make().drop("view"))


def test_soft_labels_need_soft_flag():
    df = make(Edema=[0.3, 0.3, 0.0])
    with pytest.raises(ManifestError, match="0.3"):
        validate(df)
    assert validate(df, soft=True)["Edema"][0] == pytest.approx(0.3)
    with pytest.raises(ManifestError, match="probability in \\[0, 1\\]"):
        validate(make(Edema=[1.5, 1.5, 0.0]), soft=True)


def test_csv_round_trip_keeps_nulls(tmp_path):
    df = validate(make())
    write_manifest(df, tmp_path / "m.csv")
    write_manifest(df, tmp_path / "m.parquet")
    for name in ("m.csv", "m.parquet"):
        back = read_manifest(tmp_path / name)
        assert back.equals(df), name
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def test_summarize_counts():
    s = summarize(validate(make()))
    assert s["images"] == 3 and s["studies"] == 2 and s["subjects"] == 2
    assert s["multi_view_studies"] == 1
    assert s["positives"] == {"Edema": 2, "Mass": 1}
    assert s["annotated"] == {"Edema": 3, "Mass": 1}
