"""`chx train-joint`: the stage-1 backbone and the fusion model fine-tuned together, from images.

The two-stage recipe freezes the backbone after stage 1; this stage asks whether training both end
to end does better. The model (:class:`chx.models.joint.JointModel`) starts from the backbone of a
stage-1 checkpoint and from a fusion checkpoint trained on that backbone's store (or a fresh fusion
model with the fusion defaults), and feeds each view's backbone map to the fusion model exactly as
the store would hold it (same pooling, float16). Studies come from the manifest's images with
train-fusion's view handling (up to ``max_views`` views, a random subset and order in training, the
deterministic choice at evaluation) and stage 1's augmentation of each view.

The same trainer (resume, metrics, checkpoints, DDP, EMA, AMP) and objective (weighted ASL with the
training studies' prior) as the other stages; the backbone's parameters train at ``lr x
backbone_lr_mult``. Validation: macro mAP on the val split's studies, computed as `chx predict`
computes the exported bundle (:func:`chx.engine.joint.predict_study_images`), so `chx evaluate`
reports the same mAP for best.pt.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import polars as pl
import torch

from chx.data.batch_augment import BatchAugment, augment_on_device
from chx.data.datasets import check_paths
from chx.data.manifest import class_columns, file_sha256, read_manifest, soft_label_count
from chx.data.image_cache import open_image_cache
from chx.data.study_images import StudyImageDataset, collate_study_images
from chx.data.transforms import Preprocess
from chx.engine.compat import leakage_warning, require_same_backbone, require_same_classes, training_patients
from chx.engine.distributed import setup_distributed
from chx.engine.inference import images_to
from chx.engine.joint import predict_study_images
from chx.engine.objective import make_objective
from chx.engine.trainer import FitResult, Stage, fit_stage, require_training_split, warn, warn_no_validation
from chx.errors import ChxError
from chx.models import create_model, eval_weights, load_checkpoint, load_model, weights_hash
from chx.models.joint import PART_PREFIXES, JointModel
from chx.options import FusionOptions, JointOptions, TrainConfig


def joint_model(s1: dict, backbone: Path, fusion_ckpt: dict | None, fusion: Path | None,
                opts: JointOptions) -> JointModel:
    """The joint model at its start: the stage-1 checkpoint ``s1``'s model (its EMA weights when it
    kept them: the weights that made the store) and the fusion checkpoint's model, checked to be
    trained on that backbone's features, or a fresh fusion model (FusionOptions defaults, seeded by
    the caller) on unpooled maps."""
    image = load_model(s1, kind="backbone")
    if fusion_ckpt is None:
        d = FusionOptions()
        fused = create_model("fusion", in_dim=image.feature_dim, num_classes=len(s1["class_names"]),
                             dim=d.dim, max_views=opts.max_views or d.max_views, layers=d.encoder_layers,
                             heads=d.heads, ffn_dim=d.ffn_dim, dropout=d.dropout, pos_enc=d.pos_enc,
                             segment_embedding=d.segment_embedding, view_embedding=d.view_embedding)
        return create_model("joint", image=image, fusion=fused, pool=1)
    require_same_classes(fusion_ckpt["class_names"], s1["class_names"], str(fusion), str(backbone),
                         fix="give a fusion model trained on this backbone's features, or no --fusion")
    made_by = fusion_ckpt.get("store_fingerprint") or {}
    require_same_backbone(made_by, weights_hash(eval_weights(s1)), str(fusion), str(backbone))
    fused = load_model(fusion_ckpt, kind="fusion")
    if opts.max_views is not None and opts.max_views != fused.max_views:
        raise ChxError(f"--max-views {opts.max_views}: {fusion} was trained with --max-views "
                       f"{fused.max_views} (its view slots); give --max-views {fused.max_views}, or train "
                       f"a fusion model with {opts.max_views} views, or give no --fusion")
    try:
        return create_model("joint", image=image, fusion=fused, pool=int(made_by.get("pool", 1)))
    except ValueError as e:
        raise ChxError(f"{fusion} does not fit {backbone}: {e}; give a fusion model trained on its "
                       f"features") from None


def train_joint(manifest: Path, images: Path, backbone: Path, out: Path, opts: JointOptions,
                cfg: TrainConfig, *, fusion: Path | None = None, resume: bool = False,
                overwrite: bool = False, images_cache: str | None = None) -> FitResult:
    """``images_cache``: an image cache (`chx cache-images`) to read the views from (the same tensors)."""
    opts.validate()
    cfg.validate()
    ddp = setup_distributed(cfg.device)
    df = read_manifest(manifest, soft=True)
    check_paths(df, source=str(manifest))
    soft = soft_label_count(df)
    if soft:
        warn(f"note: {manifest} holds {soft:,} soft labels (between 0 and 1): trained as pseudo labels")
    if images_cache is None and not Path(images).is_dir():
        raise ChxError(f"--images {images} is not a folder")
    classes = class_columns(df)
    s1 = load_checkpoint(backbone, kind="backbone")
    require_same_classes(classes, s1["class_names"], str(manifest), str(backbone))
    leak = leakage_warning(s1, df, manifest, backbone)
    if leak and ddp.is_main:
        warn(leak)
    fusion_ckpt = load_checkpoint(fusion, kind="fusion") if fusion is not None else None
    torch.manual_seed(cfg.seed)   # a fresh fusion model's initialisation
    model = joint_model(s1, backbone, fusion_ckpt, fusion, opts)
    if opts.grad_checkpointing:
        model.set_grad_checkpointing(True)

    pre = Preprocess.from_dict(s1["preprocess"])
    train_df = df.filter(pl.col("split").is_null() | (pl.col("split") == "train"))
    val_df = df.filter(pl.col("split") == "val")
    cache = open_image_cache(images_cache, pre)
    on_device = augment_on_device(opts.augment_on, ddp.device)     # --augment-on
    train_set = StudyImageDataset(train_df, images, pre, max_views=model.max_views, train=True,
                                  shuffle=opts.shuffle, classes=classes, cache=cache, device_augment=on_device)
    device_augment = BatchAugment(pre) if on_device else None
    require_training_split(len(train_set), "studies", str(manifest))
    val_set = StudyImageDataset(val_df, images, pre, max_views=model.max_views, classes=classes, cache=cache)
    train_set.require_files("training")
    val_set.require_files("validation")
    objective = make_objective(train_set.labels, classes, balance=opts.balance, seed=cfg.seed, ddp=ddp,
                               unit="study", warn=warn, soft_targets=opts.soft_targets)

    def batch_loss(model, batch, device):
        images = batch["images"]
        if device_augment is not None:    # the workers sent the views un-augmented, with their seeds
            images = device_augment(images.to(device, non_blocking=True), batch["seeds"])
        logits = model(images_to(images, device), batch["view_mask"].to(device),
                       batch["view_types"].to(device))
        return objective.loss(logits, batch["target"].to(device, non_blocking=True))

    evaluate = None
    if len(val_set):
        score = objective.scorer(val_set.labels, classes)

        def evaluate(model):
            return score(predict_study_images(model, val_set, batch_size=opts.eval_batch_size,
                                              workers=cfg.workers, device=ddp.device, tta=opts.tta,
                                              desc="validate"))
    else:
        warn_no_validation("studies", ddp)

    meta = {
        "kind": "joint",
        "model_config": model.config,
        "class_names": classes,
        "preprocess": pre.to_dict(),
        **objective.meta(),
        "tta": opts.tta,
        "options": {**asdict(opts), "manifest": str(manifest), "images": str(images), "images_cache": images_cache,
                    "backbone": str(backbone), "fusion": None if fusion is None else str(fusion)},
        "manifest_sha256": {str(manifest): file_sha256(manifest)},
        "train_patients": training_patients(train_df),
        # what the run started from (the weights, not the file names)
        "initialised_from": {
            "backbone_sha256": weights_hash(eval_weights(s1)),
            "fusion_sha256": None if fusion_ckpt is None else weights_hash(eval_weights(fusion_ckpt))},
    }
    stage = Stage(model=model, train_set=train_set, sampler=objective.sampler, batch_loss=batch_loss,
                  evaluate=evaluate, meta=meta, collate_fn=collate_study_images,
                  lr_mults={PART_PREFIXES["backbone"]: opts.backbone_lr_mult})
    return fit_stage(stage, cfg, out, resume=resume, overwrite=overwrite, ddp=ddp)
