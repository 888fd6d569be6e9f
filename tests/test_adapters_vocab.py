"""The vocabularies every adapter shares: named class lists, and views mapped only through
chx.data.views (every native view string the same way in every adapter, OTHER counted)."""

from __future__ import annotations

import csv
from pathlib import Path

import polars as pl
import pytest

import chx.data.adapters.common as common
from chx.data.adapters import get_adapter
from chx.data.adapters.chexpert import CHEXPERT_CLASSES
from chx.data.classes import (CXR_LT_2023, CXR_LT_2024_TASK1, CXR_LT_2024_TASK2, CXR_LT_2026,
                              NAMED_CLASS_LISTS, class_key, frequency_groups, resolve_classes)
from chx.data.views import NATIVE_VIEWS, canonical_view
from chx.errors import ChxError
from helpers import shared_path

# Every native string views.py knows, in the spellings tables use, and some it maps to OTHER.
NATIVE = [*NATIVE_VIEWS, "ap supine", "Pa", "XTABLE_LATERAL", "LT-DECUB", "AP LLD", "LAO", "RLO",
          "SWIMMERS", "AP AXIAL", "", "?"]


def test_named_class_lists():
    assert list(NAMED_CLASS_LISTS) == ["cxr-lt-2023", "cxr-lt-2024-task1", "cxr-lt-2024-task2", "cxr-lt-2026"]
    assert (len(CXR_LT_2023), len(CXR_LT_2024_TASK1), len(CXR_LT_2024_TASK2), len(CXR_LT_2026)) == (26, 40, 26, 30)
    assert "Normal" in CXR_LT_2024_TASK1 and "No Finding" not in CXR_LT_2024_TASK1
    assert [("No Finding" if c == "Normal" else c) for c in CXR_LT_2024_TASK2] == list(CXR_LT_2023)
    assert set(CXR_LT_2024_TASK2) < set(CXR_LT_2024_TASK1)
    for names in NAMED_CLASS_LISTS.values():
        assert len({class_key(n) for n in names}) == len(names)
    assert resolve_classes("cxr-lt-2026") == list(CXR_LT_2026)
    with pytest.raises(ChxError, match="did you mean 'cxr-lt-2024-task2'"):
        resolve_classes("cxr-lt-2024-task-2")


def test_adapters_have_no_view_map_of_their_own():
    assert not hasattr(common, "VIEW_MAP") and not hasattr(common, "normalise_view")


def write(path: Path, header, rows) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def test_every_native_view_maps_as_chx_data_views_says(tmp_path):
    want = [canonical_view(v) for v in NATIVE]
    n = len(NATIVE)
    cxr_lt = write(tmp_path / "cxr.csv", ["dicom_id", "subject_id", "study_id", "ViewPosition", "path", "Edema"],
                   [[f"d{i}", f"p{i}", f"s{i}", v, f"d{i}.jpg", "0"] for i, v in enumerate(NATIVE)])
    table = write(tmp_path / "t.csv", ["path", "study_id", "patient_id", "view", "Edema"],
                  [[f"d{i}.png", f"s{i}", f"p{i}", v, "1"] for i, v in enumerate(NATIVE)])
    brax = write(tmp_path / "master_spreadsheet_update.csv",
                 ["PngPath", "PatientID", "AccessionNumber", "ViewPosition", *CHEXPERT_CLASSES],
                 [[f"d{i}.png", f"p{i}", f"a{i}", v, *([""] * 14)] for i, v in enumerate(NATIVE)])
    got = {
        "cxr-lt": get_adapter("cxr-lt").prepare([cxr_lt], None),
        "table": get_adapter("table").prepare([table], None, view_col="view"),
        "brax": get_adapter("brax").prepare([brax], None),
    }
    for name, df in got.items():
        assert df.height == n and df["view"].to_list() == want, name
    notes: list[str] = []
    get_adapter("cxr-lt").prepare([cxr_lt], None, notes=notes)
    others = want.count("OTHER")
    assert notes[0].startswith(f"ViewPosition: {others} of {n} images became OTHER (")


def test_views_that_became_other_are_counted_on_real_data():
    notes: list[str] = []
    df = get_adapter("covid").prepare([shared_path("covid-cxr", "metadata.csv")], None, notes=notes)
    assert int((df["view"] == "OTHER").sum()) == 39
    line = next(n for n in notes if n.startswith("view: "))
    assert line.startswith("view: 39 of 391 images became OTHER (")
    counts = dict(item.rsplit(" ", 1) for item in line[line.index("(") + 1:-1].split(", "))
    assert sum(int(v) for v in counts.values()) == 39
    # Same answer as views.py, value by value, on the real native strings.
    raw = pl.read_csv(shared_path("covid-cxr", "metadata.csv"), infer_schema_length=0)
    assert {canonical_view(v) for v in raw["view"].to_list()} == set(df["view"])


def test_head_medium_tail_by_training_prevalence_for_any_class_list():
    positives = {"A": 300, "B": 100, "C": 99, "D": 10, "E": 9, "F": 0, "G": 5}
    annotated = {"A": 1000, "B": 1000, "C": 990, "D": 1000, "E": 1000, "F": 1000, "G": 0}
    assert frequency_groups(positives, annotated) == {"head": ["A"], "medium": ["B", "C", "D"], "tail": ["E", "F"]}
    assert frequency_groups(positives, annotated, head_min=0.05, tail_max=0.05)["head"] == ["A", "B", "C"]


def test_cxr_lt_2024_csv_onto_its_task_lists(tmp_path):
    rows = [[f"d{i}", f"p{i % 3}", f"s{i}", "PA", f"d{i}.jpg", *("1" if j == i else "0" for j in range(40))]
            for i in range(40)]
    table = write(tmp_path / "train_labeled.csv",
                  ["dicom_id", "subject_id", "study_id", "ViewPosition", "path", *CXR_LT_2024_TASK1], rows)
    for name, names in (("cxr-lt-2024-task1", CXR_LT_2024_TASK1), ("cxr-lt-2024-task2", CXR_LT_2024_TASK2)):
        df = get_adapter("cxr-lt").prepare([table], resolve_classes(name))
        assert df.columns[6:] == list(names)
        assert all(df[c].null_count() == 0 and df[c].sum() == 1 for c in names), name
    df = get_adapter("cxr-lt").prepare([table], resolve_classes("cxr-lt-2023"))
    assert df["No Finding"].null_count() == 40 and df["Edema"].sum() == 1   # "Normal" is not "No Finding"
