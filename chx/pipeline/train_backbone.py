"""Stage 1: `chx train-backbone`, a ConvNeXt + ML-Decoder image classifier (``--head``: or CSRA, or
linear; ``--loss``: weighted ASL or ASL, DB, BCE; ``--clahe``/``--coarse-dropout``: augmentations).

Data: one or more manifests over images roots. Training rows are those with split ``train`` or no
split (e.g. a pseudo-labelled external dataset); validation rows have split ``val``. Class priors
for the weighted ASL come from the training rows. The best checkpoint is chosen by validation mAP.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import polars as pl
import torch

from chx.data.batch_augment import BatchAugment, augment_on_device
from chx.data.datasets import ImageDataset, check_paths, label_matrix
from chx.data.image_cache import open_image_cache
from chx.data.manifest import class_columns, file_sha256, read_manifest, soft_label_count
from chx.data.transforms import Preprocess
from chx.engine.compat import training_patients
from chx.engine.distributed import setup_distributed
from chx.engine.inference import images_to, predict_images
from chx.engine.objective import make_objective
from chx.engine.trainer import FitResult, Stage, fit_stage, require_training_split, warn, warn_no_validation
from chx.errors import ChxError
from chx.models import create_model
from chx.models.heads import check_head
from chx.options import BackboneOptions, TrainConfig


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
        df = read_manifest(path, soft=True)
        soft = soft_label_count(df)
        if soft:
            warn(f"note: {path} holds {soft:,} soft labels (between 0 and 1): trained as pseudo labels")
        check_paths(df, source=str(path))
        if tables and class_columns(df) != class_columns(tables[0]):
            raise ChxError(f"{path} has other classes than {manifests[0]}: prepare both onto the same "
                           f"list (`chx prepare ... --classes`)")
        root = images[i] if len(images) > 1 else images[0]
        root = None if root is None else Path(root)    # None: every image comes from --images-cache
        if root is not None and not root.is_dir():
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
                   cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
                   images_cache: str | None = None) -> FitResult:
    """``images_cache``: an image cache (`chx cache-images`) to read the images from (the same tensors)."""
    cfg.validate()
    check_head(opts.head, opts.csra_heads, opts.csra_lambda)
    ddp = setup_distributed(cfg.device)
    df, roots = load_manifests(manifests, images)
    classes = class_columns(df)
    (train_df, train_roots), (val_df, val_roots) = split_rows(df, roots)
    require_training_split(train_df.height, "rows", ", ".join(str(m) for m in manifests))
    pre = Preprocess(size=opts.size, mode=opts.resize)
    cache = open_image_cache(images_cache, pre)
    augment = dict(clahe=opts.clahe, coarse_dropout=opts.coarse_dropout)
    on_device = augment_on_device(opts.augment_on, ddp.device)     # --augment-on
    train_set = ImageDataset(train_df, train_roots, pre, train=True, classes=classes, augment=augment,
                             cache=cache, device_augment=on_device)
    val_set = ImageDataset(val_df, val_roots, pre, train=False, classes=classes, cache=cache) \
        if val_df.height else None
    train_set.require_files("training")
    if val_set is not None:
        val_set.require_files("validation")
    else:
        warn_no_validation("rows", ddp)

    objective = make_objective(label_matrix(train_df, classes), classes, balance=opts.balance,
                               seed=cfg.seed, ddp=ddp, unit="image", warn=warn,
                               soft_targets=opts.soft_targets, loss=opts.loss)
    torch.manual_seed(cfg.seed)  # model initialisation
    model = create_model("backbone", backbone_name=opts.model, num_classes=len(classes),
                         pretrained=opts.pretrained, weights=opts.weights, head=opts.head,
                         csra_heads=opts.csra_heads, csra_lambda=opts.csra_lambda)
    if opts.grad_checkpointing:
        model.set_grad_checkpointing(True)

    device_augment = BatchAugment(pre, **augment) if on_device else None

    def batch_loss(model, batch, device):
        images = batch["image"]
        if device_augment is not None:    # the workers sent them un-augmented, with their seeds
            images = device_augment(images.to(device, non_blocking=True), batch["seed"])
        logits = model(images_to(images, device))
        return objective.loss(logits, batch["target"].to(device, non_blocking=True))

    evaluate = None
    if val_set is not None:
        score = objective.scorer(label_matrix(val_df, classes), classes)

        def evaluate(model):
            return score(predict_images(model, val_set, batch_size=opts.eval_batch_size, workers=cfg.workers,
                                        device=ddp.device, tta=opts.tta, desc="validate"))

    meta = {
        "kind": "backbone",
        "model_config": model.config,
        "class_names": classes,
        "preprocess": pre.to_dict(),
        **objective.meta(),
        "tta": opts.tta,
        "options": {**asdict(opts), "manifests": [str(m) for m in manifests],
                    "images": [str(i) for i in images], "images_cache": images_cache},
        # a manifest changed after training (e.g. prepare rerun with another --seed) is noticed
        "manifest_sha256": {str(m): file_sha256(m) for m in manifests},
        # ... and so is one re-split, renamed or edited: the training split's patients, by content
        "train_patients": training_patients(train_df),
    }
    stage = Stage(model=model, train_set=train_set, sampler=objective.sampler, batch_loss=batch_loss,
                  evaluate=evaluate, meta=meta)
    return fit_stage(stage, cfg, out, resume=resume, overwrite=overwrite, ddp=ddp)
