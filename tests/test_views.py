"""One view vocabulary: `chx prepare` (whole columns) and `chx predict` (DICOM headers) map every
native view string the same way."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from chx.data.views import (NATIVE_VIEWS, VIEW_TYPE_NAMES, VIEWS, canonical_view, canonical_view_expr,
                            deterministic_view_order, view_type)
from chx.pipeline.aggregate import aggregate_by_study

# DICOM ViewPosition defined terms (PS3.3 C.8.11.5.1.1 for DX) and values seen in MIMIC-CXR, BRAX,
# PadChest, IU X-ray and the covid collection, with what they must become.
KNOWN = {
    "PA": "PA", "POSTEROANTERIOR": "PA", "AP": "AP", "AP SUPINE": "AP", "AP ERECT": "AP",
    "ANTEROPOSTERIOR": "AP", "AP_horizontal": "AP", "LATERAL": "LATERAL", "L": "LATERAL",
    "LAT": "LATERAL", "XTABLE LATERAL": "LATERAL", "RL": "LATERAL", "LL": "LL",
    "AP AXIAL": "OTHER", "LLD": "OTHER", "RLD": "OTHER", "AP LLD": "OTHER", "PA LLD": "OTHER",
    "LT-DECUB": "OTHER", "LAO": "OTHER", "RAO": "OTHER", "LPO": "OTHER", "RLO": "OTHER",
    "SWIMMERS": "OTHER", "COSTAL": "OTHER", "EXCLUDE": "OTHER", "?": "OTHER", "": "OTHER",
}


def test_the_examples_that_used_to_disagree():
    assert [canonical_view(v) for v in ("AP SUPINE", "XTABLE LATERAL", "POSTEROANTERIOR", "RL")] == \
        ["AP", "LATERAL", "PA", "LATERAL"]


@pytest.mark.parametrize("native, want", sorted(KNOWN.items()))
def test_known_native_views(native, want):
    assert canonical_view(native) == want
    assert canonical_view(native.lower()) == want
    assert canonical_view(f"  {native}  ") == want


def test_column_and_scalar_mappings_agree_on_every_name():
    names = sorted(set(NATIVE_VIEWS) | set(KNOWN) | {v.lower() for v in KNOWN} | {"ap  supine", "x-table lateral"})
    column = pl.DataFrame({"v": names + [None]}).select(canonical_view_expr(pl.col("v")))["v"].to_list()
    assert column == [canonical_view(n) for n in names] + ["OTHER"]


def _dicom(path, view_position):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"   # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality = "DX"
    ds.ViewPosition = view_position
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
def test_predict_reads_dicom_view_positions_like_prepare(tmp_path):
    from chx.pipeline.predict import _dicom_view

    for i, (native, want) in enumerate(sorted(KNOWN.items())):
        path = tmp_path / f"{i}.dcm"
        _dicom(path, native)
        assert _dicom_view(path) == want == canonical_view(native), native


def test_types_groups_and_order():
    assert [view_type(v) for v in VIEWS] == [0, 0, 1, 1, 2]
    assert [VIEW_TYPE_NAMES[view_type(v)] for v in VIEWS] == ["frontal", "frontal", "lateral", "lateral", "other"]
    # the study-level baselines group views the same way: one study per view, then one with all five
    probs = np.arange(len(VIEWS), dtype=np.float64)[:, None]
    assert aggregate_by_study(probs, list(VIEWS), list(VIEWS), "frontal")[0] == ["PA", "AP"]
    assert aggregate_by_study(probs, list(VIEWS), list(VIEWS), "lateral")[0] == ["LATERAL", "LL"]
    _, weighted = aggregate_by_study(probs, ["s"] * len(VIEWS), list(VIEWS), "weighted")
    np.testing.assert_allclose(weighted, [[(7 * 0 + 7 * 1 + 3 * 2 + 3 * 3 + 5 * 4) / 25]])   # other: weight 5
    views, ids = ["OTHER", "LATERAL", "AP", "PA", "LL", "PA"], ["f", "e", "d", "c", "b", "a"]
    assert [views[i] + ids[i] for i in deterministic_view_order(views, ids)] == \
        ["PAa", "PAc", "APd", "LATERALe", "LLb", "OTHERf"]
