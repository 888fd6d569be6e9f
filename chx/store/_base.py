"""Backend-neutral parts of the feature store: the study layout, validation, the common class."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from chx.errors import ChxError

FORMAT_VERSION = 1
VIEWS = ("PA", "AP", "LATERAL", "LL", "OTHER")
FEATURE_DTYPE = np.dtype("float16")
# The arrays every store holds (features_flip only when created with flip=True).
REQUIRED_ARRAYS = ("features", "study_ptr", "image_id", "view", "split", "done", "study_id", "labels")
REQUIRED_ATTRS = ("format_version", "class_names", "fingerprint", "feature_shape", "complete", "flip")
HINT_RECREATE = "re-create it with `chx extract-features ... --overwrite`"


def local_path(path) -> Path | None:
    """The local path of a plain path or file:// URL; None for other URLs (object storage)."""
    p = str(path)
    if p.startswith("file://"):
        return Path(p[len("file://"):])
    if "://" in p:
        return None
    return Path(p)


def projected_size(n_images: int, feature_shape: Sequence[int], flip: bool = False) -> int:
    """Bytes the features take before compression: n_images * C*H*W * 2 (float16), x2 with flip."""
    return int(n_images) * _per_image(feature_shape, flip)


def _per_image(feature_shape: Sequence[int], flip: bool) -> int:
    return int(np.prod([int(s) for s in feature_shape])) * FEATURE_DTYPE.itemsize * (2 if flip else 1)


@dataclass
class StudyFeatures:
    """One study read from a store: its views' feature maps in store order."""

    study_id: str
    features: np.ndarray              # [V, C, H, W] float16
    features_flip: np.ndarray | None  # [V, C, H, W] float16, or None when the store has no flip
    views: list[str]
    image_ids: list[str]
    labels: np.ndarray                # [K] float32, NaN = not annotated
    split: str


def normalise_fingerprint(fingerprint: dict) -> dict:
    """The fingerprint as it comes back from JSON (tuples -> lists), so stored and given compare equal."""
    if not isinstance(fingerprint, dict):
        raise TypeError(f"fingerprint must be a dict, not {type(fingerprint).__name__}")
    try:
        return json.loads(json.dumps(fingerprint, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise TypeError(f"fingerprint must be JSON-serialisable: {e}") from None


def fingerprint_diff(stored: dict, given: dict) -> list[str]:
    """'field: stored -> given' for every field that differs (missing fields shown as <absent>)."""
    out = []
    for k in sorted(set(stored) | set(given)):
        a, b = stored.get(k, "<absent>"), given.get(k, "<absent>")
        if a != b:
            out.append(f"{k}: {a!r} in the store vs {b!r} now")
    return out


@dataclass
class Layout:
    """Images sorted by study (CSR): what a new store holds, in store order."""

    image_ids: list[str]
    views: list[str]
    splits: list[str]                 # per image
    study_ids: list[str]
    study_ptr: np.ndarray             # [n_studies + 1] int64
    labels: np.ndarray                # [n_studies, K] float32

    @property
    def n_images(self) -> int:
        return len(self.image_ids)


def build_layout(image_ids, study_ids, views, splits, labels, class_names) -> Layout:
    """Validate per-image inputs (any order) and sort them by study: first appearance of each study,
    then input order inside a study (a stable sort)."""
    image_ids = [str(x) for x in image_ids]
    study_ids = [str(x) for x in study_ids]
    views = ["" if v is None else str(v) for v in views]
    splits = ["" if s is None else str(s) for s in splits]
    n = len(image_ids)
    if n == 0:
        raise ChxError("cannot create a feature store with no images; check the manifest")
    lengths = {"study_ids": len(study_ids), "views": len(views), "splits": len(splits), "labels": len(labels)}
    bad = {k: v for k, v in lengths.items() if v != n}
    if bad:
        raise ChxError(f"feature store inputs disagree in length: {n} image_ids but "
                       + ", ".join(f"{v} {k}" for k, v in bad.items()))
    if len(set(image_ids)) != n:
        seen, dup = set(), None
        for x in image_ids:
            if x in seen:
                dup = x
                break
            seen.add(x)
        raise ChxError(f"image_id {dup!r} occurs more than once; image ids must be unique in a feature store")
    bad_views = [(i, v) for i, v in zip(image_ids, views) if v not in VIEWS]
    if bad_views:
        i, v = bad_views[0]
        raise ChxError(f"image {i!r} has view {v!r}; views must be one of {', '.join(VIEWS)} "
                       f"({len(bad_views)} image(s) affected)")
    class_names = [str(c) for c in class_names]
    labels = np.asarray(labels, dtype=np.float32)
    if labels.ndim != 2 or labels.shape[1] != len(class_names):
        raise ChxError(f"labels have shape {labels.shape}, expected ({n}, {len(class_names)}) "
                       f"for {len(class_names)} class names")

    first: dict[str, int] = {}
    rank = np.empty(n, dtype=np.int64)
    for j, s in enumerate(study_ids):
        rank[j] = first.setdefault(s, len(first))
    order = np.argsort(rank, kind="stable")
    counts = np.bincount(rank, minlength=len(first))
    ptr = np.zeros(len(first) + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])

    lab = labels[order]
    sp = np.asarray(splits, dtype=object)[order]
    study_of_row = np.repeat(np.arange(len(first)), counts)
    head = ptr[:-1][study_of_row]
    a, b = lab, lab[head]
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    row_ok = same.all(axis=1) & (sp == sp[head])
    if not row_ok.all():
        r = int(np.flatnonzero(~row_ok)[0])
        what = "split" if sp[r] != sp[head[r]] else "labels"
        sid = study_ids[order[r]]
        raise ChxError(f"study {sid!r}: image {image_ids[order[r]]!r} has other {what} than image "
                       f"{image_ids[order[head[r]]]!r} of the same study; a study's images must share "
                       f"labels and split (fix the manifest)")
    return Layout(
        image_ids=[image_ids[j] for j in order], views=[views[j] for j in order],
        splits=[splits[j] for j in order], study_ids=list(first), study_ptr=ptr,
        labels=np.ascontiguousarray(lab[ptr[:-1]], dtype=np.float32))


def check_feature_shape(feature_shape) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in feature_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"feature_shape must be (C, H, W) with positive sizes, not {tuple(feature_shape)}")
    return shape


def contiguous_runs(rows: np.ndarray) -> list[tuple[int, int, int]]:
    """(start_row, stop_row, offset into rows) for each run of consecutive values in sorted rows."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    return [(int(rows[a]), int(rows[b - 1]) + 1, int(a)) for a, b in zip(starts, stops)]


class FeatureStore:
    """A chx feature store: images ordered by study (CSR), float16 feature maps, a done mask.

    Open one with :func:`chx.store.open_store` or :func:`chx.store.create_store`; the two backends
    (Zarr directory, HDF5 file) share this interface. Small metadata (ids, views, splits, labels,
    study pointers) is read once at open; features and the done mask are read on demand.
    """

    backend: str = ""
    supports_parallel_writers: bool = False

    def __init__(self, path: str, mode: str):
        self.path = str(path)
        self.mode = mode
        self._index: dict[str, int] | None = None
        self.updated_metadata: list[str] = []   # set by create_store when it refreshed views/splits/labels
        self._load_metadata()

    # --------------------------------------------------------------- backend primitives (overridden)
    def _read_attrs(self) -> dict:
        raise NotImplementedError

    def _set_attrs(self, attrs: dict) -> None:
        raise NotImplementedError

    def _read_array(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def _replace_array(self, name: str, values: np.ndarray) -> None:
        raise NotImplementedError

    def _read_slice(self, name: str, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def _write_rows(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        raise NotImplementedError

    def _read_done(self) -> np.ndarray:
        raise NotImplementedError

    def _set_done(self, rows: np.ndarray) -> None:
        raise NotImplementedError

    def bytes_on_disk(self) -> int | None:
        """Size of the whole store on disk (None where the storage is not local)."""
        raise NotImplementedError

    def feature_bytes_on_disk(self) -> int | None:
        """Stored (compressed) bytes of features (+ features_flip); None where the storage is not local."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    # ----------------------------------------------------------------------------------- metadata
    def _load_metadata(self) -> None:
        attrs = self._read_attrs()
        self._attrs = attrs
        self._class_names = [str(c) for c in attrs["class_names"]]
        self._fingerprint = dict(attrs["fingerprint"])
        self._feature_shape = tuple(int(s) for s in attrs["feature_shape"])
        self._has_flip = bool(attrs["flip"])
        self._image_ids = [str(x) for x in self._read_array("image_id").tolist()]
        self._views = [str(x) for x in self._read_array("view").tolist()]
        self._splits = [str(x) for x in self._read_array("split").tolist()]
        self._study_ids = [str(x) for x in self._read_array("study_id").tolist()]
        self._study_ptr = np.asarray(self._read_array("study_ptr"), dtype=np.int64)
        self._labels = np.asarray(self._read_array("labels"), dtype=np.float32)
        n, s = len(self._image_ids), len(self._study_ids)
        problems = []
        if not (len(self._views) == len(self._splits) == n):
            problems.append("per-image columns differ in length")
        if self._study_ptr.shape != (s + 1,) or self._study_ptr[0] != 0 or self._study_ptr[-1] != n \
                or np.any(np.diff(self._study_ptr) < 1):
            problems.append("study_ptr is not a valid CSR pointer")
        if self._labels.shape != (s, len(self._class_names)):
            problems.append(f"labels have shape {self._labels.shape}, expected ({s}, {len(self._class_names)})")
        if problems:
            raise ChxError(f"feature store {self.path} is inconsistent ({'; '.join(problems)}); {HINT_RECREATE}")

    # --------------------------------------------------------------------------------- properties
    @property
    def n_images(self) -> int:
        return len(self._image_ids)

    @property
    def n_studies(self) -> int:
        return len(self._study_ids)

    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)

    @property
    def fingerprint(self) -> dict:
        return dict(self._fingerprint)

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return self._feature_shape  # type: ignore[return-value]

    @property
    def format_version(self) -> int:
        return int(self._attrs["format_version"])

    @property
    def study_ids(self) -> list[str]:
        return self._study_ids

    @property
    def image_ids(self) -> list[str]:
        return self._image_ids

    @property
    def views(self) -> list[str]:
        return self._views

    @property
    def splits(self) -> list[str]:
        """Per image, in store order ('' = none)."""
        return self._splits

    @property
    def study_splits(self) -> list[str]:
        return [self._splits[int(p)] for p in self._study_ptr[:-1]]

    @property
    def labels(self) -> np.ndarray:
        """[n_studies, K] float32, NaN = not annotated."""
        return self._labels

    @property
    def study_ptr(self) -> np.ndarray:
        return self._study_ptr

    @property
    def has_flip(self) -> bool:
        return self._has_flip

    @property
    def nbytes_per_image(self) -> int:
        """Uncompressed bytes per image: C*H*W*2, x2 with flip."""
        return _per_image(self._feature_shape, self._has_flip)

    @property
    def writable(self) -> bool:
        return self.mode != "r"

    @property
    def done(self) -> np.ndarray:
        """Bool [n_images]: which rows hold features (read fresh: other writers may add rows)."""
        return self._read_done()

    def missing_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.done).astype(np.int64)

    @property
    def complete(self) -> bool:
        return bool(self._read_attrs().get("complete", False))

    # ------------------------------------------------------------------------------------ lookups
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

    # -------------------------------------------------------------------------------------- reads
    def read_study(self, i: int) -> StudyFeatures:
        """One study: its images' features in one contiguous read (plus one for the flipped copy)."""
        i = int(i)
        if not 0 <= i < self.n_studies:
            raise IndexError(f"study index {i} out of range 0..{self.n_studies - 1}")
        a, b = int(self._study_ptr[i]), int(self._study_ptr[i + 1])
        return StudyFeatures(
            study_id=self._study_ids[i],
            features=self._read_slice("features", a, b),
            features_flip=self._read_slice("features_flip", a, b) if self._has_flip else None,
            views=self._views[a:b], image_ids=self._image_ids[a:b],
            labels=self._labels[i].copy(), split=self._splits[a])

    def read_image(self, row: int, flip: bool = False) -> np.ndarray:
        """Features [C, H, W] float16 of one store row (the flipped copy with flip=True)."""
        row = int(row)
        if not 0 <= row < self.n_images:
            raise IndexError(f"row {row} out of range 0..{self.n_images - 1}")
        if flip and not self._has_flip:
            raise ChxError(f"feature store {self.path} has no flipped features (created without flip)")
        return self._read_slice("features_flip" if flip else "features", row, row + 1)[0]

    # ------------------------------------------------------------------------------------- writes
    def _require_writable(self, what: str) -> None:
        if not self.writable:
            raise ChxError(f"feature store {self.path} is open read-only; cannot {what} "
                           f"(open it with mode='r+')")

    def write(self, rows, features, features_flip=None) -> None:
        """Write features of store rows (cast to float16), then mark those rows done.

        Features go first and the done flags second, so a process killed in between leaves those
        images not done (they are extracted again on resume)."""
        self._require_writable("write features")
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        feats = np.asarray(features)
        shape = (len(rows), *self._feature_shape)
        if feats.shape != shape:
            raise ValueError(f"features have shape {feats.shape}, expected {shape}")
        if self._has_flip and features_flip is None:
            raise ValueError(f"feature store {self.path} holds flipped features: pass features_flip")
        if not self._has_flip and features_flip is not None:
            raise ValueError(f"feature store {self.path} was created without flip: features_flip not allowed")
        if len(rows) == 0:
            return
        if rows.min() < 0 or rows.max() >= self.n_images:
            raise IndexError(f"rows out of range 0..{self.n_images - 1}")
        order = np.argsort(rows, kind="stable")
        rows = rows[order]
        if np.any(np.diff(rows) == 0):
            raise ValueError("rows must not repeat in one write")
        self._write_rows("features", rows, feats[order].astype(FEATURE_DTYPE, copy=False))
        if features_flip is not None:
            flips = np.asarray(features_flip)
            if flips.shape != shape:
                raise ValueError(f"features_flip have shape {flips.shape}, expected {shape}")
            self._write_rows("features_flip", rows, flips[order].astype(FEATURE_DTYPE, copy=False))
        self._set_done(rows)

    def mark_complete(self) -> None:
        """Set the `complete` attribute; only when every image is done (else ChxError)."""
        self._require_writable("mark it complete")
        missing = len(self.missing_rows())
        if missing:
            raise ChxError(f"feature store {self.path} is incomplete: {missing:,} of {self.n_images:,} "
                           f"images not extracted; rerun `chx extract-features` to finish it")
        self._set_attrs({"complete": True})
        self._attrs["complete"] = True

    def _update_metadata(self, views: list[str], splits: list[str], labels: np.ndarray) -> None:
        """Refresh per-image views/splits and per-study labels (given in store order) where they changed."""
        changes = []
        if views != self._views:
            self._replace_array("view", np.asarray(views, dtype=object))
            self._views, changes = list(views), changes + ["views"]
        if splits != self._splits:
            self._replace_array("split", np.asarray(splits, dtype=object))
            self._splits, changes = list(splits), changes + ["splits"]
        if not np.array_equal(labels, self._labels, equal_nan=True):
            self._replace_array("labels", np.asarray(labels, dtype=np.float32))
            self._labels, changes = np.asarray(labels, dtype=np.float32).copy(), changes + ["labels"]
        self.updated_metadata = changes

    # ---------------------------------------------------------------------------------- reporting
    def info(self) -> dict[str, Any]:
        """Figures for `chx store info`."""
        done = int(self.done.sum())
        counts = np.diff(self._study_ptr)
        vals, freq = np.unique(counts, return_counts=True)
        on_disk = self.bytes_on_disk()
        feat_disk = self.feature_bytes_on_disk()
        uncompressed = done * self.nbytes_per_image      # features written so far, as float16
        return {
            "path": self.path, "backend": self.backend, "format_version": self.format_version,
            "images": self.n_images, "studies": self.n_studies,
            "views_per_study": {int(v): int(f) for v, f in zip(vals, freq)},
            "splits": dict(Counter(self.study_splits)), "split_images": dict(Counter(self._splits)),
            "feature_shape": list(self._feature_shape), "dtype": str(FEATURE_DTYPE), "flip": self._has_flip,
            "bytes_on_disk": on_disk, "bytes_uncompressed": uncompressed,
            "bytes_projected": projected_size(self.n_images, self._feature_shape, self._has_flip),
            "feature_bytes_on_disk": feat_disk,
            "compression_ratio": (uncompressed / feat_disk) if feat_disk and uncompressed else None,
            "fingerprint": self.fingerprint, "class_names": self.class_names,
            "done": done, "complete": self.complete,
        }

    # ---------------------------------------------------------------------------- context manager
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<FeatureStore {self.backend} {self.path!r} mode={self.mode!r} images={self.n_images} "
                f"studies={self.n_studies} shape={self._feature_shape}>")
