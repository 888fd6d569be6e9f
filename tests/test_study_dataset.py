"""StudyDataset over a small synthetic store: the shard cache, preload modes and the item contract."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch

from chx.data.samplers import ShardShuffleSampler, ShuffleSampler
from chx.data.study_dataset import (StudyDataset, choose_preload, collate_studies, read_plan,
                                    study_shards)
from chx.data.views import VIEWS, deterministic_view_order, view_type
from chx.errors import ChxError
from chx.store import create_store, open_store

SHAPE = (3, 2, 2)
GiB = 2**30


def make_store(path: str, n_studies: int = 60, flip: bool = True, shard_images: int | None = 8,
               format_version: int | None = None) -> str:
    """A complete store: 1-4 views per study, splits train/val interleaved, random maps, small
    shards (so that a split spans many of them; format 1 stands in blocks of 64 images)."""
    rng = np.random.default_rng(0)
    ids, studies, views, splits = [], [], [], []
    for s in range(n_studies):
        for v in range(int(rng.integers(1, 5))):
            ids.append(f"i{s}_{v}")
            studies.append(f"s{s}")
            views.append(VIEWS[int(rng.integers(0, len(VIEWS)))])
            splits.append("val" if s % 4 == 3 else "train")
    labels = rng.integers(0, 2, (len(ids), 2)).astype(np.float32)
    labels = labels[[int(s[1:]) for s in studies]]          # one label row per study
    with create_store(path, image_ids=ids, study_ids=studies, views=views, splits=splits, labels=labels,
                      class_names=["a", "b"], feature_shape=SHAPE, fingerprint={"m": 1}, flip=flip,
                      shard_images=shard_images, format_version=format_version) as st:
        n = st.n_images
        st.write(np.arange(n), rng.normal(size=(n, *SHAPE)), rng.normal(size=(n, *SHAPE)) if flip else None)
        st.mark_complete()
    return path


STORES = {"zarr": ("f.zarr", {}), "hdf5": ("f.h5", {}),
          "zarr-format-1": ("f.zarr", {"format_version": 1, "shard_images": None, "n_studies": 200})}


@pytest.fixture(scope="module", params=list(STORES))
def store(tmp_path_factory, request):
    """A store per layout, shared by the tests of this module (they only read it)."""
    name, kw = STORES[request.param]
    return make_store(str(tmp_path_factory.mktemp(request.param) / name), **kw)


def same_item(a: dict, b: dict) -> None:
    assert a["ids"] == b["ids"] and a["index"] == b["index"]
    assert a["features"].dtype == torch.float32 and a["features"].equal(b["features"])
    assert a["view_types"].equal(b["view_types"])
    assert torch.equal(a["target"], b["target"])


def shard_reads(ds: StudyDataset) -> list[int]:
    """Record the shards the dataset reads (wraps its read of one shard)."""
    reads, read = [], ds._read_shard
    ds._read_shard = lambda k: (reads.append(k), read(k))[1]
    return reads


def test_items_hold_the_stores_maps_as_float32(store):
    st = open_store(store)
    ds = StudyDataset(store, "train", max_views=4, cache_shards=0)
    for i in range(len(ds)):
        study = st.read_study(ds.studies[i])
        item = ds[i]
        pick = deterministic_view_order(study.views, study.image_ids)
        np.testing.assert_array_equal(item["features"].numpy(), study.features[pick].astype(np.float32))
        assert item["view_types"].tolist() == [view_type(study.views[j]) for j in pick]
        assert item["ids"] == study.study_id
        np.testing.assert_array_equal(item["target"].numpy(), study.labels)


@pytest.mark.parametrize("train", [True, False])
def test_shard_cache_returns_the_same_items_as_uncached_reads(store, train):
    kw = dict(max_views=2, train=train, use_flip=not train)
    direct = StudyDataset(store, "train", **kw, cache_shards=0)
    cached = StudyDataset(store, "train", **kw)
    for item in ShardShuffleSampler(cached.item_shards, 2, seed=1):
        same_item(cached[item], direct[item])
    everything = StudyDataset(store, "train", **kw, cache_shards=100)   # any order hits the cache
    for item in ShuffleSampler(len(cached), seed=1):
        same_item(everything[item], direct[item])


def test_dataloader_workers_with_lanes_read_the_same_batches(store):
    ds = StudyDataset(store, "train", train=True)
    sampler = ShardShuffleSampler(ds.item_shards, 4, lanes=2, batch_size=4, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2,
                                         collate_fn=collate_studies, multiprocessing_context="fork")
    direct = StudyDataset(store, "train", train=True, cache_shards=0)
    items = list(sampler)
    for j, batch in enumerate(loader):
        want = collate_studies([direct[i] for i in items[4 * j:4 * j + 4]])
        assert batch["ids"] == want["ids"] and batch["features"].equal(want["features"])


def test_shard_local_order_reads_each_shard_once(store):
    ds = StudyDataset(store, "train", train=True, cache_shards=3)
    reads = shard_reads(ds)
    n_shards = len(set(ds.item_shards.tolist()))
    assert n_shards > 5
    for epoch in range(2):
        sampler = ShardShuffleSampler(ds.item_shards, buffer_shards=2, seed=0)
        sampler.set_epoch(epoch)
        for item in sampler:
            ds[item]
        # every shard once (a shard still cached from the last epoch need not be read again)
        assert len(reads) == len(set(reads))
        assert len(reads) == n_shards if epoch == 0 else n_shards - 3 <= len(reads) <= n_shards
        reads.clear()


def test_a_random_order_turns_the_cache_off(tmp_path):
    path = make_store(str(tmp_path / "f.zarr"), n_studies=200, flip=False, shard_images=16)
    ds, direct = StudyDataset(path, None, cache_shards=1), StudyDataset(path, None, cache_shards=0)
    reads = shard_reads(ds)
    with pytest.warns(RuntimeWarning, match="not shard-local"):
        for i, _ in ShuffleSampler(len(ds), seed=0):
            same_item(ds[i], direct[i])
    assert len(reads) <= 3                          # 2 * cache_shards + 1 misses, then study by study


@pytest.mark.parametrize("order", ["shuffled", "store"])
def test_a_study_or_two_per_shard_is_no_evidence_of_a_random_order(tmp_path, order, recwarn):
    """With a study or two per shard (a tiny store, a small split) a shard read costs about a study's
    in any order: the cache stays on and warns nothing, over several passes."""
    path = make_store(str(tmp_path / "f.zarr"), n_studies=60, flip=False, shard_images=2)
    ds = StudyDataset(path, None, cache_shards=1)
    for epoch in range(3):
        items = [i for i, _ in ShuffleSampler(len(ds), seed=epoch)] if order == "shuffled" else range(len(ds))
        for i in items:
            ds[i]
    assert ds._cache is not None and not [w for w in recwarn if "shard-local" in str(w.message)]


def test_read_plan_reads_dense_rows_in_one_span_and_sparse_rows_in_runs():
    reads, where = read_plan(np.array([10, 11, 13, 14]))
    assert reads == [(10, 15)] and where.tolist() == [0, 1, 3, 4]
    reads, where = read_plan(np.array([0, 1, 7, 20, 21]))
    assert reads == [(0, 2), (7, 8), (20, 22)] and where.tolist() == [0, 1, 2, 3, 4]


def test_study_shards_use_the_stores_shards_or_blocks_of_64_images():
    class Plain:
        study_ptr = np.array([0, 30, 64, 65, 200, 201])

    class Sharded(Plain):
        def study_shard_ids(self):
            return np.array([0, 0, 1, 1, 2])

    assert study_shards(Plain()).tolist() == [0, 0, 1, 1, 3]
    assert study_shards(Sharded()).tolist() == [0, 0, 1, 1, 2]


@pytest.mark.parametrize("train", [True, False])
def test_preload_ram_equals_streaming_and_get_batch_equals_collate(store, train):
    kw = dict(max_views=3, train=train, use_flip=not train)
    streamed = StudyDataset(store, "train", **kw, cache_shards=0)
    ram = StudyDataset(store, "train", **kw, preload="ram")
    assert ram.preload == "ram" and ram.resident.shape[0] == 2 * ram.n_rows   # maps + flipped maps
    items = list(ShuffleSampler(len(ram), seed=2))
    for item in items:
        same_item(ram[item], streamed[item])
    for pad_to in (None, 4):
        want = collate_studies([streamed[i] for i in items[:7]], pad_to=pad_to)
        got = ram.get_batch(items[:7], pad_to=pad_to)
        assert got.keys() == want.keys() and got["ids"] == want["ids"]
        for k in ("features", "view_mask", "view_types", "target", "index"):
            assert torch.equal(got[k], want[k]), k


def test_preload_reads_flipped_maps_only_when_they_can_be_returned(store):
    ds = StudyDataset(store, "val", preload=True)       # True: "ram", as before
    assert ds.preload == "ram" and not ds.needs_flip and ds.resident.shape[0] == ds.n_rows
    assert ds.resident_bytes() == ds.n_rows * np.prod(SHAPE) * 2


def test_preload_gpu_needs_a_gpu_device(store):
    with pytest.raises(ChxError, match="--preload gpu needs a GPU device"):
        StudyDataset(store, "train", preload="gpu", device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_preload_gpu_serves_the_same_batches_on_the_device(store):
    ram = StudyDataset(store, "train", train=True, preload="ram")
    gpu = StudyDataset(store, "train", train=True, preload="gpu", device="cuda")
    assert gpu.resident.device.type == "cuda"
    items = list(ShuffleSampler(len(gpu), seed=0))[:9]
    got, want = gpu.get_batch(items, pad_to=4), ram.get_batch(items, pad_to=4)
    assert got["features"].device.type == "cuda"
    for k in ("features", "view_mask", "view_types", "target"):
        assert torch.equal(got[k].cpu(), want[k]), k
    loader = torch.utils.data.DataLoader(gpu, batch_size=3, sampler=items, collate_fn=collate_studies)
    assert torch.equal(torch.cat([b["features"].cpu() for b in loader]), want["features"][:, :3])


def test_auto_preload_prefers_gpu_then_ram_then_streaming():
    assert choose_preload(4 * GiB, "cuda:0", gpu_free=10 * GiB, ram_available=0) == "gpu"
    assert choose_preload(6 * GiB, "cuda:0", gpu_free=10 * GiB, ram_available=20 * GiB) == "ram"
    assert choose_preload(6 * GiB, "cpu", ram_available=12 * GiB, ranks_per_machine=1) == "ram"
    # each rank of a machine holds its own copy
    assert choose_preload(6 * GiB, "cpu", ram_available=12 * GiB, ranks_per_machine=2) == "off"
    assert choose_preload(6 * GiB, None, ram_available=11 * GiB, ranks_per_machine=1) == "off"


def test_a_pickled_dataset_starts_with_an_empty_cache(store):
    ds = StudyDataset(store, "train")
    first = ds[0]
    assert len(ds._cache) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        copy = pickle.loads(pickle.dumps(ds))
    assert copy._cache is None and copy._store is None
    same_item(copy[0], first)
    assert len(copy._cache) == 1


def test_an_empty_split_is_an_empty_dataset(store):
    ds = StudyDataset(store, "test", preload="auto")
    assert len(ds) == 0 and ds.preload == "off"


def test_the_dataset_reads_through_the_stores_checked_read_rows(tmp_path):
    """StudyDataset streams with the store's public read_rows, which checks every row: one changed
    byte in a shard is one ChxError naming its image, cached (whole shard) or not (one study)."""
    path = make_store(str(tmp_path / "f.zarr"))
    with open_store(path) as s:
        row = s.shard_rows(2)[0] + 1
        img, study = s.image_ids[row], int(np.searchsorted(s.study_ptr, row, side="right") - 1)
        for flip in (False, True):
            np.testing.assert_array_equal(s.read_rows(row - 1, row + 2, flip),
                                          np.stack([s.read_image(r, flip) for r in range(row - 1, row + 2)]))
        np.testing.assert_array_equal(s.read_rows(*s.shard_rows(2)), s.read_shard(2)[0])
        with pytest.raises(IndexError):
            s.read_rows(0, s.n_images + 1)
    obj = tmp_path / "f.zarr" / "features" / "c.2.0.0.0"
    data = bytearray(obj.read_bytes())
    data[1 * int(np.prod(SHAPE)) * 2 + 1] ^= 0x04                 # one bit of row 1 of shard 2
    obj.write_bytes(bytes(data))
    for cache_shards in (0, 4):
        ds = StudyDataset(path, None, cache_shards=cache_shards)
        item = int(np.flatnonzero(ds.studies == study)[0])
        with pytest.raises(ChxError, match="do not match their checksum") as e:
            ds[item]
        assert repr(img) in str(e.value) and "\n" not in str(e.value)
    with open_store(path) as s:                                   # the other shards still read
        s.read_rows(*s.shard_rows(0))
