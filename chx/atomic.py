"""Atomic file writes: write to a temp name beside the target, then rename over it.

A reader (or a crashed run) never sees a half-written file under the real name. The temp file gets
the permissions a plain ``open()`` would (0666 minus the umask), not mkstemp's private 0600.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from chx.errors import ChxError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False):
    """Yield a temp path beside ``path``; on success it replaces ``path``, on failure it is removed.

    An OSError (disk full, permissions) becomes a one-line :class:`ChxError` naming ``path``.
    """
    path = Path(path)
    try:   # an unwritable or missing folder is the user's to fix: one line, like a failed write
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
def atomic_dir(path: str | os.PathLike, *, what: str = "the folder"):
    """Yield a temp folder beside ``path``; on success it replaces ``path`` (an old folder is moved
    aside, then removed), on failure or interruption it is removed, so ``path`` is always either the
    old folder or the whole new one. An OSError becomes a one-line :class:`ChxError` naming ``what``
    and ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise ChxError(f"could not write {what} {path}: {e.strerror or e}; choose another output or fix "
                       f"the folder's permissions") from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except OSError as e:
        raise ChxError(f"could not write {what} {path}: {e.strerror or e}; the previous one, if any, is "
                       f"intact") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
