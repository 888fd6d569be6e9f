"""Atomic file writes: write to a temp name beside the target, then rename over it; and THE rule for
replacing an existing output (:func:`check_output`).

A reader (or a crashed run) never sees a half-written file under the real name. The temp file gets
the permissions a plain ``open()`` would (0666 minus the umask), not mkstemp's private 0600. Temp
names carry the writer's pid (``.NAME.tmp-PID-...``): the next write to the same target removes
those of dead processes (a kill -9 leaves no lasting debris).

The overwrite rule, one for every command that writes an output (``-o``): an output that exists is
replaced only with ``--overwrite`` and only when it is provably an output of that command's own
kind; anything else is refused by name, even with ``--overwrite``:

- a folder output (report, explanation, hf/onnx export, demo) is chx's when it holds the marker
  ``.chx-output.json`` naming its kind and no file the marker does not list (chx writes the marker
  into every such folder); an empty folder is replaced without ``--overwrite``;
- a file output (bundle, checkpoint, predictions, manifest, comparison table) is chx's when its
  content is of that kind: a chx checkpoint of the right kind (a bundle for export, a model for
  import-reference), a table with chx's id columns, a comparison table. Never a folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from chx.errors import ChxError

MARKER = ".chx-output.json"
# Every kind of output a command writes: (its name in messages, is it a folder).
OUTPUT_KINDS = {
    "report": ("report folder", True),                  # chx evaluate
    "explain": ("explanation folder", True),            # chx explain, chx predict --explain
    "export-hf": ("Hugging Face export folder", True),  # chx export --format hf
    "export-onnx": ("ONNX export folder", True),        # chx export --format onnx
    "ensemble": ("ensemble bundle", True),              # chx ensemble
    "demo": ("demo folder", True),                      # chx demo
    "bundle": ("chx bundle", False),                    # chx export --format bundle
    "checkpoint": ("chx checkpoint", False),            # chx import-reference
    "predictions": ("predictions table", False),        # chx predict
    "manifest": ("chx manifest", False),                # chx prepare
    "comparison": ("comparison table", False),          # chx compare -o (and its .json)
}
# The first column of every table chx predict writes (csv/json/parquet, CXR-LT submissions).
PREDICTION_KEYS = ("study_id", "dicom_id", "ImageID")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------- JSON

def json_safe(obj):
    """Plain JSON values: numpy scalars/arrays -> numbers/lists, NaN and inf -> None, Paths -> str."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def json_text(obj, **kwargs) -> str:
    """Valid JSON (never a bare NaN/Infinity): non-finite numbers become null."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


# ----------------------------------------------------------------------------------------- temp names

def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:   # EPERM: someone else's live process
        return True
    return True


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{os.getpid()}-"


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Remove the temp files/folders of ``path`` (``.NAME.tmp-PID-...``) whose writer is dead."""
    path = Path(path)
    head = f".{path.name}.tmp-"
    try:
        found = list(path.parent.glob(glob.escape(head) + "*"))
    except OSError:
        return
    for p in found:
        pid = p.name[len(head):].split("-", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


# ----------------------------------------------------------------------------------------- the overwrite rule

def _names(folder: Path) -> set[str]:
    """Files under ``folder`` (relative, posix), the marker left out."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if not p.is_dir() or p.is_symlink()} - {MARKER}


def _listing(names, limit: int = 3) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _read_marker(folder: Path) -> dict | None:
    try:
        doc = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("kind"), str) else None


def write_marker(folder: str | os.PathLike, kind: str, files: list[str] | None = None) -> None:
    """Mark ``folder`` as an output of ``kind`` made by chx; ``files``: the files it owns there
    (None: everything under it is its own, e.g. the demo folder)."""
    import chx

    doc = {"chx_output": kind, "kind": kind, "chx_version": chx.__version__,
           "files": sorted(files) if files is not None else None}
    (Path(folder) / MARKER).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def _folder_reason(path: Path, kind: str, legacy) -> str | None:
    """Why the existing folder ``path`` is not chx's output of ``kind`` (None: it is, or it is empty)."""
    names = _names(path)
    marker = _read_marker(path)
    if marker is None:
        if not names and not (path / MARKER).exists():
            return None
        if legacy is not None and legacy(path):
            return None
        if {"last.pt", "best.pt", "metrics.jsonl"} & names:
            return "it is a training run folder"
        if {"zarr.json", ".zgroup", ".zattrs"} & names:
            return "it is a feature store"
        return f"it holds files chx did not write there: {_listing(names)}"
    if marker["kind"] != kind:
        other = OUTPUT_KINDS.get(marker["kind"], (marker["kind"],))[0]
        return f"it is {_a(other)} chx wrote"
    own = marker.get("files")
    extra = names - set(own) if isinstance(own, list) else set()
    if extra:
        return f"it holds files chx did not write there: {_listing(extra)}"
    return None


def _checkpoint_kind(path: Path) -> str | None:
    try:
        import torch

        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:   # not a torch zip, damaged, foreign objects
        return None
    if isinstance(ckpt, dict) and str(ckpt.get("format", "")).startswith("chx-checkpoint"):
        return str(ckpt.get("kind"))
    return None


def _table_columns(path: Path) -> list[str] | None:
    """The column names of a csv/parquet/json table file (None: not a table)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import polars as pl

            return list(pl.read_parquet_schema(path))
        if suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                return None
            return list(rows[0]) if rows else list(PREDICTION_KEYS[:1])
        with open(path, encoding="utf-8") as f:
            head = f.readline(1 << 16)
        import csv

        return next(csv.reader([head]), None)
    except (OSError, ValueError, UnicodeDecodeError, Exception):
        return None


def _file_reason(path: Path, kind: str) -> str | None:
    """Why the existing file ``path`` is not chx's output of ``kind`` (None: it is)."""
    what = OUTPUT_KINDS[kind][0]
    if kind in ("bundle", "checkpoint"):
        found = _checkpoint_kind(path)
        if found is None:
            return "it is not a chx checkpoint"
        if (found == "bundle") != (kind == "bundle"):
            return f"it is a {found} checkpoint, not a {'bundle' if kind == 'bundle' else 'model checkpoint'}"
        return None
    if kind == "comparison":
        if path.suffix.lower() == ".json":
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError, UnicodeDecodeError):
                doc = None
            ok = isinstance(doc, dict) and all(isinstance(v, dict) and "n_studies" in v for v in doc.values())
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    ok = "| method | studies | mAP |" in f.read(1 << 16)
            except (OSError, UnicodeDecodeError):
                ok = False
        return None if ok else f"its content is not a {what}"
    columns = _table_columns(path)
    if kind == "predictions":
        ok = bool(columns) and columns[0] in PREDICTION_KEYS
    elif kind == "manifest":
        from chx.data.manifest import ID_COLUMNS

        ok = bool(columns) and set(ID_COLUMNS) <= set(columns)
    else:
        raise ValueError(f"unknown output kind {kind!r}")
    return None if ok else f"its content is not a {what}"


def _a(what: str) -> str:
    return f"{'an' if what[0] in 'aeiou' or what.startswith('ONNX') else 'a'} {what}"


def _refusal(path: Path, what: str, reason: str, option: str) -> ChxError:
    return ChxError(f"{path} exists and is not {_a(what)} chx wrote ({reason}); refusing to replace it, even "
                    f"with --overwrite: choose another {option} (or delete it yourself if it is yours)")


def check_output(path: str | os.PathLike, kind: str, overwrite: bool, *, option: str = "-o", why: str = "",
                 legacy=None) -> None:
    """THE overwrite rule (see the module doc): return when ``path`` may be written as an output of
    ``kind``, else raise a one-line :class:`ChxError` naming it. ``legacy``: a predicate accepting a
    folder of this kind written before chx marked its outputs."""
    path = Path(path)
    what, folder = OUTPUT_KINDS[kind]
    if not path.exists():
        return
    if folder and not path.is_dir():
        reason = "it is a file"
    elif not folder and path.is_dir():
        reason = "it is a folder"
    else:
        reason = _folder_reason(path, kind, legacy) if folder else _file_reason(path, kind)
    if reason:
        raise _refusal(path, what, reason, option)
    if folder and not any(path.iterdir()):
        return   # an empty folder: nothing to lose
    if not overwrite:
        raise ChxError(f"{path} exists and already holds {_a(what)}; {why + ': ' if why else ''}use --overwrite "
                       f"to replace it or choose another {option}")


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, kind: str, *, option: str = "-o"):
    """Hold an exclusive lock on the output ``path`` of ``kind`` (a ``.NAME.lock`` file beside it,
    removed on exit): a second chx process writing the same output fails at once with one line
    instead of silently replacing the first one's output."""
    path = Path(path)
    what = f"the {OUTPUT_KINDS[kind][0]}"
    lock = path.parent / f".{path.name}.lock"
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(lock, "a")
        except OSError as e:
            raise ChxError(f"could not write {what} {path}: {e.strerror or e}; choose another {option} or fix "
                           f"the folder's permissions") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise ChxError(f"another chx process is writing {what} {path}; wait for it or choose another "
                           f"{option}") from None
        try:   # the file we locked may have been removed by its previous holder: lock the current one
            same = os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        f.close()


# ----------------------------------------------------------------------------------------- atomic writes

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False):
    """Yield a temp path beside ``path``; on success it replaces ``path``, on failure it is removed.

    An OSError (disk full, permissions) becomes a one-line :class:`ChxError` naming ``path``.
    """
    path = Path(path)
    try:   # an unwritable or missing folder is the user's to fix: one line, like a failed write
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise ChxError(f"could not write {path}: {e.strerror or e} (folder {path.parent}); choose "
                       f"another output or fix the folder's permissions") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise ChxError(f"could not write {path}: {e.strerror or e}; the previous file, if any, is "
                       f"intact (free some space or choose another output)") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, kind: str, *, what: str | None = None, legacy=None,
               option: str = "-o"):
    """Yield a temp folder beside ``path``; on success the marker of ``kind`` (listing the files
    written) goes into it and it replaces ``path`` (an old folder is moved aside, then removed), on
    failure or interruption it is removed, so ``path`` is always either the old folder or the whole
    new one. An existing ``path`` that is not chx's output of ``kind`` is never replaced
    (:func:`check_output`; ``legacy`` as there). An OSError becomes a one-line :class:`ChxError`
    naming ``what`` and ``path``."""
    path = Path(path)
    label, _ = OUTPUT_KINDS[kind]
    what = what or f"the {label}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    except OSError as e:
        raise ChxError(f"could not write {what} {path}: {e.strerror or e}; choose another output or fix "
                       f"the folder's permissions") from None
    try:
        yield tmp
        write_marker(tmp, kind, list(_names(tmp)))
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            # checked again now: a folder that appeared meanwhile, or is not ours, is never removed
            check_output(path, kind, True, option=option, legacy=legacy)
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix="-old", dir=path.parent))
            os.rename(path, old / "old")
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except OSError as e:
        raise ChxError(f"could not write {what} {path}: {e.strerror or e}; the previous one, if any, is "
                       f"intact") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
