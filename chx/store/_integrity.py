"""Integrity of every read: stored rows read with their errors named by image, each row checked
against its bound CRC-32C (stores with integrity >= 1; NaN/inf before), and the bound checksums
writes record: a mixin of :class:`FeatureStore`."""

from __future__ import annotations

import numpy as np

from chx.errors import ChxError
from chx.store import _codec
from chx.store._common import DONE_FIELDS, HINT_REPAIR
from chx.store._shardfile import ShardFileError


class Integrity:
    """Checked reads of stored rows and the checksums that bind a shard's and a row's bytes to their place."""

    def _read_checked(self, name: str, a: int, b: int, check_rows: bool = True) -> np.ndarray:
        """Stored rows a..b-1 of `name`; a missing or undecodable object is one ChxError naming the image."""
        try:
            raw = self._read_raw(name, a, b)
        except ShardFileError as e:
            row = a if e.row is None else e.row      # the backend makes e.row a store row
            if e.missing:
                raise self._missing_error(name, int(row)) from None
            raise self._undecodable_error(name, int(row), str(e)) from None
        except ChxError:
            raise
        except Exception as e:  # zarr/h5py/codec errors of a damaged object: find the image at fault
            raise self._undecodable_error(name, self._first_bad_row(name, a, b), f"{type(e).__name__}: {e}") from None
        if self._fill_if_missing(name) and b > a:
            flat = raw.reshape(b - a, -1)
            flat = flat.view(np.uint64) if flat.shape[1] * flat.itemsize % 8 == 0 else flat.view(np.uint8)
            for r in np.flatnonzero(~flat.any(axis=1)):   # all zero bits: a real map, or a missing object?
                row = a + int(r)
                if not self._row_done(row) or self._object_missing(name, row):
                    raise self._missing_error(name, row)
        if check_rows and b > a and name in self._checked:
            self._check_rows(name, a, b, raw)
        return raw

    def _check_rows(self, name: str, a: int, b: int, raw: np.ndarray) -> None:
        """Every read of maps: each row against its bound CRC-32C (stores with integrity >= 1: a changed
        byte, a row from another place or store is one ChxError naming the image); older stores,
        which have no per-row checksums: NaN/inf in the maps, the same way."""
        if not self._integrity:
            if name != "scale":
                bad = _codec.nonfinite_rows(raw, self.dtype)
                if bad.any():
                    raise self._nonfinite_error(name, a + int(np.flatnonzero(bad)[0]))
            return
        want = self._row_crcs(a, b)[:, self._checked.index(name)]
        got = _codec.row_crc32c(self._row_bindings(name, a, b), raw)
        if not np.array_equal(want, got):
            row = a + int(np.flatnonzero(want != got)[0])
            if not self._row_done(row):          # written, but its done marker (and checksums) never was
                raise self._missing_error(name, row)
            if name != "scale" and _codec.nonfinite_rows(raw[row - a:row - a + 1], self.dtype)[0]:
                raise self._nonfinite_error(name, row)
            raise ChxError(f"feature store {self.path}: the {name} of {self._where(row)} do not match their checksum "
                           f"(changed since written, or copied from another place or store); {HINT_REPAIR} "
                           f"(`chx store verify {self.path}` lists every damaged shard)")

    def _row_crcs(self, a: int, b: int) -> np.ndarray:
        """uint32 [b - a, checked arrays]: the per-row checksums of rows a..b-1 from their shards' done
        records (cached per shard once the store is complete: then nothing rewrites them)."""
        s0, s1 = int(self.shard_of_row(a)), int(self.shard_of_row(b - 1)) + 1
        cache = self.__dict__.setdefault("_records_cache", {})
        if all(s in cache for s in range(s0, s1)):
            recs = np.stack([cache[s] for s in range(s0, s1)])
        else:
            try:
                recs = self._shard_records(s0, s1)
            except Exception as e:
                raise ChxError(f"feature store {self.path}: the done records of shards {s0}..{s1 - 1} cannot be "
                               f"read ({type(e).__name__}); {HINT_REPAIR}") from None
            if self.complete and not self.writable:
                cache.update({s0 + i: r for i, r in enumerate(recs)})
        per_row = recs[:, len(DONE_FIELDS):].reshape(-1, len(self._checked))   # rows s0*S .. s1*S-1
        return per_row[a - s0 * self.shard_images:b - s0 * self.shard_images]

    def _shard_binding(self, name: str, s: int) -> str:
        a, b = self.shard_rows(s)
        return f"{self._fp_tag}|{name}|shard {s}|{self._image_ids[a]}|{self._image_ids[b - 1]}"

    def _row_bindings(self, name: str, a: int, b: int) -> list[str]:
        return [f"{self._fp_tag}|{name}|row {r}|{self._image_ids[r]}" for r in range(a, b)]

    def _shard_crc(self, name: str, s: int, raw: np.ndarray | None) -> int:
        """The checksum of shard s of `name` as its done record holds it: bound to the shard's place
        (store fingerprint, index, image ids) in stores with integrity >= 1, plain CRC-32C before."""
        if self._integrity:
            return _codec.bound_crc32c(self._shard_binding(name, s), raw)
        return _codec.crc32c(raw)

    def _row_done(self, row: int) -> bool:
        return bool(self._shard_done_mask()[self.shard_of_row(row)]) if self.is_sharded \
            else bool(self.complete or self._done_units()[row])

    def _where(self, row: int) -> str:
        return f"image {self._image_ids[row]!r} (row {row}, shard {int(self.shard_of_row(row))})"

    def _missing_error(self, name: str, row: int) -> ChxError:
        if not self._row_done(row):
            return ChxError(f"feature store {self.path}: {self._where(row)} is not extracted yet; finish the "
                            f"store with `chx extract-features` (rerun the same command)")
        return ChxError(f"feature store {self.path}: the {name} of {self._where(row)} are missing"
                        f"{' although the store is marked complete' if self.complete else ''}; {HINT_REPAIR}")

    def _undecodable_error(self, name: str, row: int, reason: str) -> ChxError:
        reason = " ".join(reason.split())[:200]
        return ChxError(f"feature store {self.path}: the {name} of {self._where(row)} cannot be read ({reason}); "
                        f"{HINT_REPAIR} (`chx store verify {self.path}` lists every damaged shard)")

    def _nonfinite_error(self, name: str, row: int) -> ChxError:
        return ChxError(f"feature store {self.path}: the {name} of {self._where(row)} hold NaN or inf; {HINT_REPAIR} "
                        f"(`chx store verify {self.path}` lists every damaged shard)")

    def _first_bad_row(self, name: str, a: int, b: int) -> int:
        for r in range(a, b):
            try:
                self._read_raw(name, r, r + 1)
            except Exception:
                return r
        return a
