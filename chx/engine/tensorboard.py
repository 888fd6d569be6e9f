"""TensorBoard scalars of a training run (``--tensorboard``), written by rank 0 into the run folder.

Every record the trainer writes to metrics.jsonl goes here too, so the two always agree:

    train/loss, train/lr                          each ``log_every`` steps
    val/<metric>                                  each validation: mAP, mAUC, mAP_head/medium/tail,
                                                  baseline_mAP, baseline_mAUC (the class-prior floor)
    val_per_class/AP/<class>, val_per_class/AUROC/<class>

The x axis is the optimizer step. TensorBoard is an optional extra (``pip install 'chx[tensorboard]'``);
without it ``--tensorboard`` stops before training with one line saying so.
"""

from __future__ import annotations

import math
from pathlib import Path

from chx.errors import ChxError

MISSING = "--tensorboard needs the tensorboard package: pip install 'chx[tensorboard]' (or drop --tensorboard)"

# metrics.jsonl keys of a validation record that are not scalars of the model's quality
_NOT_SCALARS = {"kind", "step", "epoch", "best", "n", "skipped", "per_class"}


class TensorBoardLogger:
    """Scalars of metrics.jsonl records into TensorBoard event files in ``folder``.

    Constructed before training (the import is checked at once); the event file is created at the
    first record. Only the main process makes one (the trainer's rank 0)."""

    def __init__(self, folder: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ChxError(MISSING) from None
        self._writer_class = SummaryWriter
        self.folder = Path(folder)
        self._writer = None

    def log(self, record: dict) -> None:
        """One metrics.jsonl record (``kind`` train or val; others, e.g. skips, are not scalars)."""
        scalars = record_scalars(record)
        if not scalars:
            return
        if self._writer is None:
            self._writer = self._writer_class(log_dir=str(self.folder))
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=record["step"])
        self._writer.flush()   # a crashed or interrupted run keeps what it logged

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def record_scalars(record: dict) -> dict[str, float]:
    """The TensorBoard tags and values of one metrics.jsonl record (NaN metrics, e.g. the AP of a
    class without a validation positive, are left out: TensorBoard would plot them as gaps anyway)."""
    if record.get("kind") == "train":
        pairs = {"train/loss": record["loss"], "train/lr": record["lr"]}
    elif record.get("kind") == "val":
        pairs = {f"val/{k}": v for k, v in record.items()
                 if k not in _NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for name, scores in (record.get("per_class") or {}).items():
            pairs[f"val_per_class/AP/{name}"] = scores.get("ap")
            pairs[f"val_per_class/AUROC/{name}"] = scores.get("auc")
    else:
        return {}
    return {tag: float(v) for tag, v in pairs.items() if v is not None and math.isfinite(float(v))}
