"""Writing a feature store: whole shards with their done records, the in-flight journal of
single-writer backends, done marks, metadata refreshes and the reopen check of create_store: a
mixin of :class:`FeatureStore`."""

from __future__ import annotations

import numpy as np

from chx.errors import ChxError
from chx.store import _codec, _report
from chx.store._common import DONE_FIELDS, examples, is_disk_full
from chx.store._layout import StoreSpec, fingerprint_diff


class Writing:
    """Writes (format 2: whole shards; format 1: any rows), done marks and the resume check."""

    def _require_writable(self, what: str) -> None:
        if not self.writable:
            raise ChxError(f"feature store {self.path} is open read-only; cannot {what} "
                           f"(open it with mode='r+')")

    def _check_maps(self, n: int, features, features_flip) -> tuple[np.ndarray, np.ndarray | None]:
        feats = np.asarray(features)
        shape = (n, *self._feature_shape)
        if feats.shape != shape:
            raise ValueError(f"features have shape {feats.shape}, expected {shape}")
        if self._has_flip and features_flip is None:
            raise ValueError(f"feature store {self.path} holds flipped features: pass features_flip")
        if not self._has_flip and features_flip is not None:
            raise ValueError(f"feature store {self.path} was created without flip: features_flip not allowed")
        flips = None if features_flip is None else np.asarray(features_flip)
        if flips is not None and flips.shape != shape:
            raise ValueError(f"features_flip have shape {flips.shape}, expected {shape}")
        return feats, flips

    def write(self, rows, features, features_flip=None) -> None:
        """Write maps [len(rows), C, H, W] (any float dtype) of store rows, then mark them done.

        Format 1: any rows; maps go first and the done flags second, so a process killed in between
        leaves those images not done (extracted again on resume). Format 2 (sharded): the rows must
        be whole shards (each is passed to :meth:`write_shard`); a part of a shard is refused, since
        writing it would mean a read-modify-write of the shard object."""
        self._require_writable("write features")
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        feats, flips = self._check_maps(len(rows), features, features_flip)
        if len(rows) == 0:
            return
        if rows.min() < 0 or rows.max() >= self.n_images:
            raise IndexError(f"rows out of range 0..{self.n_images - 1}")
        order = np.argsort(rows, kind="stable")
        rows = rows[order]
        if np.any(np.diff(rows) == 0):
            raise ValueError("rows must not repeat in one write")
        if self.is_sharded:
            shards, counts = np.unique(self.shard_of_row(rows), return_counts=True)
            for s, k in zip(shards, counts):    # all checked before anything is written
                a, b = self.shard_rows(s)
                if k != b - a:
                    raise ValueError(f"feature store {self.path} is sharded ({self.shard_images} images per "
                                     f"shard): rows {a}..{b - 1} (shard {s}) must be written together, got "
                                     f"{k} of them; buffer a shard's images (ShardBuffer) and call write_shard")
            for s in shards:
                a, b = self.shard_rows(s)
                sel = order[(rows >= a) & (rows < b)]
                self.write_shard(int(s), feats[sel], None if flips is None else flips[sel])
            return
        self._write_rows("features", rows, self._encode(feats[order], rows)[0])
        if flips is not None:
            self._write_rows("features_flip", rows, self._encode(flips[order], rows)[0])
        self._set_done(rows)

    def write_shard(self, s: int, features, features_flip=None) -> None:
        """Write all maps [rows of shard s, C, H, W] (any float dtype; encoded to the store's dtype) of
        shard s at once, then mark it done with its checksums.

        The done marker is removed first and written last, so a writer killed mid-shard leaves the
        shard not done (it is redone on resume); each object is written whole under a temp name and
        renamed (Zarr, local), replaced whole (Zarr through zarr: the old object is deleted first) or
        written into its rows (HDF5), never read back and patched."""
        self._require_writable("write features")
        a, b = self.shard_rows(s)
        feats, flips = self._check_maps(b - a, features, features_flip)
        if not self.is_sharded:
            self.write(np.arange(a, b), feats, flips)
            return
        rows = np.arange(a, b)
        raw, scale = self._encode(feats, rows)
        raw_flip, scale_flip = self._encode(flips, rows) if flips is not None else (None, None)
        scales = None if scale is None else np.stack([scale] + ([scale_flip] if flips is not None else []), axis=1)
        arrays = {"features": raw, "features_flip": raw_flip, "scale": scales}
        head = [1] + [self._shard_crc(name, s, arrays[name]) for name in DONE_FIELDS[1:]]
        rows_crc = np.zeros((self.shard_images if self._integrity else 0, len(self._checked)), dtype=np.uint32)
        for col, name in enumerate(self._checked if self._integrity else ()):
            rows_crc[:b - a, col] = _codec.row_crc32c(self._row_bindings(name, a, b), arrays[name])
        record = np.concatenate([np.asarray(head, dtype=np.uint32), rows_crc.reshape(-1)])[None]
        try:
            self._begin_shard(s)
            self._clear_done(np.array([s]))
            for name in self._checked:
                self._write_shard_raw(name, s, arrays[name])
            self._flush()                      # the data is on disk (or its error raised) before the done marker
            self._set_done(np.array([s]), record)
            self._end_shard(s)
        except OSError as e:
            if not is_disk_full(e):
                raise
            raise ChxError(f"feature store {self.path}: disk full while writing shard {s} (images "
                           f"{self._image_ids[a]!r}..{self._image_ids[b - 1]!r}): {' '.join(str(e).split())[:120]}; "
                           f"free space and rerun the same command: shards written before are kept, this one is "
                           f"checked and redone") from None

    def _encode(self, maps: np.ndarray, rows: np.ndarray):
        if self.dtype != "float8":        # float8's encode finds them itself (it cannot scale them)
            bad = _codec.nonfinite_rows(maps, "float16") if maps.dtype == np.float16 \
                else ~np.isfinite(maps.reshape(len(maps), -1)).all(axis=1)      # float16: from the bits, 3x faster
            if bad.any():
                raise ChxError(f"feature store {self.path}: the maps of image "
                               f"{self._image_ids[int(rows[int(np.flatnonzero(bad)[0])])]!r} hold NaN or inf; a store "
                               f"never keeps them: check the backbone checkpoint (its weights, or --precision)")
        try:
            return _codec.encode(maps, self.dtype)
        except _codec.NonFiniteError as e:
            raise ChxError(f"feature store {self.path}: the maps of image {self._image_ids[int(rows[e.index])]!r} "
                           f"hold NaN or inf, which {self.dtype} cannot store; check the backbone checkpoint, "
                           f"or create the store with --dtype float16") from None

    def _flush(self) -> None:
        """Push written data to the storage (backend; a no-op where each write is already whole)."""

    def _journal(self) -> bool:
        """Single-writer backends (HDF5) write a shard in place: they note it as in flight first."""
        return self.is_sharded and not self.supports_parallel_writers

    def _begin_shard(self, s: int) -> None:
        if self._journal():
            self._set_attrs({"in_flight": [int(s)]})

    def _end_shard(self, s: int) -> None:
        if self._journal():
            self._set_attrs({"in_flight": []})

    def _recover_in_flight(self) -> None:
        """A writer that died mid-shard (a crash, a full disk) left the shard noted in flight: trust
        its done marker only when the shard's data match its checksums, else mark it not done, so
        the next extraction redoes it (opening for writing does this)."""
        if not self._journal():
            return
        pending = self._read_attrs().get("in_flight") or []
        for s in pending:
            s = int(s)
            if 0 <= s < self.n_shards and self._shard_done_mask()[s] and _report.shard_problems(self, s):
                self.mark_shards_missing([s])
        if pending:
            self._set_attrs({"in_flight": []})

    def mark_shards_missing(self, shards) -> None:
        """Forget that these shards are done (and that the store is complete), so the next
        extraction rewrites them: what ``--repair`` does with :attr:`VerifyReport.bad_shards`."""
        self._require_writable("mark shards missing")
        shards = np.unique(np.asarray(shards, dtype=np.int64).reshape(-1))
        if len(shards) == 0:
            return
        if shards.min() < 0 or shards.max() >= self.n_shards:
            raise IndexError(f"shards out of range 0..{self.n_shards - 1}")
        if self.complete:
            self._set_attrs({"complete": False})
            self._attrs["complete"] = False
        units = shards if self.is_sharded else np.concatenate([np.arange(*self.shard_rows(s)) for s in shards])
        self._clear_done(units)

    def mark_complete(self) -> None:
        """Set the `complete` attribute; only when every shard is done (else ChxError)."""
        self._require_writable("mark it complete")
        missing = len(self.missing_rows())
        if missing:
            raise ChxError(f"feature store {self.path} is incomplete: {missing:,} of {self.n_images:,} "
                           f"images not extracted; rerun `chx extract-features` to finish it")
        self._set_attrs({"complete": True})
        self._attrs["complete"] = True

    def _update_metadata(self, views: list[str], splits: list[str], labels: np.ndarray) -> None:
        """Refresh per-image views/splits and per-study labels (given in store order) where they changed
        (or failed their checksum at open), then their checksums."""
        changes, stale = [], set(self._stale_meta)
        if views != self._views or "view" in stale:
            self._replace_array("view", np.asarray(views, dtype=object))
            self._views, changes = list(views), changes + ["views"]
        if splits != self._splits or "split" in stale:
            self._replace_array("split", np.asarray(splits, dtype=object))
            self._splits, changes = list(splits), changes + ["splits"]
        if not np.array_equal(labels, self._labels, equal_nan=True) or "labels" in stale:
            self._replace_array("labels", np.asarray(labels, dtype=np.float32))
            self._labels, changes = np.asarray(labels, dtype=np.float32).copy(), changes + ["labels"]
        if changes:
            self._store_meta_crc()
        self._stale_meta = []
        self.updated_metadata = changes

    def _reopen(self, spec: StoreSpec) -> "Writing":
        """Check this (existing) store against what a create_store call asks for (its spec: images in
        store order, their studies, fingerprint, shape, dtype, classes, and the layout options the
        caller set, ``spec.pinned``); on a match refresh views/splits/labels from the spec and return
        self, else ChxError listing every difference. A format-1 store matches only a spec that asks
        for format 1 (``pinned``; tests of older stores): chx reads format 1 but writes format 2."""
        lay, diffs = spec.layout, []
        if not self.is_sharded and "format_version" not in spec.pinned:   # format 1 is read, not written
            diffs.append(f"format 1 in the store (one object per image: an older layout, read but no longer "
                         f"written) vs format {spec.format_version} now")
        fd = fingerprint_diff(self.fingerprint, spec.fingerprint)
        if fd:
            diffs.append("fingerprint field(s) differ: " + "; ".join(fd))
        if self.feature_shape != spec.feature_shape:
            diffs.append(f"feature shape {self.feature_shape} in the store vs {spec.feature_shape} now")
        if self.has_flip != spec.flip:
            diffs.append(f"flip={self.has_flip} in the store vs flip={spec.flip} now")
        if self.dtype != spec.dtype:
            diffs.append(f"dtype {self.dtype} in the store vs {spec.dtype} now")
        for key, have in (("format_version", self.format_version), ("shard_images", self.shard_images)):
            if key in spec.pinned and getattr(spec, key) != have:
                diffs.append(f"{key} {have} in the store vs {getattr(spec, key)} now")
        if self.class_names != spec.class_names:
            a, b = self.class_names, spec.class_names
            pos = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            diffs.append(f"class list differs ({len(a)} classes in the store vs {len(b)} now; first difference "
                         f"at position {pos}: {a[pos] if pos < len(a) else '<none>'!r} vs "
                         f"{b[pos] if pos < len(b) else '<none>'!r})")
        have, want = set(self.image_ids), set(lay.image_ids)
        rows = None
        if have != want:
            only_store, only_new = have - want, want - have
            parts = []
            if only_store:
                parts.append(f"{len(only_store):,} only in the store (e.g. {examples(only_store)})")
            if only_new:
                parts.append(f"{len(only_new):,} not in the store (e.g. {examples(only_new)})")
            diffs.append(f"images differ: {'; '.join(parts)}")
        else:
            rows = self.image_index(lay.image_ids)              # spec order -> store rows
            stored_study = np.repeat(np.asarray(self.study_ids, dtype=object), np.diff(self.study_ptr))
            new_study = np.repeat(np.asarray(lay.study_ids, dtype=object), np.diff(lay.study_ptr))
            moved = [lay.image_ids[j] for j in np.flatnonzero(stored_study[rows] != new_study)]
            if moved:
                diffs.append(f"images differ: {len(moved):,} belong to another study now (e.g. {examples(moved)})")
        if diffs:
            raise ChxError(f"feature store {self.path} was made differently: {' | '.join(diffs)}; "
                           f"use --overwrite to replace it (or choose another store path)")
        # Same images and studies: bring views/splits/labels to store order and refresh any that changed.
        new_views, new_splits = [""] * self.n_images, [""] * self.n_images
        for r, v, sp in zip(rows, lay.views, lay.splits):
            new_views[r], new_splits[r] = v, sp
        study_row = {sid: i for i, sid in enumerate(self.study_ids)}
        new_labels = np.empty_like(self.labels)
        for j, sid in enumerate(lay.study_ids):
            new_labels[study_row[sid]] = lay.labels[j]
        self._update_metadata(new_views, new_splits, new_labels)
        return self
