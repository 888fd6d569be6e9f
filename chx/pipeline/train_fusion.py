"""Stage 2b: `chx train-fusion`, the CheXFusion transformer trained from the feature store alone.

No image is decoded and no backbone is opened: every input comes from the store. The same trainer
as stage 1 (resume, metrics, checkpoints, DDP); the loss is stage 1's weighted ASL with class
priors from the store's training studies. Validation uses flip TTA when the store has flipped maps,
exactly as `chx evaluate` does, so the two report the same mAP for best.pt.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from chx.data.study_dataset import StudyDataset, collate_studies
from chx.engine.compat import store_data_sha256
from chx.engine.distributed import setup_distributed
from chx.engine.inference import predict_studies
from chx.engine.objective import make_objective
from chx.engine.run_folder import RunFolder
from chx.engine.trainer import FitResult, Stage, fit_stage, require_training_split, warn, warn_no_validation
from chx.models import create_model
from chx.options import FusionOptions, TrainConfig
from chx.store import open_store


def train_fusion(store_path: str, out: Path, opts: FusionOptions, cfg: TrainConfig, *,
                 resume: bool = False, overwrite: bool = False) -> FitResult:
    opts.validate()
    cfg.validate()
    ddp = setup_distributed(cfg.device)
    with open_store(store_path) as store:
        store.require_complete()      # a store with missing shards must not train on empty maps
        classes, channels = list(store.class_names), store.feature_shape[0]
        fingerprint = store.fingerprint
        data_sha256 = store_data_sha256(store)   # --resume refuses a store of other data
    preload = "ram" if opts.preload == "on" else opts.preload
    # Streaming reads whole shards in a shard-local order; class-aware sampling draws at random,
    # so it reads study by study (no shard cache). The DataLoader sends batch j to worker
    # j % workers, each worker with its own shard cache: the order has one lane per worker, so each
    # shard is read by one worker, not by every worker. The lanes are part of the study order: a
    # resumed run keeps its own (1 in runs of older chx). A process holds about --buffer-shards
    # shards per lane it serves (one more where the dealing is uneven).
    lanes = int((RunFolder(out).read_config().get("reader") or {}).get("lanes", 1)) if resume else max(1, cfg.workers)
    per_process = -(-lanes // cfg.workers) if cfg.workers else lanes
    cache_shards = 0 if opts.balance else opts.buffer_shards * per_process + (2 if lanes > 1 else 1)
    train_set = StudyDataset(store_path, "train", max_views=opts.max_views, train=True,
                             shuffle=opts.shuffle, flip_aug=opts.flip_aug, preload=preload,
                             device=ddp.device, cache_shards=cache_shards)
    require_training_split(len(train_set), "studies", f"store {store_path}", blank_is_train=False,
                           fix="assign splits in the manifest (`chx prepare ... --val-fraction`) and "
                               "extract again")
    streaming = train_set.preload == "off" and not opts.balance
    lanes = lanes if streaming else 1
    objective = make_objective(train_set.labels, classes, balance=opts.balance, seed=cfg.seed, ddp=ddp,
                               unit="study", warn=warn, soft_targets=opts.soft_targets,
                               shard_of_item=train_set.item_shards if streaming else None,
                               buffer_shards=opts.buffer_shards, lanes=lanes, batch_size=cfg.batch_size)

    torch.manual_seed(cfg.seed)
    model = create_model("fusion", in_dim=channels, num_classes=len(classes), dim=opts.dim,
                         max_views=opts.max_views, layers=opts.encoder_layers, heads=opts.heads,
                         ffn_dim=opts.ffn_dim, dropout=opts.dropout, pos_enc=opts.pos_enc,
                         segment_embedding=opts.segment_embedding, view_embedding=opts.view_embedding,
                         view_experts=opts.view_experts, experts=opts.experts)

    def batch_loss(model, batch, device):
        logits = model(batch["features"].to(device, non_blocking=True), batch["view_mask"].to(device),
                       batch["view_types"].to(device))
        return objective.loss(logits, batch["target"].to(device))

    # Validation scores the checkpoint exactly as `chx evaluate` and `chx predict` do: with flip
    # TTA when the store holds flipped maps, so best.pt's mAP is the one evaluate reports.
    val_set = StudyDataset(store_path, "val", max_views=opts.max_views, preload=preload, device=ddp.device)
    val_flip = (StudyDataset(store_path, "val", max_views=opts.max_views, use_flip=True, preload=preload,
                             device=ddp.device) if len(val_set) and val_set.has_flip else None)
    evaluate = None
    if len(val_set):
        score = objective.scorer(val_set.labels, classes)

        def evaluate(model):
            return score(predict_studies(model, val_set, val_flip, batch_size=opts.eval_batch_size,
                                         device=ddp.device, desc="validate"))
    else:
        warn_no_validation("studies", ddp)

    meta = {
        "kind": "fusion",
        "model_config": model.config,
        "class_names": classes,
        **objective.meta(),
        "store_fingerprint": fingerprint,
        "store_data_sha256": data_sha256,
        "val_tta": val_flip is not None,
        "options": {**asdict(opts), "store": str(store_path)},
        "reader": {"preload": train_set.preload, "sampler": type(objective.sampler).__name__, "lanes": lanes},
    }
    stage = Stage(model=model, train_set=train_set, sampler=objective.sampler, batch_loss=batch_loss,
                  evaluate=evaluate, meta=meta, collate_fn=collate_studies)
    return fit_stage(stage, cfg, out, resume=resume, overwrite=overwrite, ddp=ddp)
