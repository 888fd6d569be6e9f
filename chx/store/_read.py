"""Reading a feature store: maps of studies, rows, images and shards, decoded to float16 (or as
stored), every read checked (chx/store/_integrity.py): a mixin of :class:`FeatureStore`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from chx.errors import ChxError
from chx.store import _codec


@dataclass
class StudyFeatures:
    """One study read from a store: its views' feature maps in store order, decoded to float16."""

    study_id: str
    features: np.ndarray              # [V, C, H, W] float16
    features_flip: np.ndarray | None  # [V, C, H, W] float16, or None when the store has no flip
    views: list[str]
    image_ids: list[str]
    labels: np.ndarray                # [K] float32, NaN = not annotated
    split: str


@dataclass
class StoredMaps:
    """Maps of store rows as stored: decode them with :func:`chx.store.decode_maps` (numpy or torch)."""

    features: np.ndarray              # [n, C, H, W] float16 | uint16 (bfloat16 bits) | uint8 (float8 e4m3)
    features_flip: np.ndarray | None
    scale: np.ndarray | None          # [n, 1 or 2 (features, features_flip), C] float32, float8 only
    dtype: str

    def decoded(self, flip: bool = False):
        """[n, C, H, W] float16 of the maps (the flipped ones with flip=True)."""
        raw = self.features_flip if flip else self.features
        return _codec.decode(raw, self.dtype, None if self.scale is None else self.scale[:, int(flip)])


class Reading:
    """The public reads (what readers use) and the id lookups they start from."""

    def image_index(self, image_ids: Sequence[str]) -> np.ndarray:
        """Store rows of the given image ids (ChxError for an id the store does not hold)."""
        if self._index is None:
            self._index = {x: i for i, x in enumerate(self._image_ids)}
        out = np.empty(len(image_ids), dtype=np.int64)
        for j, x in enumerate(image_ids):
            r = self._index.get(str(x))
            if r is None:
                raise ChxError(f"image {x!r} is not in feature store {self.path}")
            out[j] = r
        return out

    def study_indices(self, split: str | None = None) -> np.ndarray:
        """Indices of the studies in a split (all studies when split is None)."""
        if split is None:
            return np.arange(self.n_studies, dtype=np.int64)
        return np.flatnonzero(np.asarray(self.study_splits, dtype=object) == split).astype(np.int64)

    def read_study(self, i: int) -> StudyFeatures:
        """One study: its images' maps [V, C, H, W] float16 in one contiguous read (plus one for the flip)."""
        i = int(i)
        if not 0 <= i < self.n_studies:
            raise IndexError(f"study index {i} out of range 0..{self.n_studies - 1}")
        a, b = int(self._study_ptr[i]), int(self._study_ptr[i + 1])
        feats, flips = self._read_maps(a, b, self._has_flip)
        return StudyFeatures(study_id=self._study_ids[i], features=feats, features_flip=flips,
                             views=self._views[a:b], image_ids=self._image_ids[a:b],
                             labels=self._labels[i].copy(), split=self._splits[a])

    def read_image(self, row: int, flip: bool = False) -> np.ndarray:
        """Maps [C, H, W] float16 of one store row (the flipped copy with flip=True)."""
        row = int(row)
        if not 0 <= row < self.n_images:
            raise IndexError(f"row {row} out of range 0..{self.n_images - 1}")
        return self.read_rows(row, row + 1, flip)[0]

    def read_rows(self, start: int, stop: int, flip: bool = False) -> np.ndarray:
        """Maps [stop - start, C, H, W] float16 of the consecutive store rows start..stop-1 (the
        flipped copies with flip=True), in one read per array: what readers such as
        :class:`chx.data.study_dataset.StudyDataset` use. Every row is checked as it is read: a row
        not extracted yet, a missing or undecodable object, or bytes that do not match their
        checksum (or hold NaN/inf, older stores) is one ChxError naming the image and what to do."""
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.n_images:
            raise IndexError(f"rows {start}..{stop - 1} out of range 0..{self.n_images - 1}")
        if flip and not self._has_flip:
            raise ChxError(f"feature store {self.path} has no flipped features (created without flip)")
        maps, flipped = self._read_maps(start, stop, flip, only_flip=flip)
        return flipped if flip else maps

    def read_shard(self, s: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(maps, flipped maps or None) [rows of shard s, C, H, W] float16: one read per array, the
        fast path for streaming a store that does not fit in memory (rows: :meth:`shard_rows`)."""
        a, b = self.shard_rows(s)
        return self._read_maps(a, b, self._has_flip)

    def read_shard_stored(self, s: int) -> StoredMaps:
        """Shard s as stored, not decoded (uint16 bfloat16 bits, uint8 float8 codes + their scale):
        for a reader that decodes where the compute is (``decode_maps`` takes GPU tensors)."""
        a, b = self.shard_rows(s)
        return StoredMaps(
            features=self._read_checked("features", a, b),
            features_flip=self._read_checked("features_flip", a, b) if self._has_flip else None,
            scale=self._read_checked("scale", a, b) if _codec.has_scale(self.dtype) else None, dtype=self.dtype)

    def _read_maps(self, a: int, b: int, flip: bool, only_flip: bool = False):
        scale = self._read_checked("scale", a, b) if _codec.has_scale(self.dtype) else None
        feats = None if only_flip else _codec.decode(self._read_checked("features", a, b), self.dtype,
                                                      None if scale is None else scale[:, 0])
        flips = _codec.decode(self._read_checked("features_flip", a, b), self.dtype,
                              None if scale is None else scale[:, 1]) if flip else None
        return feats, flips
