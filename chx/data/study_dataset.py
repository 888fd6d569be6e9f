"""Stage-2 dataset: one item per study, read from the feature store only (no image, no backbone).

View handling: at most ``max_views`` views per study. Training takes a random subset when a study
has more, in a random order (``shuffle=False`` keeps the deterministic order, to ablate). Evaluation
and prediction use a deterministic choice and order (:func:`chx.data.views.deterministic_view_order`:
PA, AP, LATERAL, LL, OTHER, ties by image id), so the same study always gets the same output (the
reference code drew a random subset at inference).

Where the features come from (``preload``):

- ``"ram"`` / ``"gpu"``: the split's maps are read once into one tensor [rows, C, H, W] (store
  dtype, float16) in host memory or on ``device``; an epoch then costs no store I/O. With ``"gpu"``
  batches are gathered on the device (:meth:`StudyDataset.get_batch`, or a DataLoader with
  ``num_workers=0`` and ``pin_memory=False``: :func:`collate_studies` builds the batch on the
  items' device).
- ``"off"``: streamed from the store. With ``cache_shards > 0`` (the default) reading a study reads
  its whole shard (the split's rows of it, :func:`read_plan`) and keeps the last ``cache_shards``
  shards (LRU, per process), so a shard-local order
  (:class:`chx.data.samplers.ShardShuffleSampler`) costs one long read per shard. A random order
  over many shards would read a whole shard per study: after ``2 * cache_shards`` misses with fewer
  hits than misses the cache turns itself off for that process (one warning) and studies are read
  one by one, which ``cache_shards=0`` asks for from the start (random access). Only where the
  split has more than 2 studies per shard: with fewer, a shard read costs about a study's and any
  order is as good (tiny stores, a small split of a store).
- ``"auto"``: :func:`choose_preload`.

What a shard read costs: the span of the split's rows in the shard, other splits' rows inside it
included (at most twice the split's own bytes, :func:`read_plan`), and, in training on a store
with flipped maps (``flip_aug``), both copies, since each study picks one at random (twice
again). In return it is a few long reads instead of one request per study, which matters most
where requests are dear (object storage, network file systems, disks that seek, small maps); on
local NVMe a study's few MiB are already a long read, so measure (``benchmarks/bench_reader.py``).

DataLoader workers each hold their own cache: ``cache_shards`` decoded shards (float16, both
copies when flipped maps are read; at the paper's maps a shard of 171 images is 256 MiB a copy).
In a plain shard-local order every worker gets batches from every shard of the buffer, so each
shard is read once per worker: ``num_workers`` times the reads (mostly from the page cache) and
the memory. ``ShardShuffleSampler(..., lanes=num_workers, batch_size=batch_size)`` deals each
shard's batches to one worker, so each shard is read once in all, and a worker then needs only
about ``buffer_shards // lanes + 2`` cached shards. `chx train-fusion` streams so (one lane per
worker, ``--buffer-shards`` shards mixed per lane, the lanes recorded with the run for its resume).
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info
from tqdm.auto import tqdm

from chx.data.samplers import DEFAULT_BUFFER_SHARDS
from chx.data.views import FRONTAL_VIEWS, LATERAL_VIEWS, OTHER_TYPE, deterministic_view_order, view_type
from chx.errors import ChxError
from chx.store import open_store

__all__ = ["StudyDataset", "collate_studies", "choose_preload", "study_shards", "read_plan"]

# Shard of a study in stores without shards: the block of this many images its first image is in.
FALLBACK_SHARD_IMAGES = 64
# "auto" preload: on the GPU when the maps take at most this share of its free memory (the rest is
# left to the model, activations and the other split), else in RAM when they take at most this
# share of the available memory, divided among the ranks of one machine.
GPU_FRACTION = 0.5
RAM_FRACTION = 0.5
PRELOAD_MODES = ("off", "ram", "gpu", "auto")
RESIDENT_ITEMSIZE = 2   # float16: what the store's reads return


def study_shards(store) -> np.ndarray:
    """[n_studies] int64: the store shard of each study (of its first image).

    ``store.study_shard_ids()`` where the store has it; else consecutive blocks of
    :data:`FALLBACK_SHARD_IMAGES` images."""
    ids = getattr(store, "study_shard_ids", None)
    if ids is not None:
        return np.asarray(ids(), dtype=np.int64)
    return np.asarray(store.study_ptr[:-1], dtype=np.int64) // FALLBACK_SHARD_IMAGES


def read_plan(rows: np.ndarray) -> tuple[list[tuple[int, int]], np.ndarray]:
    """How to read ascending store ``rows`` [n]: ``(reads, where)``.

    One read of their whole span when they fill at least half of it (a split interleaved with
    others then costs at most twice its bytes, in one long read), else one read per run of
    consecutive rows. ``reads``: (start, stop) store rows; ``where`` [n]: the position of each row
    in the concatenation of the reads."""
    rows = np.asarray(rows, dtype=np.int64)
    first, last = int(rows[0]), int(rows[-1])
    if 2 * len(rows) >= last + 1 - first:
        return [(first, last + 1)], rows - first
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = rows[np.r_[0, breaks]]
    stops = rows[np.r_[breaks - 1, len(rows) - 1]] + 1
    return [(int(a), int(b)) for a, b in zip(starts, stops)], np.arange(len(rows))


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(start, start + count)`` for each (start, count) pair, as int64."""
    starts, counts = np.asarray(starts, dtype=np.int64), np.asarray(counts, dtype=np.int64)
    offsets = np.zeros(len(counts), dtype=np.int64)
    np.cumsum(counts[:-1], out=offsets[1:])
    return np.repeat(starts - offsets, counts) + np.arange(int(counts.sum()), dtype=np.int64)


def _ram_available() -> int:
    """Bytes of memory available to new allocations (MemAvailable), without swapping."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_preload(nbytes: int, device=None, *, gpu_free: int | None = None,
                   ram_available: int | None = None, ranks_per_machine: int | None = None) -> str:
    """The "auto" policy: where ``nbytes`` of features should live. "gpu" when ``device`` is a CUDA
    device and they take at most :data:`GPU_FRACTION` of its free memory; else "ram" when they take
    at most :data:`RAM_FRACTION` of the available memory divided by the ranks on this machine
    (``LOCAL_WORLD_SIZE``, each rank holds its own copy); else "off" (stream the store).
    ``gpu_free`` / ``ram_available`` / ``ranks_per_machine`` override the measured values (bytes)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        if gpu_free is None:
            gpu_free = torch.cuda.mem_get_info(device)[0]
        if nbytes <= GPU_FRACTION * gpu_free:
            return "gpu"
    ram = _ram_available() if ram_available is None else ram_available
    ranks = ranks_per_machine or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return "ram" if nbytes <= RAM_FRACTION * ram / ranks else "off"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


class StudyDataset(Dataset):
    """Items: ``features`` [V, C, H, W] float32, ``view_types`` [V] long, ``target`` [K] float32
    (NaN = not annotated), ``ids`` (study_id), ``index``. Indexing with ``(index, seed)`` seeds the
    view subset/order and the flip choice for training.

    ``views``: "all", "frontal" or "lateral": keep only those views (robustness checks); studies
    left without a view are dropped. ``flip_aug``: in training, use the store's flipped features
    (when it has them) for a random half of the studies; ``use_flip``: return the flipped features
    (evaluation). ``preload``: "off" | "ram" | "gpu" | "auto" (True/False mean "ram"/"off"), see the
    module docstring; the resolved mode is ``self.preload``, and ``device`` is where "gpu" (and
    "auto") put the features. ``cache_shards``: shards kept per process when streaming (0 = read
    each study on its own).
    """

    def __init__(self, store_path, split: str | None, max_views: int = 4, train: bool = False,
                 shuffle: bool = True, views: str = "all", flip_aug: bool = True,
                 use_flip: bool = False, preload: str | bool = "off", device=None,
                 cache_shards: int = DEFAULT_BUFFER_SHARDS + 1):
        self.store_path = store_path
        self.split = split
        self.max_views = max_views
        self.train = train
        self.shuffle = shuffle
        self.flip_aug = flip_aug
        self.use_flip = use_flip
        self.cache_shards = cache_shards
        self._store, self._pid = None, None
        store = self.store
        self.has_flip = store.has_flip
        # The flipped maps are read only when this dataset can return them.
        self.needs_flip = self.has_flip and (use_flip or (train and flip_aug))
        self.keep = {"all": None, "frontal": FRONTAL_VIEWS, "lateral": LATERAL_VIEWS}[views]
        ptr = store.study_ptr
        studies = store.study_indices(split)
        if self.keep is not None:
            v = np.asarray(store.views)
            studies = [s for s in studies if np.isin(v[ptr[s]:ptr[s + 1]], self.keep).any()]
        self.studies = np.asarray(studies, dtype=np.int64)
        self.labels = np.asarray(store.labels, dtype=np.float32)[self.studies]
        self.study_ids = [store.study_ids[s] for s in self.studies]
        # The split's store rows, item after item: item i is rows[row_ptr[i]:row_ptr[i + 1]].
        counts = ptr[self.studies + 1] - ptr[self.studies]
        self.row_ptr = np.zeros(len(self.studies) + 1, dtype=np.int64)
        np.cumsum(counts, out=self.row_ptr[1:])
        self.rows = _ranges(ptr[self.studies], counts)
        self.row_views = [store.views[r] for r in self.rows]
        self.row_image_ids = [store.image_ids[r] for r in self.rows]
        self.item_shards = study_shards(store)[self.studies]
        self._plan_shards()
        self.resident: torch.Tensor | None = None  # [rows (+ rows flipped), C, H, W] when preloaded
        self.preload = self._resolve_preload(preload, device)
        if self.preload != "off":
            self._load_resident(torch.device("cpu") if self.preload == "ram" else torch.device(device))
        self._reset_cache()

    # ------------------------------------------------------------------------------ set-up helpers
    def _plan_shards(self) -> None:
        """Per shard (numbered 0.. in ``self._shard_of_item``): its read plan and, for its items'
        rows, their positions in the read (``where``) and in the packed split (``packed``)."""
        uniq, self._shard_of_item = np.unique(self.item_shards, return_inverse=True)
        by_shard = np.argsort(self._shard_of_item, kind="stable")
        bounds = np.searchsorted(self._shard_of_item[by_shard], np.arange(len(uniq) + 1))
        self._plans = []
        self._item_offset = np.zeros(len(self.studies), dtype=np.int64)  # first row's place in its read
        for k in range(len(uniq)):
            items = by_shard[bounds[k]:bounds[k + 1]]
            packed = _ranges(self.row_ptr[items], self.row_ptr[items + 1] - self.row_ptr[items])
            reads, where = read_plan(self.rows[packed])
            starts = np.searchsorted(packed, self.row_ptr[items])
            self._item_offset[items] = where[starts]
            self._plans.append((reads, where, packed))

    @property
    def n_rows(self) -> int:
        return int(self.row_ptr[-1])

    def resident_bytes(self) -> int:
        """Bytes the split's maps take in memory (float16; x2 when flipped maps are needed)."""
        c, h, w = self.store.feature_shape
        return self.n_rows * c * h * w * RESIDENT_ITEMSIZE * (2 if self.needs_flip else 1)

    def _resolve_preload(self, preload, device) -> str:
        mode = {True: "ram", False: "off"}.get(preload, preload) if isinstance(preload, bool) else preload
        if mode not in PRELOAD_MODES:
            raise ValueError(f"preload must be one of {PRELOAD_MODES} (or a bool), not {preload!r}")
        if self.n_rows == 0:
            return "off"
        nbytes = self.resident_bytes()
        if mode == "auto":
            return choose_preload(nbytes, device)
        what = f"the {self.split or 'all'} split's features ({_gib(nbytes)})"
        if mode == "gpu":
            if device is None or torch.device(device).type == "cpu":
                raise ChxError(f"--preload gpu needs a GPU device (got {device or 'none'}); "
                               f"use --preload ram, auto or off")
            device = torch.device(device)
            if device.type == "cuda" and nbytes > torch.cuda.mem_get_info(device)[0]:
                raise ChxError(f"--preload gpu: {what} do not fit in the free memory of {device} "
                               f"({_gib(torch.cuda.mem_get_info(device)[0])}); use --preload auto or off")
        if mode == "ram" and nbytes > _ram_available():
            raise ChxError(f"--preload ram: {what} do not fit in the available memory "
                           f"({_gib(_ram_available())}); use --preload auto or off")
        return mode

    def _load_resident(self, device: torch.device) -> None:
        """Read the split's maps shard by shard into one tensor on ``device``: rows 0..n-1 as
        stored, rows n..2n-1 flipped (when needed)."""
        n, base = self.n_rows, (0, self.n_rows)
        resident = None
        for k in tqdm(range(len(self._plans)), desc=f"preload {self.split or 'all'} ({self.preload})",
                      unit="shard", leave=False, disable=None):
            _, where, packed = self._plans[k]
            for flip, maps in enumerate(self._read_shard(k)):
                src = torch.from_numpy(np.ascontiguousarray(maps[where]))
                if resident is None:
                    shape = (n * (2 if self.needs_flip else 1), *src.shape[1:])
                    try:
                        resident = torch.empty(shape, dtype=src.dtype, device=device)
                    except torch.OutOfMemoryError:
                        raise ChxError(f"--preload {self.preload}: the {self.split or 'all'} split's "
                                       f"features ({_gib(self.resident_bytes())}) do not fit on {device}; "
                                       f"use --preload auto or off") from None
                dst = torch.from_numpy(packed + base[flip]).to(device)
                resident.index_copy_(0, dst, src.to(device))
        self.resident = resident

    # ------------------------------------------------------------------------- per-process state
    @property
    def store(self):
        # Opened lazily per process: store handles (HDF5 above all) must not cross a fork.
        if self._store is None or self._pid != os.getpid():
            self._store, self._pid = open_store(self.store_path), os.getpid()
        return self._store

    def _reset_cache(self) -> None:
        # Each process (DataLoader worker) keeps its own cache and hit counts.
        self._cache: OrderedDict | None = OrderedDict() if self.cache_shards > 0 else None
        self._hits = self._misses = 0
        self._cache_pid = os.getpid()

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_store=None, _pid=None, _cache=None, _cache_pid=None)
        return state

    def __len__(self) -> int:
        return len(self.studies)

    # ------------------------------------------------------------------------------------ reading
    def _read_shard(self, k: int) -> list[np.ndarray]:
        """Shard ``k``'s planned rows: [maps] or [maps, flipped maps], each [rows read, C, H, W]."""
        reads = self._plans[k][0]
        out = []
        for flip in ((False, True) if self.needs_flip else (False,)):
            parts = [self.store.read_rows(a, b, flip) for a, b in reads]
            out.append(parts[0] if len(parts) == 1 else np.concatenate(parts))
        return out

    def _cached(self, index: int, flip: bool) -> np.ndarray | None:
        """Item ``index``'s maps [n_views, C, H, W] from the shard cache (reading its shard on a
        miss); None once the cache has turned itself off."""
        if self._cache_pid != os.getpid():
            self._reset_cache()
        if self._cache is None:
            return None
        k = int(self._shard_of_item[index])
        entry = self._cache.get(k)
        if entry is None:
            self._misses += 1
            if (self._misses > 2 * self.cache_shards and self._misses > self._hits
                    and len(self.studies) > 2 * len(self._plans)):     # > 2 studies per shard (see above)
                warnings.warn(f"StudyDataset({self.store_path}): the read order is not shard-local "
                              f"({self._hits} cache hits, {self._misses} misses); reading studies "
                              f"one by one from now on in this process", RuntimeWarning, stacklevel=3)
                self._cache = None
                return None
            entry = self._cache[k] = self._read_shard(k)
            if len(self._cache) > self.cache_shards:
                self._cache.popitem(last=False)
        else:
            self._hits += 1
            self._cache.move_to_end(k)
        start = self._item_offset[index]
        return entry[int(flip)][start:start + self.row_ptr[index + 1] - self.row_ptr[index]]

    def _maps(self, index: int, flip: bool):
        """Item ``index``'s maps [n_views, C, H, W] in store dtype: a tensor slice of the resident
        features, or a numpy array read from the store."""
        lo, hi = int(self.row_ptr[index]), int(self.row_ptr[index + 1])
        if self.resident is not None:
            if self.resident.device.type != "cpu" and get_worker_info() is not None:
                raise RuntimeError("GPU-resident features cannot be read in DataLoader workers; "
                                   "use num_workers=0 (and pin_memory=False)")
            base = self.n_rows if flip else 0
            return self.resident[base + lo:base + hi]
        maps = self._cached(index, flip)
        if maps is None:   # random access: one read of the study's rows
            maps = self.store.read_rows(int(self.rows[lo]), int(self.rows[hi - 1]) + 1, flip)
        return maps

    def choose_views(self, views: list[str], image_ids: list[str], seed: int | None) -> list[int]:
        candidates = [i for i in range(len(views)) if self.keep is None or views[i] in self.keep]
        order = [i for i in deterministic_view_order(views, image_ids) if i in candidates]
        if not (self.train and seed is not None):
            return order[: self.max_views]
        rng = np.random.default_rng(seed)
        if len(order) > self.max_views:
            chosen = set(rng.choice(len(order), self.max_views, replace=False).tolist())
            order = [o for j, o in enumerate(order) if j in chosen]
        if self.shuffle:
            order = [order[j] for j in rng.permutation(len(order))]
        return order

    def _choose(self, item) -> tuple[int, list[int], bool]:
        """(index, chosen views as positions in the study, flipped?) of an item or (item, seed)."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        index = int(index)
        lo, hi = self.row_ptr[index], self.row_ptr[index + 1]
        pick = self.choose_views(self.row_views[lo:hi], self.row_image_ids[lo:hi], seed)
        flip = self.use_flip
        if self.train and seed is not None and self.flip_aug and self.has_flip:
            flip = bool(np.random.default_rng([seed, 7]).random() < 0.5)
        return index, pick, flip and self.needs_flip

    def _view_types(self, index: int, pick: list[int]) -> list[int]:
        lo = self.row_ptr[index]
        return [view_type(self.row_views[lo + i]) for i in pick]

    def __getitem__(self, item):
        index, pick, flip = self._choose(item)
        maps = self._maps(index, flip)
        if isinstance(maps, torch.Tensor):
            features = maps[torch.as_tensor(pick, device=maps.device)].float()
        else:   # torch converts float16 -> float32 several times faster than numpy
            features = torch.from_numpy(np.ascontiguousarray(maps[pick])).float()
        return {
            "features": features,
            "view_types": torch.tensor(self._view_types(index, pick), dtype=torch.long),
            "target": torch.tensor(self.labels[index]),
            "ids": self.study_ids[index],
            "index": index,
        }

    def get_batch(self, items, pad_to: int | None = None) -> dict:
        """``collate_studies([self[i] for i in items], pad_to)``; preloaded, in one gather from the
        resident features, with every tensor on their device (the "gpu" training path)."""
        if self.resident is None:
            return collate_studies([self[i] for i in items], pad_to)
        chosen = [self._choose(item) for item in items]
        v = max(pad_to or 0, max(len(pick) for _, pick, _ in chosen))
        rows = np.zeros((len(chosen), v), dtype=np.int64)
        mask = np.zeros((len(chosen), v), dtype=bool)
        types = np.full((len(chosen), v), OTHER_TYPE, dtype=np.int64)
        for b, (index, pick, flip) in enumerate(chosen):
            rows[b, :len(pick)] = self.row_ptr[index] + np.asarray(pick) + (self.n_rows if flip else 0)
            mask[b, :len(pick)] = True
            types[b, :len(pick)] = self._view_types(index, pick)
        device = self.resident.device
        mask_t = torch.from_numpy(mask).to(device)
        features = self.resident[torch.from_numpy(rows).to(device)].float()
        features *= mask_t[:, :, None, None, None]          # padding slots are zeros
        indices = [index for index, _, _ in chosen]
        return {"features": features, "view_mask": mask_t, "view_types": torch.from_numpy(types).to(device),
                "target": torch.from_numpy(self.labels[indices]).to(device),
                "ids": [self.study_ids[i] for i in indices], "index": torch.tensor(indices)}


def collate_studies(batch: list[dict], pad_to: int | None = None) -> dict:
    """Stack studies, padding the view axis to the batch's largest study (or ``pad_to``), on the
    items' device (GPU-resident items stay there)."""
    v = max(pad_to or 0, max(len(b["view_types"]) for b in batch))
    c, h, w = batch[0]["features"].shape[1:]
    device = batch[0]["features"].device
    features = torch.empty(len(batch), v, c, h, w, device=device)
    mask = torch.zeros(len(batch), v, dtype=torch.bool)
    types = torch.full((len(batch), v), OTHER_TYPE, dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["view_types"])
        features[i, :n] = b["features"]
        features[i, n:] = 0          # padding slots (written once, not zeroed and overwritten)
        mask[i, :n] = True
        types[i, :n] = b["view_types"]
    return {"features": features, "view_mask": mask.to(device), "view_types": types.to(device),
            "target": torch.stack([b["target"] for b in batch]).to(device),
            "ids": [b["ids"] for b in batch], "index": torch.tensor([b["index"] for b in batch])}
