"""Feature store: the same tests over every layout - Zarr format 2 (sharded; local, memory://, file://),
Zarr format 1 (one object per image, today's older stores) and HDF5 (format 2)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from chx.errors import ChxError
from chx.store import StudyFeatures, create_store, open_store, projected_size

SHAPE = (3, 4, 5)
CLASSES = ["Atelectasis", "Effusion", "Pneumonia"]
FP = {"checkpoint_sha256": "abc123", "model": "convnext_test", "input_size": 64, "layer": "last-stage",
      "flip": False, "dtype": "float16", "pool": 1}
ROOT = Path(__file__).resolve().parents[1]


def make_inputs(n_studies: int = 9, seed: int = 0) -> dict:
    """Per-image inputs in shuffled order: 1-4 views per study, labels with NaN, studies' splits."""
    rng = np.random.default_rng(seed)
    views_all = ["PA", "AP", "LATERAL", "LL", "OTHER"]
    rows = []
    for s in range(n_studies):
        lab = rng.integers(0, 2, len(CLASSES)).astype(np.float32)
        lab[rng.random(len(CLASSES)) < 0.3] = np.nan
        split = ["train", "val", "test", ""][s % 4]
        for v in range(int(rng.integers(1, 5))):
            rows.append((f"img{s}_{v}", f"study{s}", views_all[int(rng.integers(0, 5))], split, lab))
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    return {"image_ids": [r[0] for r in rows], "study_ids": [r[1] for r in rows], "views": [r[2] for r in rows],
            "splits": [r[3] for r in rows], "labels": np.stack([r[4] for r in rows]),
            "class_names": list(CLASSES), "feature_shape": SHAPE, "fingerprint": dict(FP)}


def image_features(image_ids, flip: bool = False) -> np.ndarray:
    """float32 features per image id, reproducible anywhere (also in the writer subprocesses)."""
    out = []
    for x in image_ids:
        seed = int.from_bytes(x.encode(), "little") % (2**32) + (7 if flip else 0)
        out.append(np.random.default_rng(seed).normal(0, 3, SHAPE).astype(np.float32))
    return np.stack(out)


def store_path(tmp_path: Path, backend: str) -> str:
    return {"zarr": str(tmp_path / "feats.zarr"), "zarr1": str(tmp_path / "feats.zarr"),
            "hdf5": str(tmp_path / "feats.h5"), "hdf51": str(tmp_path / "feats.h5"),
            "memory": f"memory://chx-test-{uuid.uuid4().hex}",
            "file": f"file://{tmp_path}/feats.zarr"}[backend]


def layout_kw(backend: str, shard_images: int = 4) -> dict:
    """create_store options of a layout: format 1 for "zarr1" and "hdf51", else format 2 with small
    shards (so that the ~25 test images span several shards)."""
    return {"format_version": 1} if backend.endswith("1") else {"shard_images": shard_images}


def write_images(store, ids, batch_rng=None, flip=False):
    """Write these images' features: format 1 in random batches of 1-4 rows; format 2 shard by shard
    in random order (the ids must make whole shards)."""
    ids = list(ids)
    rng = batch_rng or np.random.default_rng(1)
    if store.is_sharded:
        rows = store.image_index(ids)
        shards = np.unique(store.shard_of_row(rows))
        assert sum(np.subtract(*store.shard_rows(s)[::-1]) for s in shards) == len(ids), "ids must be whole shards"
        for s in shards[rng.permutation(len(shards))]:
            write_shard(store, int(s), flip)
        return
    ids = [ids[i] for i in rng.permutation(len(ids))]
    i = 0
    while i < len(ids):
        b = ids[i:i + int(rng.integers(1, 5))]
        store.write(store.image_index(b), image_features(b), image_features(b, True) if flip else None)
        i += len(b)


def write_shard(store, s: int, flip: bool | None = None) -> None:
    a, b = store.shard_rows(s)
    ids = store.image_ids[a:b]
    flip = store.has_flip if flip is None else flip
    store.write_shard(s, image_features(ids), image_features(ids, True) if flip else None)


def ids_of_shards(store, shards) -> list[str]:
    return [store.image_ids[r] for s in shards for r in range(*store.shard_rows(s))]


def assert_done_listing_agrees(s) -> None:
    """Zarr: done comes from listing the done objects; it agrees with reading the done array."""
    name = "shard_done" if s.is_sharded else "done"
    assert s._chunk_ids(name) is not None                           # the fast path answered
    stored = np.asarray(s._arrays[name][...])
    np.testing.assert_array_equal((stored[:, 0] if stored.ndim == 2 else stored) != 0, s._done_units())


BACKENDS = ["zarr", "zarr1", "hdf5", "hdf51"]


@pytest.mark.parametrize("backend,flip", [("zarr", True), ("zarr1", True), ("hdf5", True), ("hdf51", True),
                                          ("memory", True), ("zarr", False), ("zarr1", False), ("hdf5", False),
                                          ("file", False)])
def test_round_trip(tmp_path, backend, flip):
    inp = make_inputs()
    path = store_path(tmp_path, backend)
    fp = dict(FP, flip=flip)
    with create_store(path, **{**inp, "fingerprint": fp}, flip=flip, **layout_kw(backend)) as s:
        assert s.backend == ("hdf5" if backend.startswith("hdf5") else "zarr")
        assert s.format_version == (1 if backend.endswith("1") else 2) and s.is_sharded == (s.format_version == 2)
        assert s.supports_parallel_writers == (s.backend == "zarr")
        assert s.missing_rows().tolist() == list(range(len(inp["image_ids"])))
        write_images(s, inp["image_ids"], flip=flip)
        s.mark_complete()

    by_id = {x: j for j, x in enumerate(inp["image_ids"])}
    with open_store(path) as s:
        n = len(inp["image_ids"])
        assert (s.n_images, s.n_studies) == (n, len(set(inp["study_ids"])))
        assert s.complete and s.done.all() and len(s.missing_rows()) == 0
        assert s.class_names == CLASSES and s.fingerprint == fp and s.feature_shape == SHAPE
        assert s.has_flip == flip
        # Studies in first-appearance order; CSR slices cover every image once, in input order within a study.
        first_seen = list(dict.fromkeys(inp["study_ids"]))
        assert s.study_ids == first_seen
        ptr = s.study_ptr
        assert ptr[0] == 0 and ptr[-1] == n and np.all(np.diff(ptr) >= 1)
        covered = np.concatenate([np.arange(ptr[i], ptr[i + 1]) for i in range(s.n_studies)])
        assert covered.tolist() == list(range(n))
        for i, sid in enumerate(s.study_ids):
            st = s.read_study(i)
            assert isinstance(st, StudyFeatures) and st.study_id == sid
            expect_ids = [x for x, y in zip(inp["image_ids"], inp["study_ids"]) if y == sid]
            assert st.image_ids == expect_ids
            js = [by_id[x] for x in expect_ids]
            assert st.views == [inp["views"][j] for j in js]
            assert st.split == inp["splits"][js[0]]
            np.testing.assert_array_equal(st.labels, inp["labels"][js[0]])
            assert st.labels.dtype == np.float32
            ref = image_features(expect_ids)
            assert st.features.dtype == np.float16 and st.features.shape == (len(js), *SHAPE)
            np.testing.assert_array_equal(st.features, ref.astype(np.float16))
            np.testing.assert_allclose(st.features.astype(np.float32), ref, rtol=1e-3, atol=1e-3)
            if flip:
                np.testing.assert_array_equal(st.features_flip, image_features(expect_ids, True).astype(np.float16))
            else:
                assert st.features_flip is None
        row = int(s.image_index([inp["image_ids"][0]])[0])
        np.testing.assert_array_equal(s.read_image(row), image_features(inp["image_ids"][:1])[0].astype(np.float16))
        # Splits: a study's split is its images' split.
        for split in ("train", "val", "test", ""):
            want = [i for i, sid in enumerate(s.study_ids)
                    if inp["splits"][inp["study_ids"].index(sid)] == split]
            assert s.study_indices(split).tolist() == want
        assert s.study_indices().tolist() == list(range(s.n_studies))
        assert s.nbytes_per_image == int(np.prod(SHAPE)) * 2 * (2 if flip else 1)


@pytest.mark.parametrize("backend", BACKENDS + ["memory"])
def test_resume_keeps_done(tmp_path, backend):
    inp = make_inputs(seed=3)
    path = store_path(tmp_path, backend)
    with create_store(path, **inp, **layout_kw(backend)) as s:
        # format 1: half of the images in any order; format 2: every other shard
        half = ids_of_shards(s, range(0, s.n_shards, 2)) if s.is_sharded else inp["image_ids"][: s.n_images // 2]
        write_images(s, half)
        done_rows = sorted(s.image_index(half).tolist())
    with create_store(path, **inp, **layout_kw(backend)) as s:          # same arguments: reopened for writing
        assert s.writable and s.updated_metadata == []
        if s.backend == "zarr":   # done comes from listing chunk keys; it agrees with reading the array
            assert_done_listing_agrees(s)
        assert np.flatnonzero(s.done).tolist() == done_rows
        rest_ids = [x for x in inp["image_ids"] if x not in set(half)]
        rest = sorted(s.image_index(rest_ids).tolist())
        assert s.missing_rows().tolist() == rest
        assert s.missing_shards().tolist() == sorted(set(s.shard_of_row(rest).tolist()))
        np.testing.assert_array_equal(s.read_image(done_rows[0]),
                                      image_features([s.image_ids[done_rows[0]]])[0].astype(np.float16))
        write_images(s, rest_ids)
        assert len(s.missing_rows()) == 0
        s.mark_complete()
        assert s.complete


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_with_reordered_manifest_and_new_labels(tmp_path, backend):
    inp = make_inputs(seed=4)
    path = store_path(tmp_path, backend)
    with create_store(path, **inp, **layout_kw(backend, shard_images=5)) as s:
        write_images(s, ids_of_shards(s, [0]) if s.is_sharded else inp["image_ids"][:5])
        layout_ids = list(s.image_ids)
    perm = np.random.default_rng(0).permutation(len(inp["image_ids"]))
    re = {k: ([v[i] for i in perm] if isinstance(v, list) and k not in ("class_names",) else v)
          for k, v in inp.items()}
    re["labels"] = inp["labels"][perm].copy()
    sid0 = re["study_ids"][0]
    re["labels"][[i for i, x in enumerate(re["study_ids"]) if x == sid0]] = 1.0   # relabel one study
    with create_store(path, **re, **layout_kw(backend, shard_images=5)) as s:
        assert s.image_ids == layout_ids and int(s.done.sum()) == 5   # layout and progress kept
        assert s.updated_metadata == ["labels"]
    with open_store(path) as s:
        np.testing.assert_array_equal(s.labels[s.study_ids.index(sid0)], np.ones(len(CLASSES), np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change,expect", [
    ("fingerprint", "fingerprint field(s) differ: model"),
    ("classes", "class list differs"),
    ("images", "images differ"),
    ("study", "belong to another study"),
    ("dtype", "dtype float16 in the store vs float8 now"),
])
def test_mismatch_refused(tmp_path, backend, change, expect):
    inp = make_inputs(seed=5)
    path = store_path(tmp_path, backend)
    create_store(path, **inp, **layout_kw(backend)).close()
    other = dict(inp)
    if change == "dtype":
        other["dtype"] = "float8"
    if change == "fingerprint":
        other["fingerprint"] = dict(FP, model="another_backbone")
    elif change == "classes":
        other["class_names"] = ["Atelectasis", "Effusion", "Edema"]
    elif change == "images":
        other["image_ids"] = inp["image_ids"][:-1] + ["brand_new_image"]
    elif change == "study":
        other["study_ids"] = ["moved_study"] + inp["study_ids"][1:]
    with pytest.raises(ChxError) as e:
        create_store(path, **other)
    msg = str(e.value)
    assert "\n" not in msg
    assert expect in msg and "--overwrite" in msg and path in msg
    if change == "fingerprint":
        assert "another_backbone" in msg and "input_size" not in msg


@pytest.mark.parametrize("backend", ["zarr1", "hdf51"])
def test_format_1_is_read_but_not_written(tmp_path, backend):
    """A format-1 store is read as before, but create_store (what extract-features calls) does not
    reopen it for writing: one line saying so and what to do; --overwrite makes a format-2 store."""
    inp = make_inputs(seed=5)
    path = store_path(tmp_path, backend)
    with create_store(path, **inp, **layout_kw(backend)) as s:   # format_version=1: the tests' old stores
        write_images(s, inp["image_ids"])
        s.mark_complete()
    with pytest.raises(ChxError) as e:
        create_store(path, **inp)
    msg = str(e.value)
    assert "\n" not in msg and path in msg and "format 1 in the store" in msg and "--overwrite" in msg
    with open_store(path, require_complete=True) as s:          # still read, every row
        assert s.format_version == 1
        np.testing.assert_array_equal(s.read_rows(0, s.n_images),
                                      image_features(s.image_ids).astype(np.float16))
    with create_store(path, **inp, overwrite=True) as s:
        assert s.format_version == 2 and s.is_sharded and not s.done.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_overwrite_replaces(tmp_path, backend):
    inp = make_inputs(seed=6)
    path = store_path(tmp_path, backend)
    with create_store(path, **inp, **layout_kw(backend)) as s:
        write_images(s, inp["image_ids"])
    fp2 = dict(FP, model="another_backbone")
    with create_store(path, **{**inp, "fingerprint": fp2}, overwrite=True, **layout_kw(backend)) as s:
        assert s.fingerprint == fp2 and not s.done.any() and not s.complete
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(path).name]   # no temp or old copies left


@pytest.mark.parametrize("backend", BACKENDS + ["memory"])
def test_mark_complete_refuses_incomplete(tmp_path, backend):
    inp = make_inputs(seed=7)
    path = store_path(tmp_path, backend)
    with create_store(path, **inp, **layout_kw(backend, shard_images=1)) as s:   # format 2: one image per shard
        write_images(s, [x for x in inp["image_ids"] if x != s.image_ids[0]])
        with pytest.raises(ChxError, match="incomplete: 1 of"):
            s.mark_complete()
        assert not s.complete


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_only_refuses_writes(tmp_path, backend):
    inp = make_inputs(seed=8)
    path = store_path(tmp_path, backend)
    create_store(path, **inp, **layout_kw(backend)).close()
    with open_store(path) as s:
        assert not s.writable
        with pytest.raises(ChxError, match="read-only"):
            s.write(np.array([0]), image_features(s.image_ids[:1]))
        with pytest.raises(ChxError, match="read-only"):
            write_shard(s, 0)
        with pytest.raises(ChxError, match="read-only"):
            s.mark_shards_missing([0])
        with pytest.raises(ChxError, match="read-only"):
            s.mark_complete()
    with open_store(path) as s:
        assert not s.done.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_store_is_chx_error(tmp_path, backend):
    path = store_path(tmp_path, backend)
    with pytest.raises(ChxError, match="no feature store at") as e:
        open_store(path)
    assert path in str(e.value)


def test_corrupt_hdf5(tmp_path):
    inp = make_inputs(seed=9)
    path = str(tmp_path / "feats.h5")
    with create_store(path, **inp) as s:
        write_images(s, inp["image_ids"])
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])              # truncated
    with pytest.raises(ChxError) as e:
        open_store(path)
    assert path in str(e.value) and "--overwrite" in str(e.value)
    with pytest.raises(ChxError, match="--overwrite"):
        create_store(path, **inp)
    with create_store(path, **inp, overwrite=True) as s:         # provably chx's (its header): replaced
        assert s.n_images == len(inp["image_ids"])
    # Garbage that chx did not make is never replaced, not even with --overwrite (issue 20, class 1;
    # this used to be replaced).
    Path(path).write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(ChxError):
        open_store(path)
    with pytest.raises(ChxError, match="--overwrite"):
        create_store(path, **inp)
    with pytest.raises(ChxError, match="refusing to replace"):
        create_store(path, **inp, overwrite=True)
    assert Path(path).read_bytes() == b"not an hdf5 file at all" * 10
    import h5py                                                   # valid HDF5, not a chx store
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(ChxError, match="not a chx feature store"):
        open_store(other)


@pytest.mark.parametrize("victim", ["zarr.json", "features/zarr.json", "image_id/zarr.json"])
def test_zarr_missing_metadata(tmp_path, victim):
    inp = make_inputs(seed=10)
    path = str(tmp_path / "feats.zarr")
    create_store(path, **inp).close()
    (Path(path) / victim).unlink()
    with pytest.raises(ChxError) as e:
        open_store(path)
    assert path in str(e.value)
    with pytest.raises(ChxError, match="--overwrite"):
        create_store(path, **inp)


def test_zarr_half_initialised_and_foreign_folders(tmp_path):
    import json

    inp = make_inputs(seed=11)
    path = tmp_path / "feats.zarr"
    create_store(str(path), **inp).close()
    meta = json.loads((path / "zarr.json").read_text())
    del meta["attributes"]["format_version"]                     # what an interrupted creation looks like
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(ChxError, match="creation was interrupted"):
        open_store(path)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(ChxError, match="not a chx feature store"):
        open_store(foreign)
    with pytest.raises(ChxError, match="refusing to replace"):
        create_store(str(foreign), **inp, overwrite=True)
    assert (foreign / "holiday.jpg").exists()


def test_interrupted_zarr_creation_leaves_nothing(tmp_path, monkeypatch):
    from chx.store import _zarr

    real = _zarr._populate

    def crash(store, *a, **k):
        real(store, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(_zarr, "_populate", crash)
    with pytest.raises(KeyboardInterrupt):
        create_store(str(tmp_path / "feats.zarr"), **make_inputs(seed=12))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_info(tmp_path, backend):
    inp = make_inputs(seed=13)
    path = store_path(tmp_path, backend)
    with create_store(path, **inp, flip=True, **layout_kw(backend)) as s:
        write_images(s, inp["image_ids"], flip=True)
        s.mark_complete()
    with open_store(path) as s:
        info = s.info()
    assert info["format_version"] == s.format_version and info["shards"] == s.n_shards
    assert info["layout"].startswith("sharded: 4 images per shard" if s.is_sharded else "one object per image")
    assert info["bytes_per_image"] == info["bytes_per_image_decoded"] == int(np.prod(SHAPE)) * 2 * 2
    # real size on disk (st_blocks, what du counts) and logical size, separately
    assert info["bytes_on_disk"] >= 512 and info["bytes_logical"] > 0 and info["files"] >= 1
    du = shutil.which("du")
    if du:
        assert info["bytes_on_disk"] == int(subprocess.run([du, "-s", "--block-size=1", path], capture_output=True,
                                                           text=True, check=True).stdout.split()[0])
    n, studies = len(inp["image_ids"]), list(dict.fromkeys(inp["study_ids"]))
    assert info["backend"] == s.backend and info["images"] == n and info["studies"] == len(studies)
    hist: dict[int, int] = {}
    for sid in studies:
        v = inp["study_ids"].count(sid)
        hist[v] = hist.get(v, 0) + 1
    assert info["views_per_study"] == hist
    split_of = {sid: inp["splits"][inp["study_ids"].index(sid)] for sid in studies}
    assert info["splits"] == {sp: list(split_of.values()).count(sp) for sp in set(split_of.values())}
    assert info["split_images"] == {sp: inp["splits"].count(sp) for sp in set(inp["splits"])}
    assert info["feature_shape"] == list(SHAPE) and info["dtype"] == "float16" and info["flip"]
    assert info["complete"] and info["done"] == n
    assert info["bytes_uncompressed"] == n * int(np.prod(SHAPE)) * 2 * 2 == info["bytes_projected"]
    assert info["bytes_on_disk"] > 0 and info["compression_ratio"] > 0
    assert info["fingerprint"] == FP and info["class_names"] == CLASSES
    assert projected_size(10, (768, 32, 32), False) == 10 * 768 * 32 * 32 * 2
    assert projected_size(10, (768, 32, 32), True) == 2 * 10 * 768 * 32 * 32 * 2


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_store_info_and_verify_json_are_valid_json_with_nan_in_the_fingerprint(tmp_path, backend, capsys):
    """`chx store info --json` / `verify --json` print strict JSON: a NaN or inf (here in the
    fingerprint, which the store keeps as given) becomes null, never a bare NaN/Infinity."""
    import json

    from helpers import run_chx

    inp = make_inputs(seed=14)
    inp["fingerprint"] = {"model": "m", "mean": float("nan"), "top": float("inf")}
    path = store_path(tmp_path, backend)
    with create_store(path, **inp, shard_images=4) as s:
        write_images(s, inp["image_ids"])
        s.mark_complete()
        assert np.isnan(s.fingerprint["mean"])                    # the store itself keeps the NaN
    code, out, _ = run_chx(capsys, "store", "info", "--json", path)
    assert code == 0 and "NaN" not in out and "Infinity" not in out
    info = json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c} in store info --json"))
    assert info["fingerprint"] == {"model": "m", "mean": None, "top": None} and info["complete"]
    code, out, _ = run_chx(capsys, "store", "verify", "--json", path)
    report = json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c} in store verify --json"))
    assert code == 0 and report["ok"] and report["checked"] == report["n_shards"] > 1


def test_input_validation(tmp_path):
    inp = make_inputs(seed=14)
    path = str(tmp_path / "feats.zarr")
    with pytest.raises(ChxError, match="more than once"):
        create_store(path, **{**inp, "image_ids": [inp["image_ids"][0]] * len(inp["image_ids"])})
    with pytest.raises(ChxError, match="views must be one of"):
        create_store(path, **{**inp, "views": ["FRONTAL"] * len(inp["views"])})
    lab = inp["labels"].copy()
    sid = inp["study_ids"][0]
    rows = [i for i, x in enumerate(inp["study_ids"]) if x == sid]
    if len(rows) > 1:
        lab[rows[1]] = 1 - np.nan_to_num(lab[rows[1]])
        with pytest.raises(ChxError, match="must share"):
            create_store(path, **{**inp, "labels": lab})
    assert not Path(path).exists()


WRITER = """
import os, sys, time, numpy as np
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from test_store import image_features, write_shard
from chx.store import open_store
s = open_store({path!r}, mode="r+")
rows = np.load({rows!r})
open({ready!r}, "w").close()
t0 = time.time()
while not os.path.exists({go!r}) and time.time() - t0 < 60:   # start writing together
    time.sleep(0.005)
if s.is_sharded:                                             # whole shards: the ones this writer owns
    for sh in s.shards_for_writer({writer}, 2):
        write_shard(s, int(sh))
else:                                                        # format 1: any rows, two at a time
    for i in range(0, len(rows), 2):
        b = rows[i:i + 2]
        ids = [s.image_ids[r] for r in b]
        s.write(b, image_features(ids), image_features(ids, True))
s.close()
"""


def map_files(path) -> dict[str, bytes]:
    """Every object of a Zarr store's map arrays and done markers, by key (temp files excluded)."""
    root = Path(path)
    return {str(p.relative_to(root)): p.read_bytes() for name in ("features", "features_flip", "shard_done", "done")
            for p in sorted((root / name).rglob("*")) if p.is_file() and not p.name.endswith(".partial")}


@pytest.mark.parametrize("backend", ["zarr", "zarr1"])
def test_two_concurrent_zarr_writers_equal_one(tmp_path, backend):
    inp = make_inputs(n_studies=14, seed=15)
    par, one = str(tmp_path / "par.zarr"), str(tmp_path / "one.zarr")
    with create_store(par, **inp, flip=True, **layout_kw(backend)) as s:
        n = s.n_images
        owned = [s.shards_for_writer(i, 2) for i in range(2)]
        assert not set(owned[0]) & set(owned[1]) and sorted([*owned[0], *owned[1]]) == list(range(s.n_shards))
    procs = []
    for shard in range(2):
        rows_file = tmp_path / f"rows{shard}.npy"
        np.save(rows_file, np.arange(n)[np.arange(n) % 2 == shard])
        code = WRITER.format(root=str(ROOT), tests=str(ROOT / "tests"), path=par, rows=str(rows_file),
                             ready=str(tmp_path / f"ready{shard}"), go=str(tmp_path / "go"), writer=shard)
        procs.append(subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "PYTHONWARNINGS": "ignore"}))
    with create_store(one, **inp, flip=True, **layout_kw(backend)) as s:
        write_images(s, inp["image_ids"], flip=True)
        s.mark_complete()
    deadline = time.time() + 60
    while not all((tmp_path / f"ready{k}").exists() for k in range(2)) and time.time() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    with open_store(par, mode="r+") as a, open_store(one) as b:
        assert a.done.all() and len(a.missing_rows()) == 0 and len(a.missing_shards()) == 0
        assert_done_listing_agrees(a)
        a.mark_complete()
        assert a.image_ids == b.image_ids
        for i in range(a.n_studies):
            x, y = a.read_study(i), b.read_study(i)
            np.testing.assert_array_equal(x.features, y.features)
            np.testing.assert_array_equal(x.features_flip, y.features_flip)
    assert map_files(par) == map_files(one)                          # byte for byte, object for object


@pytest.mark.parametrize("backend", BACKENDS)
def test_maps_are_uncompressed_unless_asked_and_equal_either_way(tmp_path, backend):
    """Float16 maps barely compress (1.00-1.09x) while compression slows writes ~1.5x (Zarr zstd) to
    ~20x (HDF5 lzf) at the paper's map size (benchmarks/bench_store_write.py): off by default."""
    import h5py
    import zarr

    inp = make_inputs()
    stored = {}
    for compress in (False, True):
        path = str(tmp_path / f"c{int(compress)}.{'h5' if backend.startswith('hdf5') else 'zarr'}")
        with create_store(path, **inp, compress=compress, **layout_kw(backend)) as s:
            write_images(s, inp["image_ids"])
            s.mark_complete()
        with open_store(path) as s:
            stored[compress] = np.concatenate([s.read_study(i).features.reshape(-1) for i in range(s.n_studies)])
        if backend.startswith("hdf5"):
            with h5py.File(path, "r") as f:
                assert (f["features"].compression is not None) == compress
        else:
            assert bool(zarr.open_array(f"{path}/features", mode="r").compressors) == compress
    np.testing.assert_array_equal(stored[False], stored[True])
