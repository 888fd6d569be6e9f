"""Trust nothing on disk, round 2 (issue 26, items 2-6 and the HDF5 --overwrite case): a full disk is
one line and the shard in flight is redone; --overwrite takes the writers' lock; every metadata array
is checksummed; shard checksums are bound to their place and checked on every read; NaN is one line."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from chx.errors import ChxError
from chx.store import create_store, open_store
from test_store import FP, ROOT, image_features, make_inputs, store_path, write_shard
from test_store_trust import one_line

BACKENDS = ["zarr", "hdf5"]


def build(tmp_path, backend, flip=False, seed=60, fp=None, name=None, **kw):
    path = store_path(tmp_path, backend) if name is None else str(tmp_path / name)
    inp = make_inputs(seed=seed)
    if fp is not None:
        inp["fingerprint"] = fp
    with create_store(path, **inp, flip=flip, shard_images=4, **kw) as s:
        for sh in range(s.n_shards):
            write_shard(s, sh, flip)
        s.mark_complete()
    return path


def reopen(path, seed=60, flip=False, **kw):
    """What rerunning extract-features does: create_store with the same inputs (resume)."""
    return create_store(path, **make_inputs(seed=seed), flip=flip, shard_images=4, **kw)


# ------------------------------------------------------------------------------- item 2: disk full
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_is_one_line_and_the_rerun_redoes_the_shard(tmp_path, monkeypatch, backend, code):
    path = store_path(tmp_path, backend)
    with create_store(path, **make_inputs(seed=60), shard_images=4) as s:
        cls = type(s)
        write_shard(s, 0)
        orig = cls._write_shard_raw

        def full(self, name, shard, values):
            orig(self, name, shard, np.zeros_like(values))        # part of it reached the disk, then ENOSPC
            raise OSError(code, "No space left on device" if code == errno.ENOSPC else "Disk quota exceeded")

        monkeypatch.setattr(cls, "_write_shard_raw", full)
        with pytest.raises(ChxError, match="disk full while writing shard 1") as e:
            write_shard(s, 1)
        assert path in one_line(e) and "rerun the same command" in str(e.value)
        monkeypatch.setattr(cls, "_write_shard_raw", orig)
        assert s.missing_shards().tolist()[:1] == [1]            # never marked done
    with reopen(path) as s:
        assert 0 not in s.missing_shards() and 1 in s.missing_shards()
        for sh in s.missing_shards():
            write_shard(s, int(sh))
        s.mark_complete()
        assert s.verify().ok
        np.testing.assert_array_equal(s.read_shard(1)[0], image_features(s.image_ids[4:8]).astype(np.float16))


@pytest.mark.parametrize("lost", ["zeros", "half"])
def test_hdf5_writer_dead_after_its_done_marker_the_rerun_checks_and_redoes_the_shard(tmp_path, monkeypatch, lost):
    """The issue's case: the done record reached the file, the data did not (87 % zeros); the shard
    was noted in flight, so reopening for writing checks it against its checksums and redoes it."""
    from chx.store._hdf5 import HDF5FeatureStore

    path = store_path(tmp_path, "hdf5")
    with create_store(path, **make_inputs(seed=61), shard_images=4) as s:
        write_shard(s, 0)
        orig = HDF5FeatureStore._write_shard_raw

        def lose(self, name, shard, values):
            bad = np.zeros_like(values) if lost == "zeros" else np.concatenate([values[:2], np.zeros_like(values[2:])])
            orig(self, name, shard, bad)

        monkeypatch.setattr(HDF5FeatureStore, "_write_shard_raw", lose)
        monkeypatch.setattr(HDF5FeatureStore, "_end_shard", lambda self, sh: (_ for _ in ()).throw(SystemExit(139)))
        with pytest.raises(SystemExit):
            write_shard(s, 2)
        monkeypatch.undo()
        assert 2 not in s.missing_shards()                        # the done marker is there
    with open_store(path) as s:                                    # readers: one line, never the zeros
        with pytest.raises(ChxError, match="do not match their checksum|missing") as e:
            s.read_shard(2)
        assert "--repair" in one_line(e)
    with reopen(path, seed=61) as s:                               # the rerun: shard 2 is redone
        assert 2 in s.missing_shards() and 0 not in s.missing_shards()
        for sh in s.missing_shards():
            write_shard(s, int(sh))
        s.mark_complete()
        assert s.verify().ok


# ---------------------------------------------------------------------- item 3: the writers' lock
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reader", [False, True])
def test_overwrite_while_another_writer_holds_the_store_is_refused(tmp_path, backend, reader):
    path = build(tmp_path, backend)
    other = open_store(path, "r" if reader else "r+")             # another extraction (or a reader, HDF5)
    try:
        if backend == "zarr" and reader:                           # zarr readers need no lock: replaced
            pytest.skip("Zarr readers take no lock")
        with pytest.raises(ChxError, match="another process") as e:
            create_store(path, **{**make_inputs(seed=60), "fingerprint": {**FP, "model": "other"}}, overwrite=True)
        msg = one_line(e)
        assert "use --overwrite" not in msg and "wait for" in msg
    finally:
        other.close()
    with open_store(path, require_complete=True) as s:            # the first run's work is still there
        assert s.verify().ok and s.fingerprint == FP


def test_hdf5_second_writer_message_does_not_suggest_overwrite(tmp_path):
    path = store_path(tmp_path, "hdf5")
    with create_store(path, **make_inputs(seed=62), shard_images=4):
        for kw in ({}, {"overwrite": True}):
            with pytest.raises(ChxError, match="open in another process") as e:
                create_store(path, **make_inputs(seed=62), shard_images=4, **kw)
            assert "--overwrite" not in one_line(e).replace("--overwrite never", "")


def test_zarr_writers_share_the_lock_and_overwrite_works_once_they_are_done(tmp_path):
    path = build(tmp_path, "zarr")
    with open_store(path, "r+"), open_store(path, "r+"):             # parallel --shard writers
        pass
    with create_store(path, **{**make_inputs(seed=60), "fingerprint": {**FP, "model": "other"}}, overwrite=True) as s:
        assert s.fingerprint["model"] == "other" and not s.done.any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats.zarr"]   # no lock file left behind


def test_hdf5_overwrite_refuses_a_file_with_a_dataset_the_user_added(tmp_path):
    import h5py

    path = build(tmp_path, "hdf5")
    with h5py.File(path, "a") as f:
        f["my_results"] = np.arange(5)
    with pytest.raises(ChxError, match="refusing to replace") as e:
        create_store(path, **{**make_inputs(seed=60), "fingerprint": {**FP, "model": "other"}}, overwrite=True)
    assert "my_results" in one_line(e)
    with h5py.File(path, "r") as f:
        assert f["my_results"][...].tolist() == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------- item 4: every array checksummed
def tamper_meta(path, backend, name):
    """Zarr: delete the array's chunk object (zarr then reads fill values); HDF5: change a value."""
    if backend == "zarr":
        objs = [p for p in (Path(path) / name).iterdir() if p.name.startswith("c")]
        assert objs, name
        for p in objs:
            p.unlink()
        return
    import h5py

    with h5py.File(path, "r+") as f:
        ds = f[name]
        if ds.dtype.kind == "O":
            vals = ds.asstr()[...]
            vals[0] = vals[-1] if vals[0] != vals[-1] else vals[0] + "x"
            ds[...] = np.asarray(vals, dtype=object)
        elif name == "study_ptr":
            v = ds[...]
            v[1], v[2] = v[1] + 1, v[2] + 1 if v[2] + 1 < v[3] else v[2]
            ds[...] = v
        else:
            v = ds[...]
            v[0] = np.where(np.isnan(v[0]), 1.0, np.nan)
            ds[...] = v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["labels", "split", "view", "image_id", "study_id", "study_ptr"])
def test_every_metadata_array_is_checksummed(tmp_path, backend, name):
    path = build(tmp_path, backend)
    tamper_meta(path, backend, name)
    with pytest.raises(ChxError) as e:
        open_store(path)
    msg = one_line(e)
    assert path in msg and (name in msg or "inconsistent" in msg)
    if name in ("labels", "split", "view"):                        # rerunning extract-features rewrites them
        assert "rerun `chx extract-features`" in msg
        with reopen(path) as s:
            assert s.updated_metadata
        with open_store(path, require_complete=True) as s:
            assert s.verify().ok
    else:
        with pytest.raises(ChxError, match="--overwrite"):
            reopen(path)


def test_tampered_store_verify_cli_is_exit_2_and_one_line(tmp_path):
    path = build(tmp_path, "zarr")
    tamper_meta(path, "zarr", "labels")
    r = subprocess.run([sys.executable, "-m", "chx", "store", "verify", path], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "labels" in lines[0] and "Traceback" not in r.stderr


# ------------------------------------------------------------------ item 5: bound to their place
def _zarr_shard_files(path, s):
    return [Path(path) / "features" / f"c.{s}.0.0.0", Path(path) / "shard_done" / f"c.{s}.0"]


def _swap(path, backend, a, b, other=None):
    """Exchange shards a and b (maps and done records), or copy shard a from store `other`."""
    if backend == "zarr":
        for fa, fb in zip(_zarr_shard_files(path, a), _zarr_shard_files(other or path, b)):
            da, db = fa.read_bytes(), fb.read_bytes()
            fa.write_bytes(db)
            if other is None:
                fb.write_bytes(da)
        return
    import h5py

    with open_store(path) as s:
        ra, rb = s.shard_rows(a), s.shard_rows(b)
    with h5py.File(path, "r+") as f, (h5py.File(other, "r") if other else f) as g:
        fa, fb = f["features"][ra[0]:ra[1]], g["features"][rb[0]:rb[1]]
        da, db = f["shard_done"][a], g["shard_done"][b]
        f["features"][ra[0]:ra[1]] = fb
        f["shard_done"][a] = db
        if other is None:
            f["features"][rb[0]:rb[1]] = fa
            f["shard_done"][b] = da


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["exchanged", "other-backbone", "other-store-same-backbone"])
def test_shards_are_bound_to_their_place(tmp_path, backend, case):
    path = build(tmp_path, backend)
    if case == "exchanged":
        with open_store(path) as s:
            sizes = [np.subtract(*s.shard_rows(k)[::-1]) for k in range(s.n_shards)]
        a, b = [k for k in range(len(sizes)) if sizes[k] == 4][:2]
        _swap(path, backend, a, b)
        expect = {a, b}
    else:
        fp = {**FP, "checkpoint_sha256": "f00d"} if case == "other-backbone" else FP
        other = build(tmp_path, backend, fp=fp, seed=60 if case == "other-backbone" else 63,
                      name="other" + Path(path).suffix)
        a = 1
        _swap(path, backend, a, a, other=other)
        expect = {a}
    with open_store(path) as s:
        report = s.verify()
        assert {p.shard for p in report.problems} == expect and "--repair" in report.summary()
        k = min(expect)
        with pytest.raises(ChxError, match="do not match their checksum") as e:   # caught on read, no verify
            s.read_shard(k)
        assert "--repair" in one_line(e)
        study = int(np.searchsorted(s.study_ptr, s.shard_rows(k)[0], side="right") - 1)
        with pytest.raises(ChxError):
            s.read_study(study)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_changed_byte_is_caught_on_read(tmp_path, backend):
    path = build(tmp_path, backend, flip=True)
    with open_store(path) as s:
        row = s.shard_rows(2)[0] + 1
        study = int(np.searchsorted(s.study_ptr, row, side="right") - 1)
        img = s.image_ids[row]
    if backend == "zarr":
        obj = Path(path) / "features_flip" / "c.2.0.0.0"
        data = bytearray(obj.read_bytes())
        data[1 * 3 * 4 * 5 * 2 + 7] ^= 0x04                      # one bit of row 1 of the shard
        obj.write_bytes(bytes(data))
    else:
        import h5py

        with h5py.File(path, "r+") as f:
            v = f["features_flip"][row]
            v.view(np.uint16)[0, 0, 0] ^= 0x0004
            f["features_flip"][row] = v
    with open_store(path) as s:
        s.read_study(study - 1 if study else study + 1)           # other studies read fine
        with pytest.raises(ChxError, match="features_flip") as e:
            s.read_study(study)
        assert repr(img) in one_line(e)


# --------------------------------------------------------------------------------- item 6: NaN
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_written_into_a_shard_is_one_line_naming_the_image(tmp_path, backend):
    path = build(tmp_path, backend)
    with open_store(path) as s:
        row = s.shard_rows(1)[0] + 2
        study = int(np.searchsorted(s.study_ptr, row, side="right") - 1)
        img = s.image_ids[row]
    if backend == "zarr":
        obj = Path(path) / "features" / "c.1.0.0.0"
        data = bytearray(obj.read_bytes())
        data[2 * 60 * 2:2 * 60 * 2 + 2] = np.float16(np.nan).tobytes()
        obj.write_bytes(bytes(data))
    else:
        import h5py

        with h5py.File(path, "r+") as f:
            v = f["features"][row]
            v[0, 0, 0] = np.nan
            f["features"][row] = v
    with open_store(path) as s:
        with pytest.raises(ChxError, match="NaN") as e:
            s.read_study(study)
        msg = one_line(e)
        assert repr(img) in msg and "--repair" in msg
        report = s.verify()
        assert report.bad_shards.tolist() == [1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float8"])
def test_nan_maps_are_refused_at_write(tmp_path, backend, dtype):
    path = store_path(tmp_path, backend)
    with create_store(path, **make_inputs(seed=64), shard_images=4, dtype=dtype) as s:
        a, b = s.shard_rows(0)
        maps = image_features(s.image_ids[a:b])
        maps[1, 0, 0, 0] = np.inf if dtype == "bfloat16" else np.nan
        with pytest.raises(ChxError, match="NaN or inf") as e:
            s.write_shard(0, maps)
        assert repr(s.image_ids[a + 1]) in one_line(e)
        assert 0 in s.missing_shards()


def test_nan_in_an_older_store_is_caught_on_read(tmp_path, monkeypatch):
    monkeypatch.setattr("chx.store._codec.INTEGRITY", 0)           # a store as chx wrote them before
    path = build(tmp_path, "zarr")
    monkeypatch.undo()
    obj = Path(path) / "features" / "c.0.0.0.0"
    data = bytearray(obj.read_bytes())
    data[0:2] = np.float16(np.nan).tobytes()
    obj.write_bytes(bytes(data))
    with open_store(path) as s:
        with pytest.raises(ChxError, match="NaN or inf") as e:
            s.read_shard(0)
        assert repr(s.image_ids[0]) in one_line(e)


# ------------------------------------------------------------------------------- older stores
@pytest.mark.parametrize("backend", BACKENDS)
def test_older_stores_still_open_read_verify_and_resume(tmp_path, monkeypatch, backend):
    monkeypatch.setattr("chx.store._codec.INTEGRITY", 0)
    path = build(tmp_path, backend)
    monkeypatch.undo()
    with open_store(path, require_complete=True) as s:
        assert "integrity" not in s._attrs
        np.testing.assert_array_equal(s.read_shard(0)[0], image_features(s.image_ids[:4]).astype(np.float16))
        report = s.verify()
        assert report.ok and not report.bound and "older store" in report.summary()
    with reopen(path) as s:                                        # resume and --repair still work on it
        s.mark_shards_missing([1])
        write_shard(s, 1)
        s.mark_complete()
        assert s.verify().ok
    if backend == "zarr":                                          # a changed byte: verify still finds it
        obj = Path(path) / "features" / "c.1.0.0.0"
        data = bytearray(obj.read_bytes())
        data[3] ^= 0x01
        obj.write_bytes(bytes(data))
        with open_store(path) as s:
            assert s.verify().bad_shards.tolist() == [1]


def test_attributes_stay_json(tmp_path):
    path = build(tmp_path, "zarr")
    attrs = json.loads((Path(path) / "zarr.json").read_text())["attributes"]
    assert attrs["integrity"] == 1 and set(attrs["meta_crc"]) == {"study_ptr", "image_id", "view", "split",
                                                                  "study_id", "labels"}
