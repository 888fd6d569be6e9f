"""A training run's folder: config.json, metrics.jsonl, last.pt, best.pt (and TensorBoard event
files), owned by one process through an exclusive lock. The loop (:mod:`chx.engine.trainer`) writes
it; the overwrite and resume rules of a run folder live here."""

from __future__ import annotations

import fcntl
import math
from pathlib import Path

from chx.atomic import atomic_path, json_text
from chx.errors import ChxError
from chx.models import load_checkpoint


class RunFolder:
    """A run folder owned by one process: config.json, metrics.jsonl, last.pt, best.pt (and the
    TensorBoard event files of ``tensorboard``, a :class:`~chx.engine.tensorboard.TensorBoardLogger`
    that gets every metrics.jsonl record).

    An exclusive lock (``.lock``, held while training) makes a second run into the same folder fail
    at once instead of interleaving its metrics and checkpoints with the first one's."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.last, self.best = self.out / "last.pt", self.out / "best.pt"
        self.metrics = self.out / "metrics.jsonl"
        self.tensorboard = None
        self._lock = None

    def open(self, *, resume: bool, overwrite: bool) -> None:
        if self.last.exists() and not (resume or overwrite):
            raise ChxError(f"{self.out} already holds a run (last.pt); use --resume to continue it or "
                           f"--overwrite to start again")
        if resume and not self.last.exists():
            raise ChxError(f"--resume: {self.last} does not exist; run without --resume to start")
        if self.out.exists() and not self.out.is_dir():
            raise ChxError(f"-o {self.out} is a file; give a folder for the run")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.out / ".lock", "w")
        except OSError as e:
            raise ChxError(f"cannot write the run folder {self.out}: {e.strerror or e}; choose "
                           f"another --out") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ChxError(f"another chx process is training in {self.out}; wait for it or use "
                           f"another --out") from None
        if overwrite and not resume:
            for p in (self.last, self.best, self.metrics, *self.out.glob("events.out.tfevents.*"),
                      *self.checkpoints()):
                p.unlink(missing_ok=True)
        try:   # an unwritable (immutable, read-only) metrics.jsonl stops here, not after the first steps
            open(self.metrics, "a").close()
        except OSError as e:
            self.close()
            raise ChxError(f"cannot write {self.metrics}: {e.strerror or e}; make it writable (e.g. "
                           f"`chattr -i`, `chmod u+w`) or use another --out") from None

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()   # releases the lock
            self._lock = None
        if self.tensorboard is not None:
            self.tensorboard.close()

    def log(self, record: dict) -> None:
        try:
            with open(self.metrics, "a") as f:
                f.write(json_text(record) + "\n")   # valid JSON: a NaN loss -> null
        except OSError as e:
            raise ChxError(f"cannot write {self.metrics}: {e.strerror or e}; {self.last} holds the last saved "
                           f"state: make the file writable (or free space) and continue with --resume") from None
        if self.tensorboard is not None:
            self.tensorboard.log(record)

    def checkpoints(self) -> list[Path]:
        """The kept validation checkpoints (ckpt-stepN.pt, ``--keep-checkpoints``), oldest first."""
        found = [(p.name[len("ckpt-step"):-len(".pt")], p) for p in self.out.glob("ckpt-step*.pt")]
        return [p for step, p in sorted((int(s), p) for s, p in found if s.isdigit())]

    def keep_checkpoint(self, step: int, keep: int, save) -> None:
        """``save(path)`` the weights of the validation at ``step`` as ckpt-stepN.pt, then remove all
        but the last ``keep`` such files (`chx ensemble --from-run` averages them)."""
        save(self.out / f"ckpt-step{step}.pt")
        for p in self.checkpoints()[:-keep]:
            p.unlink(missing_ok=True)

    def read_config(self) -> dict:
        """config.json of the run ({} when absent or unreadable: a run of an older chx, or none yet)."""
        import json

        try:
            config = json.loads((self.out / "config.json").read_text())
        except (OSError, ValueError):
            return {}
        return config if isinstance(config, dict) else {}

    def write_config(self, config: dict) -> None:
        with atomic_path(self.out / "config.json") as tmp:
            tmp.write_text(json_text(config, indent=2, default=str))

    def resumed_best(self, best: float | None, kind: str) -> float | None:
        """The best validation score a resumed run continues from, ``best`` being the one last.pt records.

        None when best.pt is missing (stopped while writing it, by an older chx, or deleted): the next
        validation writes a new one. best.pt's own score when it is newer than last.pt and better
        (stopped between the two saves, best.pt being written first), so the replayed steps do not
        replace it by a worse one."""
        if best is None or not self.best.exists():
            return None
        if self.best.stat().st_mtime_ns > self.last.stat().st_mtime_ns:
            try:
                score = (load_checkpoint(self.best, kind=kind).get("metrics") or {}).get("mAP")
            except ChxError:
                score = None
            if isinstance(score, (int, float)) and math.isfinite(score) and score > best:
                return float(score)
        return best
