"""Stage 1: `chx train-backbone`, a ConvNeXt + ML-Decoder image classifier.

Data: one or more manifests over images roots. Training rows are those with split ``train`` or no
split (e.g. a pseudo-labelled external dataset); validation rows have split ``val``. Class priors
for the weighted ASL come from the training rows. The best checkpoint is chosen by validation mAP.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from chx.data.datasets import ImageDataset, check_paths, label_matrix
from chx.data.manifest import class_columns, read_manifest
from chx.data.samplers import ClassAwareSampler, ShuffleSampler
from chx.data.transforms import Preprocess
from chx.errors import ChxError
from chx.losses import WeightedASL, class_prior
from chx.metrics import prior_baseline, summarize
from chx.models.backbone import ImageClassifier
from chx.pipeline.inference import predict_probs
from chx.pipeline.trainer import FitResult, TrainConfig, fit, setup_distributed, warn


@dataclass
class BackboneOptions:
    """Model and data options of stage 1 (paper defaults)."""

    model: str = "convnext_small.fb_in22k_ft_in1k"
    size: int = 1024
    resize: str = "letterbox"
    pretrained: bool = True
    weights: str | None = None
    balance: bool = True
    tta: bool = True
    grad_checkpointing: bool = False
    eval_batch_size: int = 16


def load_manifests(manifests: list[Path], images: list[Path]) -> tuple[pl.DataFrame, list[Path]]:
    """Read and concatenate manifests that share one class list; return the table and each row's
    images root (``images`` has one root for all, or one per manifest)."""
    if not manifests:
        raise ChxError("give at least one --manifest")
    if len(images) not in (1, len(manifests)):
        raise ChxError(f"give one --images root for all manifests or one per --manifest "
                       f"({len(manifests)} manifests, {len(images)} roots)")
    tables, roots = [], []
    for i, path in enumerate(manifests):
        df = read_manifest(path)
        check_paths(df, source=str(path))
        if tables and class_columns(df) != class_columns(tables[0]):
            raise ChxError(f"{path} has other classes than {manifests[0]}: prepare both onto the same "
                           f"list (`chx prepare ... --classes`)")
        root = Path(images[i] if len(images) > 1 else images[0])
        if not root.is_dir():
            raise ChxError(f"--images {root} is not a folder")
        tables.append(df)
        roots += [root] * df.height
    df = pl.concat(tables, how="vertical_relaxed")
    dup = df["image_id"].is_duplicated()
    if dup.any():
        i = int(dup.arg_true()[0])
        raise ChxError(f"image_id {df['image_id'][i]!r} appears in more than one --manifest; image ids "
                       f"must be unique across the manifests of one run")
    return df, roots


def split_rows(df: pl.DataFrame, roots: list[Path]):
    train_mask = (df["split"].is_null() | (df["split"] == "train")).to_numpy()
    val_mask = (df["split"] == "val").fill_null(False).to_numpy()
    pick = lambda m: (df.filter(pl.Series(m)), [r for r, keep in zip(roots, m) if keep])  # noqa: E731
    return pick(train_mask), pick(val_mask)


def train_backbone(manifests: list[Path], images: list[Path], out: Path, opts: BackboneOptions,
                   cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> FitResult:
    cfg.validate()
    ddp = setup_distributed(cfg.device)
    df, roots = load_manifests(manifests, images)
    classes = class_columns(df)
    (train_df, train_roots), (val_df, val_roots) = split_rows(df, roots)
    if train_df.height == 0:
        raise ChxError("the manifest(s) have no training rows (split 'train' or empty); assign splits "
                       "with `chx prepare ... --val-fraction`")
    pre = Preprocess(size=opts.size, mode=opts.resize)
    train_set = ImageDataset(train_df, train_roots, pre, train=True, classes=classes)
    val_set = ImageDataset(val_df, val_roots, pre, train=False, classes=classes) if val_df.height else None
    train_set.require_files("training")
    if val_set is not None:
        val_set.require_files("validation")

    train_labels = label_matrix(train_df, classes)
    positives = np.nansum(train_labels >= 0.5, axis=0)
    zero = [c for c, n in zip(classes, positives) if n == 0]
    if zero and ddp.is_main:
        warn(f"warning: {len(zero)} class(es) have no positive training image and cannot be "
             f"learned: {', '.join(zero)}")
    if val_df.height == 0 and ddp.is_main:
        warn("warning: no validation rows (split 'val'): best.pt will be the last checkpoint")

    prior = class_prior(train_labels)
    torch.manual_seed(cfg.seed)  # model initialisation
    model = ImageClassifier(opts.model, num_classes=len(classes), pretrained=opts.pretrained,
                            weights=opts.weights)
    if opts.grad_checkpointing:
        model.set_grad_checkpointing(True)
    loss_fn = WeightedASL(torch.as_tensor(prior, dtype=torch.float32)).to(ddp.device)

    kw = dict(seed=cfg.seed, rank=ddp.rank, world_size=ddp.world_size)
    sampler = (ClassAwareSampler(train_labels, **kw) if opts.balance
               else ShuffleSampler(len(train_set), **kw))

    def batch_loss(model, batch, device):
        x = batch["image"].to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return loss_fn(model(x), batch["target"].to(device, non_blocking=True))

    evaluate = None
    if val_set is not None:
        val_labels = label_matrix(val_df, classes)

        baseline = prior_baseline(prior, val_labels, classes)

        def evaluate(model):
            probs = predict_probs(model, val_set, batch_size=opts.eval_batch_size, workers=cfg.workers,
                                  device=ddp.device, tta=opts.tta, desc="validate")
            return {**summarize(probs, val_labels, classes, train_counts=positives), **baseline}

    meta = {
        "kind": "backbone",
        "model_config": model.config,
        "class_names": classes,
        "preprocess": pre.to_dict(),
        "class_prior": [float(p) for p in prior],
        "train_counts": [int(n) for n in positives],
        "tta": opts.tta,
        "options": {**opts.__dict__, "manifests": [str(m) for m in manifests],
                    "images": [str(i) for i in images]},
    }
    return fit(model, train_set, sampler, batch_loss, evaluate, cfg, out, meta,
               resume=resume, overwrite=overwrite, ddp=ddp)
