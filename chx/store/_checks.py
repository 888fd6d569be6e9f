"""Open-time checks of a feature store (attributes, array shapes and dtypes, metadata and its
checksums) and the completeness check every reader asks for: a mixin of :class:`FeatureStore`."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np

from chx.errors import ChxError
from chx.store import _codec
from chx.store._common import DONE_FIELDS, HINT_RECREATE, HINT_REPAIR, META_ARRAYS, REFRESHABLE, REQUIRED_ATTRS
from chx.store._layout import FORMAT_VERSION, MARKER


class OpenChecks:
    """Checks run once when a store is opened (a damaged or foreign store is one ChxError), and
    :meth:`require_complete`."""

    def _check_attrs(self, attrs: dict) -> dict:
        version = attrs.get("format_version")
        if version is not None:
            try:
                version = int(version)
            except (TypeError, ValueError):
                raise ChxError(f"feature store {self.path} has an unreadable format_version {version!r}; "
                               f"{HINT_RECREATE}") from None
            if version > FORMAT_VERSION:
                raise ChxError(f"feature store {self.path} has format version {version}, newer than this "
                               f"chx reads ({FORMAT_VERSION}); upgrade chx")
            if version < 1:
                raise ChxError(f"feature store {self.path} has format version {version}; {HINT_RECREATE}")
        need = REQUIRED_ATTRS[version if version is not None else (2 if MARKER in attrs else 1)]
        missing = [a for a in need if a not in attrs]
        if missing:
            raise ChxError(f"{self.path} is not a chx feature store, or its creation was interrupted "
                           f"(attribute(s) {', '.join(missing)} missing); {HINT_RECREATE}")
        if version >= 2 and attrs["dtype"] not in _codec.DTYPES:
            raise ChxError(f"feature store {self.path} has dtype {attrs['dtype']!r}, which this chx does not "
                           f"read ({', '.join(_codec.DTYPES)}); upgrade chx")
        return attrs

    def _array_names(self) -> list[str]:
        names = ["features"] + (["features_flip"] if self._attrs.get("flip") else [])
        if self.is_sharded and _codec.has_scale(self._attrs["dtype"]):
            names += ["scale"]
        return names + [self._done_array] + list(META_ARRAYS)

    def _check_arrays(self) -> None:
        n = self._array_shape("image_id")[0] if self._array_shape("image_id") else 0
        shape = tuple(int(s) for s in self._attrs["feature_shape"])
        dtype = self._attrs.get("dtype", "float16")
        expect = {"features": (n, *shape), "features_flip": (n, *shape), "view": (n,), "split": (n,)}
        if self.is_sharded:
            s = int(self._attrs["shard_images"])
            if s < 1:
                raise ChxError(f"feature store {self.path} is damaged: shard_images={s}; {HINT_RECREATE}")
            checked = 1 + int(bool(self._attrs["flip"])) + int(_codec.has_scale(dtype))
            rows = s * checked if int(self._attrs.get("integrity", 0)) >= 1 else 0   # per-row checksums
            expect["shard_done"] = (math.ceil(n / s), len(DONE_FIELDS) + rows)
            expect["scale"] = (n, 1 + int(bool(self._attrs["flip"])), shape[0])
        else:
            expect["done"] = (n,)
        for name in self._array_names():
            have = self._array_shape(name)
            if name in expect and have != expect[name]:
                raise ChxError(f"feature store {self.path} is damaged: {name} has shape {have}, expected "
                               f"{expect[name]}; {HINT_RECREATE}")
        for name in ("features", "features_flip"):
            if name in self._array_names() and self._array_dtype(name) != _codec.STORED_NUMPY[dtype]:
                raise ChxError(f"feature store {self.path} is damaged: {name} is stored as {self._array_dtype(name)}, "
                               f"not {_codec.STORED_NUMPY[dtype]} ({dtype}); {HINT_RECREATE}")

    def _load_metadata(self) -> None:
        attrs = self._attrs
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
        self._integrity = int(attrs.get("integrity", 0)) if self.is_sharded else 0
        fp = json.dumps(self._fingerprint, sort_keys=True).encode("utf-8")
        self._fp_tag = hashlib.sha256(fp).hexdigest()[:16]     # what every bound checksum starts from
        self._checked = ["features"] + (["features_flip"] if self._has_flip else []) \
            + (["scale"] if _codec.has_scale(self.dtype) else [])

    def _meta_values(self) -> dict:
        return {"study_ptr": self._study_ptr, "image_id": self._image_ids, "view": self._views,
                "split": self._splits, "study_id": self._study_ids, "labels": self._labels}

    def _check_meta(self, refresh: bool) -> None:
        """Stores with integrity >= 1: every metadata array against its checksum (``meta_crc``), so a
        lost object (read back as fill values) or a changed one is refused, never used."""
        if not self._integrity:
            return
        stored = self._attrs.get("meta_crc")
        stored = stored if isinstance(stored, dict) else {}
        for name, values in self._meta_values().items():
            if stored.get(name) == _codec.meta_crc32c(values):
                continue
            if refresh and name in REFRESHABLE:
                self._stale_meta.append(name)       # _reopen rewrites it from the manifest
                continue
            fix = (f"rerun `chx extract-features` (the same command) to rewrite it from the manifest, or "
                   f"{HINT_RECREATE}") if name in REFRESHABLE else HINT_RECREATE
            raise ChxError(f"feature store {self.path}: its {name} array does not match its checksum (an object "
                           f"of it is missing, or it was changed since it was written); {fix}")

    def _store_meta_crc(self) -> None:
        if self._integrity:
            crc = {k: _codec.meta_crc32c(v) for k, v in self._meta_values().items()}
            self._set_attrs({"meta_crc": crc})
            self._attrs["meta_crc"] = crc

    def require_complete(self) -> None:
        """ChxError (one line) unless the store is complete and, where the backend can tell cheaply
        (Zarr format 2: one listing per array), every shard object of it exists."""
        if not self.complete:
            missing = self.missing_shards()
            rows = sum(b - a for a, b in map(self.shard_rows, missing))
            raise ChxError(f"feature store {self.path} is incomplete: {rows:,} of {self.n_images:,} images "
                           f"({len(missing):,} of {self.n_shards:,} shards) not extracted; finish it with "
                           f"`chx extract-features` (rerun the same command)")
        gone = self.shards_without_objects().tolist()
        if gone:
            a, _ = self.shard_rows(gone[0])
            raise ChxError(f"feature store {self.path} is marked complete but the objects of {len(gone):,} shard(s) "
                           f"are missing (shard {gone[0]}, from image {self._image_ids[a]!r}"
                           f"{', ...' if len(gone) > 1 else ''}); {HINT_REPAIR}")

    def shards_without_objects(self) -> np.ndarray:
        """int64 shards with a map object missing, from one listing per array (Zarr format 2; empty
        where the backend cannot tell cheaply: there, reads and :meth:`verify` find them). The quick
        check for ``--repair``; :meth:`verify` also finds truncated and changed objects."""
        return np.asarray(sorted({int(s) for v in self._missing_objects().values() for s in v}), dtype=np.int64)
