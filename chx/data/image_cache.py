"""The image cache (`chx cache-images`): each image of a manifest decoded once, at one
preprocessing size and resize mode, and read back instead of the original file.

A cache is a feature store (:mod:`chx.store`: Zarr v3 shards written whole, per-row CRC-32C, done
marks, ``chx store verify``/``info``) whose rows are images: dtype ``uint8``, shape [1, S, S], no
flipped copy, fingerprint :func:`cache_fingerprint` (kind ``images``, size, resize mode). A row is
``round(x * 255)`` of :func:`chx.data.images.load_image`'s tensor x, which is itself quantized to
those 8-bit steps, so :meth:`ImageCache.read` gives back that tensor exactly (``torch.equal``):
training, extraction and evaluation compute the same from the cache as from the originals.

Rows are found by ``image_id``: a cache made from a larger manifest serves any part of it. A cache
of another size or resize mode, an incomplete one, or one that lacks some of the manifest's images
is refused with one line naming the `chx cache-images` command to run.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from chx.data.images import from_uint8, load_image, to_uint8
from chx.data.transforms import Preprocess
from chx.errors import ChxError
from chx.store import open_store

KIND = "images"
DTYPE = "uint8"


def cache_fingerprint(size: int, mode: str) -> dict:
    """What a cache's rows are (recorded in the store; shown by `chx store info`)."""
    return {"kind": KIND, "size": int(size), "mode": str(mode), "dtype": DTYPE,
            "values": "round(255 * load_image)"}


def rebuild_hint(path, pre: Preprocess | None) -> str:
    size, mode = (pre.size, pre.mode) if pre is not None else ("SIZE", "MODE")
    return (f"`chx cache-images --manifest MANIFEST --images ROOT --size {size} --resize {mode} "
            f"-o {path}` (--overwrite to replace it), or drop --images-cache to read the original files")


class ImageCache:
    """The read side of an image cache, checked against the preprocessing ``pre`` at open (None:
    any; ask :meth:`serves` for each model, as an ensemble of several sizes does).

    Picklable: a DataLoader worker opens the store itself on its first read."""

    def __init__(self, path: str | Path, pre: Preprocess | None):
        self.path = str(path)
        store = open_store(self.path)
        try:
            fp = store.fingerprint
            self.size, self.mode = fp.get("size"), fp.get("mode")
            if fp.get("kind") != KIND:
                raise ChxError(f"--images-cache {self.path} is a feature store (of extract-features), not an image "
                               f"cache; make one with {rebuild_hint(self.path, pre)}")
            self.pre = pre or Preprocess(size=self.size, mode=self.mode)   # for rebuild_hint
            if pre is not None and not self.serves(pre):
                raise ChxError(f"image cache {self.path} holds {fp.get('size')} px {fp.get('mode')} images but the "
                               f"model preprocesses to {pre.size} px {pre.mode}; rebuild it with "
                               f"{rebuild_hint(self.path, pre)}")
            if not store.complete:
                missing = len(store.missing_rows())
                raise ChxError(f"image cache {self.path} is not complete ({missing:,} of {store.n_images:,} images "
                               f"not cached yet): finish it by rerunning the same `chx cache-images` command")
            self._index = {str(x): i for i, x in enumerate(store.image_ids)}
        finally:
            store.close()
        self._store, self._pid = None, None

    def serves(self, pre: Preprocess) -> bool:
        """Whether this cache holds the images as ``pre`` decodes them (its size and resize mode)."""
        return (self.size, self.mode) == (pre.size, pre.mode)

    def rows_of(self, image_ids) -> np.ndarray:
        """Cache rows of these image ids; one line naming the rebuild when some are not cached."""
        got = [self._index.get(str(x)) for x in image_ids]
        missing = [x for x, r in zip(image_ids, got) if r is None]
        if missing:
            raise ChxError(f"image cache {self.path} lacks {len(missing):,} of the manifest's {len(got):,} images "
                           f"(e.g. image_id {missing[0]!r}); rebuild it from this manifest with "
                           f"{rebuild_hint(self.path, self.pre)}")
        return np.asarray(got, dtype=np.int64)

    def read(self, row: int) -> torch.Tensor:
        """float32 [1, S, S] of cache row ``row``: equal to ``load_image`` of its original file."""
        if self._store is None or self._pid != os.getpid():
            self._store, self._pid = open_store(self.path), os.getpid()
        steps = self._store.read_image(int(row))
        return from_uint8(torch.from_numpy(steps if steps.flags.writeable else steps.copy()))

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_store=None, _pid=None, _index={})   # workers get rows, never the id map
        return state


def open_image_cache(path: str | Path | None, pre: Preprocess) -> ImageCache | None:
    """``--images-cache PATH`` for a model preprocessing with ``pre`` (None: read the original files)."""
    return None if path is None else ImageCache(path, pre)


class ImageSteps(Dataset):
    """The writer's side: item i is ``{"image": uint8 [1, S, S], "index": i}``, the 8-bit steps of
    :func:`~chx.data.images.load_image` of file i (what a cache row holds)."""

    def __init__(self, files: list[Path], pre: Preprocess):
        self.files, self.pre = list(files), pre

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        return {"image": to_uint8(load_image(self.files[i], self.pre.size, self.pre.mode)), "index": i}
