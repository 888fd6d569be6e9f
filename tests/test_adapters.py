"""Dataset adapters on the real native tables in ../shared/data.

Every expected figure is computed here from the raw files with Python's csv/gzip modules (not
through the adapters' polars code path), and the headline figures are also pinned as literals.
"""

from __future__ import annotations

import csv
import gzip
import os
from collections import Counter, defaultdict
from pathlib import Path

import polars as pl
import pytest

from chx.data.adapters import ADAPTERS, get_adapter
from chx.data.adapters.common import harmonise, resolve_paths
from chx.data.classes import CXR_LT_2023
from chx.data.manifest import class_columns, summarize
from chx.data.views import canonical_view_expr
from chx.errors import ChxError
from helpers import run_chx, shared_path

CXR_LT = list(CXR_LT_2023)


def rows_of(path: Path) -> list[dict[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def positives(df: pl.DataFrame, col: str) -> int:
    return int((df[col] == 1).sum())


def negatives(df: pl.DataFrame, col: str) -> int:
    return int((df[col] == 0).sum())


# ------------------------------------------------------------------------------------ registry

def test_registry_names_defaults_and_unknown_name_lists_known():
    assert list(ADAPTERS) == ["cxr-lt", "nih", "chexpert", "vindr", "iu-xray", "covid",
                              "mimic-cxr", "padchest", "cxr-lt-2026", "brax", "table"]
    assert {n: a.default_classes for n, a in ADAPTERS.items()} == {
        "cxr-lt": "cxr-lt-2023", "nih": "data", "chexpert": "data",
        "vindr": "data", "iu-xray": "data", "covid": "data",
        "mimic-cxr": "cxr-lt-2023", "padchest": "data", "cxr-lt-2026": "cxr-lt-2026",
        "brax": "data", "table": "data"}
    assert all(a.summary and "\n" not in a.summary for a in ADAPTERS.values())
    with pytest.raises(ChxError, match="unknown dataset 'mimic'.*cxr-lt, nih, chexpert, vindr, iu-xray, covid"):
        get_adapter("mimic")


# ------------------------------------------------------------------------------------ helpers

def test_normalise_view_maps_native_strings():
    native = ["PA", "AP", "AP Supine", "ap supine", "AP AXIAL", "L", "LAT", "Lateral", "LATERAL",
              " LL ", "", "?", None, "XTABLE LATERAL", "PA LLD", "SWIMMERS"]
    want = ["PA", "AP", "AP", "AP", "OTHER", "LATERAL", "LATERAL", "LATERAL", "LATERAL", "LL",
            "OTHER", "OTHER", "OTHER", "LATERAL", "OTHER", "OTHER"]
    got = pl.DataFrame({"v": native}, schema={"v": pl.Utf8}).select(canonical_view_expr(pl.col("v")))
    assert got["v"].to_list() == want


def test_harmonise_renames_combines_and_leaves_unannotated_null():
    native = pl.DataFrame({"Effusion": [1.0, 0.0, None], "Pleural_Thickening": [0.0, 1.0, None],
                           "Emphysema": [None, 0.0, None], "Pulmonary Emphysema": [1.0, None, None],
                           "Aortic enlargement": [1.0, 1.0, 1.0]})
    syn = {"Effusion": "Pleural Effusion", "Pulmonary Emphysema": "Emphysema", "Aortic enlargement": None}
    out = harmonise(native, ["Pleural Effusion", "pleural thickening", "Emphysema", "Edema"], syn)
    assert out.columns == ["Pleural Effusion", "pleural thickening", "Emphysema", "Edema"]
    assert out["Pleural Effusion"].to_list() == [1.0, 0.0, None]
    assert out["pleural thickening"].to_list() == [0.0, 1.0, None]
    assert out["Emphysema"].to_list() == [1.0, 0.0, None]      # max of the two; null when both are
    assert out["Edema"].null_count() == 3                     # not annotated: null, never 0
    assert harmonise(native, None, syn).columns == native.columns
    assert harmonise(native, ["effusion"], syn)["effusion"].to_list() == [1.0, 0.0, None]  # own name too
    assert harmonise(native, ["Aortic enlargement", "Edema"], {})["Aortic enlargement"].to_list() == [1.0] * 3
    with pytest.raises(ChxError, match="none of the target classes .* is annotated by toy.*--classes data"):
        harmonise(native, ["Edema", "Mass"], syn, dataset="toy")


def _touch(root: Path, *rels: str) -> None:
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")


def test_resolve_paths_handles_nested_flat_and_ambiguous_layouts(tmp_path):
    _touch(tmp_path / "nih", "images_001/images/a.png", "images_002/images/b.png")
    _touch(tmp_path / "flat", "a.png")
    _touch(tmp_path / "chex", "CheXpert-v1.0-small/train/patient1/study1/view1_frontal.jpg",
           "CheXpert-v1.0-small/train/patient2/study1/view1_frontal.jpg", "vindr/x.png")
    m = pl.DataFrame({"image_id": ["a", "b", "c"], "path": ["a.png", "b.png", "c.png"]})
    out, missing = resolve_paths(m, tmp_path / "nih", only_existing=False)
    assert out["path"].to_list() == ["images_001/images/a.png", "images_002/images/b.png", "c.png"]
    assert missing == 1
    out, missing = resolve_paths(m, tmp_path / "flat", only_existing=True)
    assert out["path"].to_list() == ["a.png"] and missing == 2
    chex = pl.DataFrame({"path": ["CheXpert-v1.0-small/train/patient2/study1/view1_frontal.jpg",
                                  "train/patient1/study1/view1_frontal.jpg",
                                  "patient3/study1/view1_frontal.jpg",   # basename is ambiguous
                                  "CheXpert-v1.0-small/train/patient9/study1/view2_lateral.jpg",
                                  "x.dicom"]})                           # converted: found by stem
    for root, prefix in ((tmp_path / "chex", "CheXpert-v1.0-small/"),
                         (tmp_path / "chex" / "CheXpert-v1.0-small", "")):
        out, missing = resolve_paths(chex, root, only_existing=False)
        assert out["path"].to_list()[:3] == [f"{prefix}train/patient2/study1/view1_frontal.jpg",
                                             f"{prefix}train/patient1/study1/view1_frontal.jpg",
                                             "patient3/study1/view1_frontal.jpg"]
    _touch(tmp_path / "chex", "other/patient1/study1/view2_lateral.jpg")  # unique name, wrong patient
    out, missing = resolve_paths(chex, tmp_path / "chex", only_existing=False)
    assert out["path"].to_list()[3:] == ["CheXpert-v1.0-small/train/patient9/study1/view2_lateral.jpg",
                                         "vindr/x.png"]
    assert missing == 2
    with pytest.raises(ChxError, match="not a folder"):
        resolve_paths(m, tmp_path / "nope", only_existing=False)


# ------------------------------------------------------------------------------------ NIH

NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema",
                "Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening",
                "Pneumonia", "Pneumothorax")


@pytest.fixture(scope="module")
def nih_table() -> Path:
    return shared_path("metadata", "nih_data_entry_2017_v2020.csv.gz")


@pytest.fixture(scope="module")
def nih_rows(nih_table) -> list[dict[str, str]]:
    return rows_of(nih_table)


@pytest.fixture(scope="module")
def nih_manifest(nih_table) -> pl.DataFrame:
    return get_adapter("nih").prepare([nih_table], CXR_LT)


def test_nih_counts_match_the_table(nih_rows, nih_manifest):
    df = nih_manifest
    labels = Counter(lab for r in nih_rows for lab in r["Finding Labels"].split("|"))
    assert len(nih_rows) == df.height == 112_120
    assert len({r["Patient ID"] for r in nih_rows}) == df["subject_id"].n_unique() == 30_805
    assert df["study_id"].n_unique() == 112_120                    # one image per study
    assert dict(Counter(r["View Position"] for r in nih_rows)) == dict(df["view"].value_counts().iter_rows())
    assert positives(df, "Pleural Effusion") == labels["Effusion"] == 13_317
    assert positives(df, "Pleural Thickening") == labels["Pleural_Thickening"] == 3_385
    assert positives(df, "No Finding") == labels["No Finding"] == 60_361
    assert positives(df, "Hernia") == labels["Hernia"] == 227
    assert positives(df, "Infiltration") == labels["Infiltration"] == 19_894
    annotated = {"No Finding", "Pleural Effusion", "Pleural Thickening",
                 *(c for c in NIH_FINDINGS if c in CXR_LT)}
    assert len(annotated) == 15
    for c in CXR_LT:
        assert df[c].null_count() == (0 if c in annotated else 112_120), c
    normal = df.filter(pl.col("No Finding") == 1)
    assert all(normal[c].max() == 0 for c in annotated - {"No Finding"})
    row = next(r for r in nih_rows if r["Image Index"] == "00000001_001.png")
    got = df.filter(pl.col("image_id") == "00000001_001").row(0, named=True)
    assert (got["path"], got["study_id"], got["subject_id"], got["view"]) == \
        (row["Image Index"], "00000001_001", row["Patient ID"], row["View Position"])
    assert got["Cardiomegaly"] == got["Emphysema"] == 1 and got["Edema"] == 0


def test_nih_own_classes_keep_nih_names(nih_table):
    df = get_adapter("nih").prepare([nih_table], None)
    assert sorted(class_columns(df)) == sorted([*NIH_FINDINGS, "No Finding"])


def test_nih_restricted_to_existing_64px_images(nih_rows, nih_table):
    images = shared_path("nih-64px", "images")
    files = set(os.listdir(images))
    kept = [r for r in nih_rows if r["Image Index"] in files]
    df = get_adapter("nih").prepare([nih_table], CXR_LT, images=images, only_existing=True)
    assert df.height == len(kept) == len(files) == 1_000
    assert df["subject_id"].n_unique() == len({r["Patient ID"] for r in kept}) == 264
    assert all((images / p).is_file() for p in df["path"])
    labels = Counter(lab for r in kept for lab in r["Finding Labels"].split("|"))
    assert positives(df, "No Finding") == labels["No Finding"] == 499
    assert positives(df, "Pleural Effusion") == labels["Effusion"] == 170


# ------------------------------------------------------------------------------------ CheXpert

CHEXPERT_LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
                   "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
                   "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices")


@pytest.fixture(scope="module")
def chexpert_table() -> Path:
    return shared_path("metadata", "chexpert_train.csv.gz")


@pytest.fixture(scope="module")
def chexpert_rows(chexpert_table) -> list[dict[str, str]]:
    return rows_of(chexpert_table)


@pytest.fixture(scope="module")
def chexpert_manifests(chexpert_table) -> dict[str, pl.DataFrame]:
    out = {}
    for policy in ("ignore", "ones", "zeros"):
        out[f"{policy}_notes"] = []
        out[policy] = get_adapter("chexpert").prepare([chexpert_table], CXR_LT, uncertain=policy,
                                                      notes=out[f"{policy}_notes"])
    return out


def test_chexpert_structure_matches_the_table(chexpert_rows, chexpert_manifests):
    df = chexpert_manifests["ignore"]
    parts = [r["Path"].split("/") for r in chexpert_rows]
    studies = Counter(f"{p[2]}/{p[3]}" for p in parts)
    assert len(chexpert_rows) == df.height == 223_414
    assert len({p[2] for p in parts}) == df["subject_id"].n_unique() == 64_540
    assert len(studies) == df["study_id"].n_unique() == 187_641
    s = summarize(df)
    assert sum(n > 1 for n in studies.values()) == s["multi_view_studies"] == 33_994
    first = df.row(0, named=True)
    assert (first["image_id"], first["study_id"], first["subject_id"], first["path"]) == (
        "patient00001/study1/view1_frontal", "patient00001/study1", "patient00001",
        chexpert_rows[0]["Path"])

    def view(r):
        if r["Frontal/Lateral"] == "Lateral":
            return "LATERAL"
        return r["AP/PA"] if r["AP/PA"] in ("AP", "PA") else "OTHER"
    assert dict(Counter(map(view, chexpert_rows))) == dict(df["view"].value_counts().iter_rows())
    assert s["images"] - df["view"].is_in(["AP", "PA", "LATERAL"]).sum() == 17
    assert "Frontal/Lateral, AP/PA: 17 of 223,414 images became OTHER (Frontal LL 16, Frontal RL 1)" \
        in chexpert_manifests["ignore_notes"]


def test_chexpert_labels_agree_within_each_study(chexpert_rows):
    per_study = defaultdict(set)
    for r in chexpert_rows:
        p = r["Path"].split("/")
        per_study[f"{p[2]}/{p[3]}"].add(tuple(r[c] for c in CHEXPERT_LABELS))
    assert sum(len(v) > 1 for v in per_study.values()) == 0


def test_chexpert_uncertainty_policies(chexpert_rows, chexpert_manifests):
    for c in ("Cardiomegaly", "Edema", "Atelectasis", "Support Devices"):
        n = Counter(r[c] for r in chexpert_rows)
        ones, zeros, unc, blank = n["1.0"], n["0.0"], n["-1.0"], n[""]
        assert ones + zeros + unc + blank == 223_414
        def counts(policy):
            df = chexpert_manifests[policy]
            return positives(df, c), negatives(df, c), df[c].null_count()
        assert counts("ignore") == (ones, zeros, unc + blank)
        assert counts("ones") == (ones + unc, zeros, blank)
        assert counts("zeros") == (ones, zeros + unc, blank)
    cm = chexpert_manifests
    assert (positives(cm["ignore"], "Cardiomegaly"), positives(cm["ones"], "Cardiomegaly")) == (27_000, 35_087)
    assert (negatives(cm["ignore"], "Cardiomegaly"), negatives(cm["zeros"], "Cardiomegaly")) == (11_116, 19_203)
    for c in set(CXR_LT) - set(CHEXPERT_LABELS):
        assert cm["ones"][c].null_count() == 223_414, c


def test_chexpert_rejects_an_unknown_policy(chexpert_table):
    with pytest.raises(ChxError, match="--uncertain 'maybe'"):
        get_adapter("chexpert").prepare([chexpert_table], CXR_LT, uncertain="maybe")


# ------------------------------------------------------------------------------------ VinDr

@pytest.fixture(scope="module")
def vindr_table() -> Path:
    return shared_path("metadata", "vindr_cxr_train.csv.gz")


def vindr_expected(rows, min_readers: int) -> dict[str, int]:
    readers = defaultdict(set)
    for r in rows:
        if r["class_name"] != "No finding":
            readers[(r["image_id"], r["class_name"])].add(r["rad_id"])
    counts = Counter(cls for (_, cls), rads in readers.items() if len(rads) >= min_readers)
    with_finding = {img for (img, _), rads in readers.items() if len(rads) >= min_readers}
    counts["No finding"] = len({r["image_id"] for r in rows} - with_finding)
    return counts


def test_vindr_reader_threshold(vindr_table):
    rows = rows_of(vindr_table)
    one = get_adapter("vindr").prepare([vindr_table], None, min_readers=1)
    two = get_adapter("vindr").prepare([vindr_table], None, min_readers=2)
    assert len(rows) == 67_914
    assert one.height == two.height == len({r["image_id"] for r in rows}) == 15_000
    assert set(one["view"]) == {"PA"} and (one["study_id"] == one["image_id"]).all()
    assert one["path"][0] == f"train/{one['image_id'][0]}.dicom"
    want1, want2 = vindr_expected(rows, 1), vindr_expected(rows, 2)
    for c in class_columns(one):
        assert positives(one, c) == want1[c], c
        assert positives(two, c) == want2[c], c
        assert one[c].null_count() == 0
    assert [positives(one, c) for c in ("Cardiomegaly", "Pleural effusion", "Pneumothorax", "No finding")] \
        == [2_300, 1_032, 96, 10_606]
    assert [positives(two, c) for c in ("Cardiomegaly", "Pleural effusion", "Pneumothorax", "No finding")] \
        == [1_817, 634, 58, 10_648]
    findings = [c for c in class_columns(one) if c != "No finding"]
    assert all(positives(two, c) < positives(one, c) for c in findings)


def test_vindr_onto_cxr_lt_maps_synonyms_and_drops_the_rest(vindr_table):
    own = get_adapter("vindr").prepare([vindr_table], None)
    df = get_adapter("vindr").prepare([vindr_table], CXR_LT)
    pairs = {"Pleural Effusion": "Pleural effusion", "Pleural Thickening": "Pleural thickening",
             "Fibrosis": "Pulmonary fibrosis", "No Finding": "No finding", "Lung Opacity": "Lung Opacity",
             "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly",
             "Consolidation": "Consolidation", "Infiltration": "Infiltration",
             "Pneumothorax": "Pneumothorax"}
    for target, native in pairs.items():
        assert positives(df, target) == positives(own, native) and df[target].null_count() == 0
    for c in set(CXR_LT) - set(pairs):
        assert df[c].null_count() == 15_000, c
    assert positives(df, "Calcification of the Aorta") == 0   # VinDr's Calcification is not mapped


# ------------------------------------------------------------------------------------ IU X-ray

@pytest.fixture(scope="module")
def iu_folder() -> Path:
    return shared_path("iu-xray-labels")


def iu_terms(reports) -> dict[str, list[tuple[str, list[str]]]]:
    """uid -> [(finding key, lower-cased modifiers)] straight from the MeSH strings."""
    out = {}
    for r in reports:
        terms = []
        for t in r["MeSH"].split(";"):
            parts = [p.strip() for p in t.strip().split("/")]
            if parts[0]:
                terms.append((" ".join(parts[0].split()).casefold(), [p.lower() for p in parts[1:]]))
        out[r["uid"]] = terms
    return out


def test_iu_xray_counts_match_the_tables(iu_folder):
    reports = rows_of(iu_folder / "indiana_reports.csv")
    projections = rows_of(iu_folder / "indiana_projections.csv")
    terms = iu_terms(reports)
    df = get_adapter("iu-xray").prepare([iu_folder], CXR_LT)
    per_study = Counter(p["uid"] for p in projections)
    assert (len(reports), len(projections), len(per_study)) == (3_851, 7_466, 3_851)
    assert df.height == 7_466 and df["study_id"].n_unique() == 3_851
    assert summarize(df)["multi_view_studies"] == sum(n > 1 for n in per_study.values()) == 3_405
    assert dict(df["view"].value_counts().iter_rows()) == {"PA": 3_818, "LATERAL": 3_648}
    unindexed = {u for u, t in terms.items() if ("no indexing", []) in t}
    assert len(unindexed) == 92
    n_null = sum(per_study[u] for u in unindexed)
    assert df["Cardiomegaly"].null_count() == df["No Finding"].null_count() == n_null == 172

    def images_with(rule) -> int:
        return sum(per_study[u] for u, t in terms.items() if u not in unindexed and any(map(rule, t)))
    assert positives(df, "No Finding") == images_with(lambda t: t[0] == "normal") == 2_695
    assert positives(df, "Cardiomegaly") == images_with(
        lambda t: t[0] == "cardiomegaly" or (t[0] == "cardiac shadow" and "enlarged" in t[1])) == 693
    assert positives(df, "Pleural Effusion") == images_with(lambda t: t[0] == "pleural effusion") == 286
    assert positives(df, "Lung Opacity") == images_with(
        lambda t: t[0] in ("opacity", "airspace disease")) == 979
    assert positives(df, "Tortuous Aorta") == images_with(
        lambda t: t[0] in ("aorta", "aorta, thoracic") and "tortuous" in t[1]) == 453
    assert positives(df, "Calcification of the Aorta") == images_with(
        lambda t: t[0] in ("calcinosis", "atherosclerosis") and any(m.startswith("aorta") for m in t[1])) == 390
    assert negatives(df, "Cardiomegaly") == 7_466 - 172 - 693     # report-level negatives
    for c in ("Enlarged Cardiomediastinum", "Lung Lesion", "Pleural Other", "Pneumomediastinum"):
        assert df[c].null_count() == 7_466, c


def test_iu_xray_own_classes_are_every_mesh_finding(iu_folder):
    reports = rows_of(iu_folder / "indiana_reports.csv")
    keys = {k for t in iu_terms(reports).values() for k, _ in t} - {"normal", "no indexing"}
    files = [iu_folder / "indiana_projections.csv", iu_folder / "indiana_reports.csv"]
    df = get_adapter("iu-xray").prepare(files, None)
    classes = class_columns(df)
    assert len(classes) == len(keys) + 1 == 117 and classes[0] == "No Finding"
    assert "Subcutaneous Emphysema" in classes and "Subcutaneous  Emphysema" not in classes
    assert positives(df, "Opacity") == 840 and positives(df, "Calcified Granuloma") == 510


# ------------------------------------------------------------------------------------ covid

def covid_rows(table):
    """The X-ray rows as the adapter should keep them, computed independently: patients that share
    a file are one patient (the first id listing it); a file listed again is dropped."""
    rows = [r for r in rows_of(table) if r["modality"] == "X-ray"]
    first_pid = {}
    for r in rows:
        first_pid.setdefault(r["filename"], r["patientid"])
    alias = {r["patientid"]: first_pid[r["filename"]] for r in rows
             if first_pid[r["filename"]] != r["patientid"]}
    seen, kept = set(), []
    for r in rows:
        if r["filename"] not in seen:
            seen.add(r["filename"])
            kept.append({**r, "patientid": alias.get(r["patientid"], r["patientid"])})
    return rows, kept


def test_covid_counts_classes_and_images():
    table, images = shared_path("covid-cxr", "metadata.csv"), shared_path("covid-cxr", "images")
    raw, rows = covid_rows(table)
    assert len(raw) == 396  # 5 files are listed twice, under two patient ids
    df = get_adapter("covid").prepare([table], None, images=images)
    studies = Counter(f"p{r['patientid']}_d{r['offset'] or 'NA'}" for r in rows)
    findings = Counter(f for r in rows for f in r["finding"].split(", "))
    assert df.height == len(rows) == 391
    assert df["study_id"].n_unique() == len(studies) == 324
    assert df["subject_id"].n_unique() == len({r["patientid"] for r in rows}) == 196
    assert summarize(df)["multi_view_studies"] == sum(n > 1 for n in studies.values()) == 57
    assert "p5_dNA" in set(df["study_id"])
    assert class_columns(df) == sorted(set(findings) - {"todo"}, key=str.casefold)
    assert len(class_columns(df)) == 14
    for c in ("COVID-19", "ARDS", "No Finding", "Pneumocystis"):
        assert positives(df, c) == findings[c], c
    assert positives(df, "COVID-19") == 217
    assert df["COVID-19"].null_count() == findings["todo"] == 78
    # Every row's file is found, each file once.
    assert all((images / p).is_file() for p in df["path"])
    assert df["path"].n_unique() == df["image_id"].n_unique() == 391
    assert dict(df["view"].value_counts().iter_rows()) == {"PA": 190, "AP": 120, "LATERAL": 42, "OTHER": 39}


def test_covid_onto_cxr_lt_keeps_only_no_finding():
    df = get_adapter("covid").prepare([shared_path("covid-cxr", "metadata.csv")], CXR_LT)
    assert positives(df, "No Finding") == 12 and df["No Finding"].null_count() == 78
    assert all(df[c].null_count() == df.height == 391 for c in CXR_LT if c != "No Finding")


def test_chx_prepare_covid_end_to_end(capsys, tmp_path):
    out = tmp_path / "covid.parquet"
    code, stdout, err = run_chx(capsys, "prepare", "covid", shared_path("covid-cxr", "metadata.csv"),
                                "--images", shared_path("covid-cxr", "images"), "-o", out)
    assert code == 0, err
    assert "391 images, 324 studies (57 multi-view), 196 patients, 14 classes" in stdout


# ------------------------------------------------------------------------------------ CXR-LT

CXR_LT_HEADER = ["dicom_id", "subject_id", "study_id", "ViewPosition", "path",
                 "Atelectasis", "Cardiomegaly", "Pneumomediastinum", "Tortuous Aorta", "fold"]


def write_cxr_lt(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([CXR_LT_HEADER, *rows])
    return path


def test_cxr_lt_csvs(tmp_path):
    train = write_cxr_lt(tmp_path / "train.csv", [
        ["02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "10000032", "50414267", "PA",
         "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg",
         "0", "1", "0", "1", "train"],
        ["174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "10000032", "50414267", "LATERAL",
         "files/p10/p10000032/s50414267/174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962.jpg",
         "0", "1", "0", "1", "train"],
        ["2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "10000032", "53189527", "AP AXIAL",
         "files/p10/p10000032/s53189527/2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab.jpg",
         "1", "0", "0", "0", "train"],
    ])
    val = write_cxr_lt(tmp_path / "val.csv", [
        ["68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714", "10000764", "57375967", "",
         "files/p10/p10000764/s57375967/68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714.jpg",
         "0", "0", "1", "0", "val"],
    ])
    df = get_adapter("cxr-lt").prepare([train, val], CXR_LT)
    assert df.height == 4 and df["split"].null_count() == 4 and "fold" not in df.columns
    assert df["view"].to_list() == ["PA", "LATERAL", "OTHER", "OTHER"]
    assert df["image_id"][0] == "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"
    assert df["path"][0].startswith("files/p10/p10000032/s50414267/")
    assert df["Cardiomegaly"].to_list() == [1, 1, 0, 0] and df["Pneumomediastinum"].to_list() == [0, 0, 0, 1]
    assert df["Edema"].null_count() == 4
    own = get_adapter("cxr-lt").prepare([tmp_path], None)
    assert class_columns(own) == ["Atelectasis", "Cardiomegaly", "Pneumomediastinum", "Tortuous Aorta"]
    _touch(tmp_path / "mimic", "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg")
    df = get_adapter("cxr-lt").prepare([train], CXR_LT, images=tmp_path / "mimic", only_existing=True)
    assert df.height == 1


def test_cxr_lt_images_of_a_study_are_combined(tmp_path):
    table = write_cxr_lt(tmp_path / "t.csv", [
        ["a", "1", "s1", "PA", "a.jpg", "1", "", "0", "", "train"],
        ["b", "1", "s1", "LATERAL", "b.jpg", "0", "", "", "", "train"],
    ])
    df = get_adapter("cxr-lt").prepare([table], None)
    assert df["Atelectasis"].to_list() == [1, 1] and df["Pneumomediastinum"].to_list() == [0, 0]
    assert df["Cardiomegaly"].null_count() == 2


def test_cxr_lt_bad_label_names_file_row_and_column(tmp_path):
    table = write_cxr_lt(tmp_path / "t.csv", [["a", "1", "s1", "PA", "a.jpg", "1", "yes", "0", "", "x"]])
    with pytest.raises(ChxError, match=r"t\.csv: data row 1, column 'Cardiomegaly': label 'yes'"):
        get_adapter("cxr-lt").prepare([table], CXR_LT)


# ------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("name", ["cxr-lt", "nih", "chexpert", "vindr", "covid"])
def test_missing_file_is_named(tmp_path, name):
    missing = tmp_path / "absent.csv"
    with pytest.raises(ChxError, match=f"{missing}.* does not exist"):
        get_adapter(name).prepare([missing], None)


@pytest.mark.parametrize("name, header, absent", [
    ("nih", "Image Index,Patient ID,View Position", "'Finding Labels'"),
    ("chexpert", "Path,Sex,Age,Frontal/Lateral,AP/PA", "'No Finding'"),
    ("vindr", "image_id,class_name,x_min", "'rad_id'"),
    ("covid", "patientid,offset,finding,view,filename", "'modality'"),
    ("cxr-lt", "dicom_id,subject_id,study_id,path,Atelectasis", "'ViewPosition'"),
])
def test_missing_column_names_the_file_and_column(tmp_path, name, header, absent):
    table = tmp_path / "table.csv"
    table.write_text(header + "\n" + ",".join("x" for _ in header.split(",")) + "\n")
    with pytest.raises(ChxError) as err:
        get_adapter(name).prepare([table], None)
    assert str(table) in str(err.value) and absent in str(err.value) and "expects" in str(err.value)


def test_iu_xray_needs_both_tables(iu_folder):
    with pytest.raises(ChxError, match="one reports table .* and one projections table"):
        get_adapter("iu-xray").prepare([iu_folder / "indiana_reports.csv"], None)


def test_unknown_option_is_refused(nih_table):
    with pytest.raises(ChxError, match="takes no option uncertain"):
        get_adapter("nih").prepare([nih_table], None, uncertain="ones")
