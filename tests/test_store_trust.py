"""Trust nothing on disk (issue 20, classes 1, 2 and 5 for the store): --overwrite deletes only what is
provably a chx store; a store with missing, truncated or changed objects is never read as if whole:
one line naming the image and the fix, and `verify` lists every damaged shard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from chx.errors import ChxError
from chx.store import create_store, open_store
from test_store import image_features, layout_kw, make_inputs, store_path, write_images, write_shard


def complete_store(tmp_path, backend, flip=True, **kw):
    path = store_path(tmp_path, backend)
    with create_store(path, **make_inputs(seed=40), flip=flip, **{**layout_kw(backend), **kw}) as s:
        write_images(s, s.image_ids, flip=flip)
        s.mark_complete()
    return path


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# ------------------------------------------------------------------------------ --overwrite (class 1)
def _user_folder_with_store_names(root: Path) -> Path:
    root.mkdir()
    (root / "labels").mkdir()
    (root / "labels" / "mine.csv").write_text("a,b\n")
    (root / "features").write_text("my notes")
    (root / "thesis.docx").write_bytes(b"x" * 100)
    return root


def _plain_zarr_group(root: Path) -> Path:
    import zarr

    g = zarr.open_group(str(root), mode="w", attributes={"owner": "someone else"})
    g.create_array("labels", shape=(3,), dtype="int64")[...] = [1, 2, 3]
    return root


def _chx_store_with_a_user_file(root: Path) -> Path:
    create_store(root, **make_inputs(seed=41)).close()
    (root / "my_results.txt").write_text("do not delete")
    return root


def _zarr_json_without_chx_attributes(root: Path) -> Path:
    root.mkdir()
    (root / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    (root / "study_ptr").mkdir()
    (root / "study_ptr" / "data.bin").write_bytes(b"user data")
    return root


def _file_at_a_zarr_path(root: Path) -> Path:
    root.write_text("a file, not a folder")
    return root


@pytest.mark.parametrize("make", [_user_folder_with_store_names, _plain_zarr_group, _chx_store_with_a_user_file,
                                  _zarr_json_without_chx_attributes, _file_at_a_zarr_path])
def test_overwrite_refuses_folders_chx_did_not_make_and_keeps_them(tmp_path, make):
    path = make(tmp_path / "feats.zarr")
    before = {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} if path.is_dir() \
        else {path: path.read_bytes()}
    with pytest.raises(ChxError, match="refusing to replace") as e:
        create_store(path, **make_inputs(seed=42), overwrite=True)
    assert str(path) in one_line(e)
    after = {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} if path.is_dir() \
        else {path: path.read_bytes()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats.zarr"]    # no temp copies left either


def _hdf5_of_someone_else(path: Path) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        f["features"] = np.arange(10)
        f.attrs["format_version"] = 1          # one store-like attribute does not prove anything
    return path


def _garbage(path: Path) -> Path:
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 600)
    return path


def _empty_file(path: Path) -> Path:
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("make", [_hdf5_of_someone_else, _garbage, _empty_file])
def test_overwrite_refuses_h5_files_chx_did_not_make(tmp_path, make):
    path = make(tmp_path / "feats.h5")
    before = path.read_bytes()
    with pytest.raises(ChxError, match="refusing to replace") as e:
        create_store(path, **make_inputs(seed=43), overwrite=True)
    assert str(path) in one_line(e)
    assert path.read_bytes() == before


@pytest.mark.parametrize("damage", ["zarr-features-meta", "zarr-interrupted", "h5-truncated", "h5-zeroed-tail"])
def test_overwrite_replaces_a_damaged_store_that_is_provably_chx(tmp_path, damage):
    backend = "hdf5" if damage.startswith("h5") else "zarr"
    path = Path(complete_store(tmp_path, backend))
    if damage == "zarr-features-meta":
        (path / "features" / "zarr.json").unlink()
    elif damage == "zarr-interrupted":
        meta = json.loads((path / "zarr.json").read_text())
        del meta["attributes"]["format_version"]
        (path / "zarr.json").write_text(json.dumps(meta))
    elif damage == "h5-truncated":
        path.write_bytes(path.read_bytes()[:700])
    else:
        data = bytearray(path.read_bytes())
        data[512:] = bytes(len(data) - 512)
        path.write_bytes(bytes(data))
    with pytest.raises(ChxError, match="--overwrite") as e:
        create_store(path, **make_inputs(seed=40), flip=True)
    one_line(e)
    with create_store(path, **make_inputs(seed=40), flip=True, overwrite=True) as s:
        assert not s.done.any()


# ------------------------------------------------------------------ broken stores are refused (class 2)
@pytest.mark.parametrize("backend", ["zarr", "zarr1", "hdf5"])
def test_incomplete_store_is_refused_by_readers(tmp_path, backend):
    path = store_path(tmp_path, backend)
    with create_store(path, **make_inputs(seed=44), **layout_kw(backend)) as s:
        if s.is_sharded:
            write_shard(s, 0)
        else:
            s.write(np.arange(3), image_features(s.image_ids[:3]))
        ids = list(s.image_ids)
    with pytest.raises(ChxError, match="is incomplete") as e:
        open_store(path, require_complete=True)
    assert "extract-features" in one_line(e)
    with open_store(path) as s:                                  # without the check: each read says it
        last = s.n_studies - 1
        with pytest.raises(ChxError, match="not extracted yet") as e:
            s.read_study(last)
        assert repr(ids[int(s.study_ptr[last])]) in one_line(e)
        np.testing.assert_array_equal(s.read_image(0), image_features(ids[:1])[0].astype(np.float16))


def _delete_shard_object(path: str, backend: str, shard: int, flip: bool = False) -> None:
    name = "features_flip" if flip else "features"
    if backend == "zarr1":
        shutil.rmtree(Path(path) / name / "c" / str(shard))            # format 1: one image's chunk
        return
    with open_store(path, "r+") as s:
        key = s._key(name, s.shard_rows(shard)[0])
        from chx.store._zarr import _sync

        _sync(s._zstore.delete(key)) if backend == "memory" else (Path(path) / key).unlink()


@pytest.mark.parametrize("backend", ["zarr", "zarr1", "memory", "zarr-compressed"])
@pytest.mark.parametrize("flip", [False, True])
def test_deleted_map_object_is_one_clear_line_and_verify_finds_it(tmp_path, backend, flip):
    compressed = backend == "zarr-compressed"
    backend = "zarr" if compressed else backend
    path = complete_store(tmp_path, backend, compress=compressed)
    _delete_shard_object(path, backend, 1, flip)
    with open_store(path) as s:
        row = 1 if backend == "zarr1" else s.shard_rows(1)[0]            # the first image of what was deleted
        study = int(np.searchsorted(s.study_ptr, row, side="right") - 1)
        with pytest.raises(ChxError, match="are missing although the store is marked complete") as e:
            s.read_study(study)
        msg = one_line(e)
        assert repr(s.image_ids[row]) in msg and "--repair" in msg
        report = s.verify()
        assert not report.ok and report.bad_shards.tolist() == [int(s.shard_of_row(row))]
        assert s.image_ids[row] in report.problems[0].problem
        assert "--repair" in report.summary()
    if backend == "zarr":   # format 2, local: found at open, before any read, by one listing per array
        with pytest.raises(ChxError, match="objects of 1 shard") as e:
            open_store(path, require_complete=True)
        assert "--repair" in one_line(e)


@pytest.mark.parametrize("backend", ["zarr", "zarr1", "zarr-compressed", "hdf5"])
def test_truncated_map_object_is_one_line_and_repair_restores_it(tmp_path, backend):
    compressed = backend == "zarr-compressed"
    backend = "zarr" if compressed else backend
    path = complete_store(tmp_path, backend, compress=compressed)
    with open_store(path) as s:
        row = s.shard_rows(2)[0] if s.is_sharded else 5
        study = int(np.searchsorted(s.study_ptr, row, side="right") - 1)
        if backend == "hdf5":    # damage the chunk index entry's data: overwrite the image's bytes on disk
            offset = s._ds["features"].id.get_chunk_info_by_coord((row, 0, 0, 0)).byte_offset
        else:
            obj = Path(path) / s._key("features", row)
    if backend == "hdf5":
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(b"\x7f" * 16)            # bit rot inside an image's map: reads fine, checksum differs
    else:
        obj.write_bytes(obj.read_bytes()[: obj.stat().st_size // 2])
    with open_store(path, "r+") as s:
        if backend != "hdf5":
            with pytest.raises(ChxError, match="cannot be read") as e:
                s.read_study(study)
            assert repr(s.image_ids[row]) in one_line(e) and "--repair" in str(e.value)
        report = s.verify()
        assert report.bad_shards.tolist() == [int(s.shard_of_row(row))], report.problems
        if backend == "hdf5":
            assert "changed since it was written" in report.problems[0].problem
        s.mark_shards_missing(report.bad_shards)                          # what --repair does
        assert not s.complete
        for sh in s.missing_shards():
            write_shard(s, int(sh))
        s.mark_complete()
        assert s.verify().ok
        np.testing.assert_array_equal(s.read_image(row), image_features([s.image_ids[row]])[0].astype(np.float16))


def test_changed_bytes_in_a_shard_are_found_by_verify_checksums(tmp_path):
    path = complete_store(tmp_path, "zarr", flip=False)
    obj = Path(path) / "features" / "c.3.0.0.0"
    data = bytearray(obj.read_bytes())
    data[10] ^= 0x01                                                      # one bit, inside image data
    obj.write_bytes(bytes(data))
    with open_store(path) as s:
        with pytest.raises(ChxError, match="do not match their checksum") as e:
            s.read_shard(3)                       # decodes fine: the per-image checksum checked on read sees it
        assert repr(s.image_ids[12]) in one_line(e) and "--repair" in str(e.value)
        report = s.verify()
    assert report.checksums and report.checked == report.n_shards
    assert report.bad_shards.tolist() == [3] and "changed since it was written" in report.problems[0].problem
    assert report.to_dict()["ok"] is False


@pytest.mark.parametrize("how", ["deleted", "garbled"])
def test_lost_done_marker_of_a_complete_store_is_reported(tmp_path, how):
    path = complete_store(tmp_path, "zarr", flip=False)
    marker = Path(path) / "shard_done" / "c.2.0"
    marker.unlink() if how == "deleted" else marker.write_bytes(b"\x01")
    with open_store(path) as s:
        report = s.verify()
        assert s.info()["shards_without_objects"] == 0
    assert report.bad_shards.tolist() == [2] and "no readable done marker" in report.problems[0].problem


def test_info_counts_shards_whose_objects_are_gone(tmp_path):
    path = complete_store(tmp_path, "zarr", flip=True)
    (Path(path) / "features" / "c.1.0.0.0").unlink()
    (Path(path) / "features_flip" / "c.3.0.0.0").unlink()
    with open_store(path) as s:
        info = s.info()
    assert info["complete"] and info["shards_without_objects"] == 2      # the attribute alone would hide it
    with open_store(path, "r+") as s:                                     # the quick --repair: no full read
        assert s.shards_without_objects().tolist() == [1, 3]
        s.mark_shards_missing(s.shards_without_objects())
        for sh in s.missing_shards():
            write_shard(s, int(sh))
        s.mark_complete()
        assert s.verify().ok and len(s.shards_without_objects()) == 0


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_store_in_an_unusable_folder_is_one_line(tmp_path, backend):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    path = blocker / ("feats.h5" if backend == "hdf5" else "feats.zarr")   # a folder that cannot exist
    with pytest.raises(ChxError, match="could not create feature store") as e:
        create_store(path, **make_inputs(seed=45))
    assert str(path) in one_line(e)
