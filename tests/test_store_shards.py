"""Feature store at scale: the sharded layout (format 2), writers that own whole shards, a writer killed
mid-shard, compact dtypes (bfloat16, float8) and their error bounds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from chx.errors import ChxError
from chx.store import ShardBuffer, create_store, decode_maps, default_shard_images, open_store, projected_size
from chx.store._codec import objects_per_shard
from test_store import (BACKENDS, ROOT, SHAPE, image_features, layout_kw, make_inputs, map_files, store_path,
                        write_images, write_shard)

PAPER = (768, 32, 32)      # convnext_small at 1024 px: 1.5 MiB per float16 map


def tiny(n: int, shape=(4, 2, 2)) -> dict:
    """n images, two views per study, of small maps."""
    return {"image_ids": [f"i{k}" for k in range(n)], "study_ids": [f"s{k // 2}" for k in range(n)],
            "views": ["PA", "LATERAL"] * (n // 2) + ["PA"] * (n % 2), "splits": ["train"] * n,
            "labels": np.zeros((n, 1)), "class_names": ["x"], "feature_shape": shape, "fingerprint": {"m": 1}}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float8"])
@pytest.mark.parametrize("flip", [False, True])
def test_shard_size_rule_meets_one_object_per_64_images(dtype, flip):
    s = default_shard_images(377_110, PAPER, dtype, flip)
    assert 64 <= s <= 512
    assert objects_per_shard(dtype, flip) / s <= 1 / 64                 # features + flip + scale + done
    per_array = projected_size(s, PAPER, False, dtype)
    assert per_array >= 200 * 2**20 or s == 512                         # ~256 MiB per shard object
    assert default_shard_images(377_110, PAPER, "float16", False) == 171
    assert default_shard_images(377_110, PAPER, "float16", True) == 192
    assert default_shard_images(377_110, (8, 4, 4), dtype, flip) == 512  # small maps: the cap
    assert default_shard_images(10, PAPER, dtype, flip) == 10            # never more than n_images


def test_objects_per_image_on_disk_at_most_one_per_64(tmp_path):
    """Everything on disk counted (metadata too): a format-2 store with flip and the default shards."""
    n = 2048
    with create_store(tmp_path / "s.zarr", **tiny(n), flip=True) as s:
        assert s.shard_images == 512 and s.n_shards == 4
        maps = np.ones((512, 4, 2, 2), np.float32)
        for sh in range(s.n_shards):
            s.write_shard(sh, maps, -maps)
        s.mark_complete()
        info = s.info()
    assert info["files"] == sum(len(files) for _, _, files in os.walk(tmp_path / "s.zarr"))
    assert info["files_per_image"] <= 1 / 64
    v1 = tmp_path / "v1.zarr"
    with create_store(v1, **tiny(64), flip=True, format_version=1) as s:   # format 1 for contrast: 3 per image
        s.write(np.arange(64), np.ones((64, 4, 2, 2)), np.ones((64, 4, 2, 2)))
        assert s.info()["files_per_image"] > 3


def test_zarr_reads_the_direct_shards_and_the_other_way_round(tmp_path):
    """The direct shard writer/reader (local, uncompressed) and zarr's own sharding codec agree."""
    inp = make_inputs(seed=21)
    path = tmp_path / "s.zarr"
    with create_store(path, **inp, flip=True, shard_images=4) as s:
        assert s._direct_names == {"features", "features_flip"}
        write_images(s, s.image_ids[:8], flip=True)                      # shards 0, 1: direct
        s._direct_names = set()                                          # shards 2..: through zarr
        write_images(s, s.image_ids[8:], flip=True)
        ids = list(s.image_ids)
    want = image_features(ids).astype(np.float16)
    np.testing.assert_array_equal(zarr.open_array(str(path / "features"), mode="r")[...], want)
    with open_store(path) as s:
        assert s._direct_names == {"features", "features_flip"}
        got = np.concatenate([s.read_shard(k)[0] for k in range(s.n_shards)])
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(s.read_shard(2)[1], image_features(ids[8:12], True).astype(np.float16))
        assert s.verify().ok


@pytest.mark.parametrize("backend", ["zarr", "hdf5", "memory"])
def test_partial_shard_writes_are_refused(tmp_path, backend):
    with create_store(store_path(tmp_path, backend), **make_inputs(seed=22), shard_images=4) as s:
        with pytest.raises(ValueError, match="write_shard"):
            s.write(np.arange(0, 3), image_features(s.image_ids[:3]))
        s.write(np.arange(4, 12), image_features(s.image_ids[4:12]))     # whole shards 1 and 2: accepted
        assert s.missing_shards().tolist() == [0] + list(range(3, s.n_shards))
        with pytest.raises(ValueError, match="features have shape"):
            s.write_shard(0, image_features(s.image_ids[:3]))


@pytest.mark.parametrize("backend", ["zarr", "memory", "zarr-compressed", "hdf5"])
def test_rewriting_a_damaged_shard_never_reads_it_back(tmp_path, backend):
    """write_shard replaces a shard without reading the old object (zarr would merge into it; a
    damaged one would make the rewrite fail)."""
    compressed = backend == "zarr-compressed"
    path = store_path(tmp_path, "zarr" if compressed else backend)
    with create_store(path, **make_inputs(seed=23), shard_images=4, compress=compressed) as s:
        write_images(s, s.image_ids)
        s.mark_complete()
        if s.backend == "zarr":
            from zarr.core.buffer import default_buffer_prototype

            from chx.store._zarr import _sync

            _sync(s._zstore.set(s._key("features", 0), default_buffer_prototype().buffer.from_bytes(b"garbage")))
            with pytest.raises(ChxError, match="cannot be read"):
                s.read_shard(0)
        s.mark_shards_missing([0])
        assert not s.complete and s.missing_shards().tolist() == [0]
        write_shard(s, 0)
        s.mark_complete()
        np.testing.assert_array_equal(s.read_shard(0)[0], image_features(s.image_ids[:4]).astype(np.float16))
        assert s.verify().ok


@pytest.mark.parametrize("order", ["store order", "shuffled"])
def test_shard_buffer_turns_batches_into_whole_shard_writes(tmp_path, order):
    """What extraction does: batches of any size from a writer's own shards -> write_shard per shard."""
    inp = make_inputs(n_studies=12, seed=31)
    with create_store(tmp_path / "ref.zarr", **inp, flip=True, shard_images=4) as ref:
        write_images(ref, ref.image_ids, flip=True)
    with create_store(tmp_path / "got.zarr", **inp, flip=True, shard_images=4) as s:
        mine = s.shards_for_writer(1, 2)
        rows = np.concatenate([np.arange(*s.shard_rows(k)) for k in mine])
        rng = np.random.default_rng(0)
        if order == "shuffled":
            rows = rows[rng.permutation(len(rows))]
        buf, written, i = ShardBuffer(s, mine), [], 0
        while i < len(rows):
            batch = rows[i:i + int(rng.integers(1, 7))]
            ids = [s.image_ids[r] for r in batch]
            written += buf.add(batch, image_features(ids).astype(np.float16), image_features(ids, True))
            i += len(batch)
            # a shard is written as soon as all its rows are in (in store order: at most one held in memory)
            assert sorted(written) == [k for k in mine.tolist() if np.isin(np.arange(*s.shard_rows(k)), rows[:i]).all()]
        assert sorted(written) == mine.tolist()
        assert sorted(set(range(s.n_shards)) - set(s.missing_shards().tolist())) == mine.tolist()
        with pytest.raises(ValueError, match="not this writer's"):
            buf.add(np.arange(*s.shard_rows(0)), image_features(s.image_ids[:4]))
        again = ShardBuffer(s, [0])
        again.add([0], image_features(s.image_ids[:1]))
        with pytest.raises(ValueError, match="twice"):
            again.add([0], image_features(s.image_ids[:1]))
        with open_store(tmp_path / "ref.zarr") as ref:
            for k in mine:
                for x, y in zip(ref.read_shard(k), s.read_shard(k)):
                    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_study_shard_ids(tmp_path, backend):
    with create_store(store_path(tmp_path, backend), **make_inputs(seed=24), **layout_kw(backend)) as s:
        ids = s.study_shard_ids()
        assert ids.dtype == np.int64 and len(ids) == s.n_studies and np.all(np.diff(ids) >= 0)
        for i in range(s.n_studies):
            a, b = s.shard_rows(ids[i])
            assert a <= s.study_ptr[i] < b
        assert s.shard_images == (64 if backend.endswith("1") else 4)   # format 1: blocks of 64 rows


def test_shards_for_writer_policy(tmp_path):
    with create_store(tmp_path / "s.zarr", **tiny(50), shard_images=4) as s:
        assert s.n_shards == 13 and s.shard_rows(12) == (48, 50)
        for n in (1, 2, 3, 5):
            parts = [s.shards_for_writer(i, n) for i in range(n)]
            assert sorted(np.concatenate(parts).tolist()) == list(range(13))   # disjoint and complete
            assert all(np.all(p % n == i) for i, p in enumerate(parts))
        with pytest.raises(ValueError):
            s.shards_for_writer(2, 2)
    with create_store(tmp_path / "s.h5", **tiny(50), shard_images=4) as s:
        assert not s.supports_parallel_writers
        assert s.shards_for_writer(0, 1).tolist() == list(range(13))
        with pytest.raises(ChxError, match="takes one writer"):
            s.shards_for_writer(0, 2)


KILLED = """
import os, signal, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import numpy as np
from test_store import write_shard
from chx.store import open_store, _shardfile
from chx.store._hdf5 import HDF5FeatureStore
from chx.store._zarr import ZarrFeatureStore

s = open_store({path!r}, mode="r+")
victim = {victim}

def die_halfway(values):
    # what a kill in the middle of writing an object leaves: half of its bytes, then nothing
    return values[: max(1, len(values) // 2)]

real_file, real_h5, real_rows = _shardfile.write_shard, HDF5FeatureStore._write_shard_raw, ZarrFeatureStore._write_rows

def file_then_die(path, values, shard_images):
    if path.parent.name == "features_flip" and path.name.startswith("c.%d." % victim):
        tmp = path.with_name(path.name + ".killed.partial")
        tmp.write_bytes(die_halfway(values).tobytes())
        os.kill(os.getpid(), signal.SIGKILL)
    real_file(path, values, shard_images)

def h5_then_die(self, name, shard, values):
    if name == "features_flip" and shard == victim:
        a, _ = self.shard_rows(shard)
        half = die_halfway(values)
        self._ds[name][a:a + len(half)] = half
        self._file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_h5(self, name, shard, values)

def rows_then_die(self, name, rows, values):
    if name == "features_flip" and rows[0] >= victim * 64:
        os.kill(os.getpid(), signal.SIGKILL)
    real_rows(self, name, rows, values)

_shardfile.write_shard, HDF5FeatureStore._write_shard_raw, ZarrFeatureStore._write_rows = \\
    file_then_die, h5_then_die, rows_then_die
for sh in s.shards_for_writer(0, 1):
    write_shard(s, int(sh))
"""


@pytest.mark.parametrize("backend", ["zarr", "hdf5", "zarr1"])
def test_writer_killed_mid_shard_then_rerun_of_missing_shards_equals_uninterrupted(tmp_path, backend):
    inp = make_inputs(n_studies=12, seed=25)
    kw = {"format_version": 1} if backend == "zarr1" else {"shard_images": 4}
    suffix = "h5" if backend == "hdf5" else "zarr"
    ref, got = tmp_path / f"ref.{suffix}", tmp_path / f"got.{suffix}"
    with create_store(ref, **inp, flip=True, **kw) as s:
        write_images(s, s.image_ids, flip=True)
        s.mark_complete()
    victim = 0 if backend == "zarr1" else 2
    create_store(got, **inp, flip=True, **kw).close()
    code = KILLED.format(root=str(ROOT), tests=str(ROOT / "tests"), path=str(got), victim=victim)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with create_store(got, **inp, flip=True, **kw) as s:                # the rerun: resume the same store
        assert not s.complete and victim in s.missing_shards()
        done_before = set(np.flatnonzero(~np.isin(np.arange(s.n_shards), s.missing_shards())).tolist())
        assert done_before == set(range(victim))                          # only the shards before the kill
        for sh in s.missing_shards():
            write_shard(s, int(sh))
        s.mark_complete()
    with open_store(ref) as a, open_store(got, require_complete=True) as b:
        for k in range(a.n_shards):
            for x, y in zip(a.read_shard(k), b.read_shard(k)):
                np.testing.assert_array_equal(x, y)
        assert b.verify().ok
    if backend != "hdf5":
        assert map_files(ref) == map_files(got)                            # byte for byte
        assert not list(Path(got).rglob("*.partial"))                      # the killed writer's temp file is gone


# ------------------------------------------------------------------------------------------- dtypes
def maps_with_spread(n: int, seed: int = 0) -> np.ndarray:
    """Maps whose channels span 8 orders of magnitude, with an all-zero channel and exact zeros."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *SHAPE)).astype(np.float32) * (10.0 ** rng.uniform(-5, 3, (n, SHAPE[0], 1, 1)))
    x[:, 1] = 0.0
    x[0, 0, 0, :2] = 0.0
    return x


@pytest.mark.parametrize("backend", ["zarr", "hdf5", "memory"])
def test_float8_round_trip_within_the_stated_bound(tmp_path, backend):
    """|decode(encode(x)) - x| <= 2**-4 |x| + 2**-18 amax_c per channel (chx/store/_codec.py)."""
    inp = make_inputs(seed=26)
    with create_store(store_path(tmp_path, backend), **inp, flip=True, dtype="float8", shard_images=4) as s:
        assert s.dtype == "float8" and s.stored_bytes_per_image == 2 * (int(np.prod(SHAPE)) + SHAPE[0] * 4)
        x = maps_with_spread(s.n_images)
        for sh in range(s.n_shards):
            a, b = s.shard_rows(sh)
            s.write_shard(sh, x[a:b], -x[a:b])
        s.mark_complete()
        got = np.concatenate([s.read_shard(k)[0] for k in range(s.n_shards)])
        got_flip = np.concatenate([s.read_study(i).features_flip for i in range(s.n_studies)])
        assert got.dtype == np.float16
        stored = s.read_shard_stored(1)                                   # raw codes + scale, decoded elsewhere
        assert stored.features.dtype == np.uint8 and stored.scale.shape == (4, 2, SHAPE[0])
        np.testing.assert_array_equal(stored.decoded(flip=True), s.read_shard(1)[1])
        torch_maps = decode_maps(torch.from_numpy(stored.features), "float8", torch.from_numpy(stored.scale[:, 0]))
        np.testing.assert_array_equal(torch_maps.numpy(), s.read_shard(1)[0])
        assert s.verify().ok
    amax = np.abs(x).max(axis=(2, 3), keepdims=True)
    err = np.abs(got.astype(np.float32) - x)
    assert np.all(err <= 2.0**-4 * np.abs(x) + 2.0**-18 * amax)
    assert np.all(err <= amax / 16)
    assert np.all(got[:, 1] == 0) and np.all(got[0, 0, 0, :2] == 0)        # zeros stay exact
    np.testing.assert_array_equal(got_flip.astype(np.float32), -got.astype(np.float32))
    assert err.max() > 0                                                    # it is lossy: the bound is the test


def test_bfloat16_round_trip_and_bytes(tmp_path):
    inp = make_inputs(seed=27)
    with create_store(tmp_path / "b.zarr", **inp, dtype="bfloat16", shard_images=4) as s:
        x = maps_with_spread(s.n_images, seed=1)
        for sh in range(s.n_shards):
            a, b = s.shard_rows(sh)
            s.write_shard(sh, x[a:b])
        got = np.concatenate([s.read_shard(k)[0] for k in range(s.n_shards)]).astype(np.float32)
        assert s.stored_bytes_per_image == int(np.prod(SHAPE)) * 2
    # bfloat16 rounding (8 significant bits: half a step is 2**-8 relative) + float16's subnormal half-step
    assert np.all(np.abs(got - x) <= 2.0**-8 * np.abs(x) + 2.0**-25)


def test_projected_size_and_info_per_dtype(tmp_path):
    f16 = projected_size(1, PAPER, False, "float16")
    f8 = projected_size(1, PAPER, False, "float8")
    assert f16 == 768 * 32 * 32 * 2 and f8 == 768 * 32 * 32 + 768 * 4 and f8 / f16 < 0.51
    assert projected_size(1, PAPER, True, "bfloat16") == 2 * f16
    inp = make_inputs(seed=28)
    with create_store(tmp_path / "f8.h5", **inp, dtype="float8", shard_images=4) as s:
        write_images(s, s.image_ids)
        info = s.info()
    assert info["dtype"] == "float8" and info["bytes_per_image"] == projected_size(1, SHAPE, False, "float8")
    assert info["bytes_per_image_decoded"] == int(np.prod(SHAPE)) * 2
    with pytest.raises(ValueError, match="dtype must be one of"):
        projected_size(1, PAPER, False, "int4")


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_store_dtype_is_recorded_and_another_is_refused(tmp_path, backend):
    inp = make_inputs(seed=29)
    path = store_path(tmp_path, backend)
    create_store(path, **inp, dtype="bfloat16").close()
    with open_store(path) as s:
        assert s.dtype == "bfloat16" and s.info()["dtype"] == "bfloat16"
    for other in ("float16", "float8"):
        with pytest.raises(ChxError) as e:
            create_store(path, **inp, dtype=other)
        msg = str(e.value)
        assert f"dtype bfloat16 in the store vs {other} now" in msg and "--overwrite" in msg and "\n" not in msg
    create_store(path, **inp, dtype="bfloat16").close()                  # the same dtype reopens


def test_non_finite_maps_are_one_line_naming_the_image(tmp_path):
    inp = make_inputs(seed=30)
    with create_store(tmp_path / "s.zarr", **inp, dtype="float8", shard_images=4) as s:
        x = image_features(s.image_ids[:4])
        x[2, 0, 0, 0] = np.inf
        with pytest.raises(ChxError) as e:
            s.write_shard(0, x)
        assert repr(s.image_ids[2]) in str(e.value) and "float16" in str(e.value)
        assert s.missing_shards().tolist() == list(range(s.n_shards))      # nothing marked done


def test_format_1_needs_float16_and_no_shard_size(tmp_path):
    with pytest.raises(ValueError, match="float16 only"):
        create_store(tmp_path / "a.zarr", **make_inputs(), dtype="float8", format_version=1)
    with pytest.raises(ValueError, match="format 2"):
        create_store(tmp_path / "a.zarr", **make_inputs(), shard_images=4, format_version=1)
    with pytest.raises(ValueError, match="format_version"):
        create_store(tmp_path / "a.zarr", **make_inputs(), format_version=3)
    assert not Path(tmp_path / "a.zarr").exists()
