"""Turn batches of rows into whole-shard writes: what extraction needs between its DataLoader and the store."""

from __future__ import annotations

import numpy as np


class ShardBuffer:
    """Collects the maps of a writer's shards from batches of rows (any batch size, any order) and
    hands each shard to ``write`` (default ``store.write_shard``) as soon as all its rows are in.

    Memory: the maps of the shards still incomplete - one shard (+ one batch) when rows arrive in
    store order, as extraction's DataLoader delivers them - plus those ``write`` still holds
    (extraction's writer thread: up to 2 queued). A shard whose rows never all arrive
    (the process stops) is never written, so it stays missing and is redone by the next run.
    """

    def __init__(self, store, shards, write=None):
        """``write(shard, maps, flips)``: how a complete shard is written (default ``store.write_shard``;
        extraction queues it to a writer thread)."""
        self.store = store
        self._write = write or store.write_shard
        self._owned = {int(s) for s in np.asarray(shards, dtype=np.int64).reshape(-1)}
        self._open: dict[int, tuple[np.ndarray, np.ndarray | None, np.ndarray]] = {}   # maps, flips, filled

    def add(self, rows, features, features_flip=None) -> list[int]:
        """Buffer maps [len(rows), C, H, W] of store rows; returns the shards this call wrote (handed
        to ``write``)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        feats = np.asarray(features)
        flips = None if features_flip is None else np.asarray(features_flip)
        shards = self.store.shard_of_row(rows)
        foreign = sorted(set(shards.tolist()) - self._owned)
        if foreign:
            raise ValueError(f"rows of shard(s) {foreign[:3]} are not this writer's "
                             f"(it owns {len(self._owned)} shards not yet written)")
        written = []
        for s in np.unique(shards):
            sel = np.flatnonzero(shards == s)
            buf_maps, buf_flips, filled = self._buffer(int(s), feats, flips)
            local = rows[sel] - self.store.shard_rows(s)[0]
            if filled[local].any() or len(np.unique(local)) != len(local):
                raise ValueError(f"rows of shard {s} arrived twice")
            if (sel[-1] - sel[0] == len(sel) - 1 and local[-1] - local[0] == len(local) - 1
                    and (len(local) < 2 or bool((np.diff(local) == 1).all()))):
                # rows in store order (what extraction's loader delivers): one plain copy, where indexing
                # copied twice (2.4 ms an image of 768 x 32 x 32 on this CPU, more than the disk write)
                sel, local = slice(sel[0], sel[-1] + 1), slice(local[0], local[-1] + 1)
            buf_maps[local] = feats[sel]
            if buf_flips is not None:
                buf_flips[local] = flips[sel]
            filled[local] = True
            if filled.all():
                self._write(int(s), buf_maps, buf_flips)
                del self._open[int(s)]
                self._owned.discard(int(s))
                written.append(int(s))
        return written

    def _buffer(self, s: int, feats: np.ndarray, flips: np.ndarray | None):
        if s not in self._open:
            a, b = self.store.shard_rows(s)
            shape = (b - a, *feats.shape[1:])
            self._open[s] = (np.empty(shape, feats.dtype), None if flips is None else np.empty(shape, flips.dtype),
                             np.zeros(b - a, dtype=bool))
        return self._open[s]
