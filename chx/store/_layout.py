"""What a store holds and is made from: the study layout (images sorted by study, CSR), the
:class:`StoreSpec` of a new store, the format constants and the fingerprint helpers."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from chx.data.views import VIEWS
from chx.errors import ChxError
from chx.store import _codec

FORMAT_VERSION = 2                      # the layout new stores get; 1 is still read and written
LEGACY_SHARD_IMAGES = 64                # format 1 has no shards: blocks of 64 rows stand in for them
MARKER = "chx_feature_store"            # attribute that proves a store is chx's (format 2)
DONE_HEAD = 4                           # a done record's flag + 3 shard checksums (chx.store._common.DONE_FIELDS)


def normalise_fingerprint(fingerprint: dict) -> dict:
    """The fingerprint as it comes back from JSON (tuples -> lists), so stored and given compare equal."""
    if not isinstance(fingerprint, dict):
        raise TypeError(f"fingerprint must be a dict, not {type(fingerprint).__name__}")
    try:
        return json.loads(json.dumps(fingerprint, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise TypeError(f"fingerprint must be JSON-serialisable: {e}") from None


def precision_option(name: str | None) -> str:
    """The `extract-features --precision` that made maps of a fingerprint's "precision" (absent: fp32,
    as in stores made before the option)."""
    return {"bfloat16": "bf16", "float16": "fp16"}.get(name, "fp32")


def fingerprint_diff(stored: dict, given: dict) -> list[str]:
    """'field: stored -> given' for every field that differs (missing fields shown as <absent>)."""
    out = []
    for k in sorted(set(stored) | set(given)):
        a, b = stored.get(k, "<absent>"), given.get(k, "<absent>")
        if a != b:
            out.append(f"{k}: {a!r} in the store vs {b!r} now")
            if k == "precision":
                out[-1] += f" (to continue this store, extract with --precision {precision_option(stored.get(k))})"
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

    def meta_arrays(self) -> dict:
        """The metadata arrays by their store names (what ``meta_crc`` covers)."""
        return {"study_ptr": self.study_ptr, "image_id": self.image_ids, "view": self.views, "split": self.splits,
                "study_id": self.study_ids, "labels": self.labels}


@dataclass
class StoreSpec:
    """Everything a new store is made from (and a reopened one is checked against)."""

    layout: Layout
    class_names: list[str]
    feature_shape: tuple[int, int, int]
    fingerprint: dict
    flip: bool
    dtype: str = "float16"
    compress: bool = False
    format_version: int = FORMAT_VERSION
    shard_images: int = LEGACY_SHARD_IMAGES   # images per shard (format 2); unused by format 1
    integrity: int = field(default_factory=lambda: _codec.INTEGRITY)   # 0: as stores were before issue 26
    pinned: tuple[str, ...] = ()          # layout options the caller set ("format_version", "shard_images"):
                                          # a reopened store must have them as asked

    @property
    def n_shards(self) -> int:
        return math.ceil(self.layout.n_images / self.shard_images)

    @property
    def feature_arrays(self) -> list[str]:
        return ["features"] + (["features_flip"] if self.flip else [])

    @property
    def checked_arrays(self) -> list[str]:
        """The arrays of a shard with a per-row checksum (the columns of ``row_crc``, format 2)."""
        return self.feature_arrays + (["scale"] if _codec.has_scale(self.dtype) else [])

    @property
    def done_record_width(self) -> int:
        """uint32 fields of a shard's done record (format 2): the flag and 3 shard checksums
        (``DONE_FIELDS``), then the bound checksum of each row and checked array ([S, arrays], C order)."""
        return DONE_HEAD + (self.shard_images * len(self.checked_arrays) if self.integrity >= 1 else 0)

    def attrs(self) -> dict:
        """The store's attributes; creation writes them last (format_version among them)."""
        a = {"class_names": self.class_names, "fingerprint": self.fingerprint,
             "feature_shape": list(self.feature_shape), "flip": bool(self.flip), "complete": False}
        if self.format_version >= 2:
            a.update({MARKER: True, "dtype": self.dtype, "shard_images": int(self.shard_images),
                      "checksum": _codec.CHECKSUM})
            if self.integrity >= 1:
                a.update({"integrity": self.integrity,
                          "meta_crc": {k: _codec.meta_crc32c(v) for k, v in self.layout.meta_arrays().items()}})
        a["format_version"] = self.format_version
        return a


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
