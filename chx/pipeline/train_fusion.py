"""Stage 2b: `chx train-fusion`, the CheXFusion transformer trained from the feature store alone.

No image is decoded and no backbone is opened: every input comes from the store. The same trainer
as stage 1 (resume, metrics, checkpoints, DDP); the loss is stage 1's weighted ASL with class
priors from the store's training studies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from chx.data.samplers import ClassAwareSampler, ShuffleSampler
from chx.data.study_dataset import StudyDataset, collate_studies
from chx.errors import ChxError
from chx.losses import WeightedASL, class_prior
from chx.metrics import prior_baseline, summarize
from chx.models.fusion import FusionModel
from chx.pipeline.trainer import FitResult, TrainConfig, fit, setup_distributed, warn
from chx.store import open_store


@dataclass
class FusionOptions:
    """Model and data options of stage 2 (paper defaults; D = C when ``dim`` is None)."""

    max_views: int = 4
    encoder_layers: int = 2
    dim: int | None = None
    heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.1
    pos_enc: bool = True
    segment_embedding: bool = True
    view_embedding: bool = False
    shuffle: bool = True
    balance: bool = False
    flip_aug: bool = True
    eval_batch_size: int = 16
    preload: str = "auto"        # auto | on | off: hold the store's features in memory

    def preload_for(self, store) -> bool:
        """auto: preload when the uncompressed features fit in 4 GiB."""
        if self.preload == "auto":
            return store.n_images * store.nbytes_per_image <= 4 * 2**30
        return self.preload == "on"

    def validate(self) -> None:
        if self.max_views < 1:
            raise ChxError(f"--max-views {self.max_views}: must be >= 1")
        if self.encoder_layers < 0:
            raise ChxError(f"--encoder-layers {self.encoder_layers}: must be >= 0")
        if not 0 <= self.dropout < 1:
            raise ChxError(f"--dropout {self.dropout}: must be in [0, 1)")


@torch.no_grad()
def predict_studies(model: FusionModel, dataset: StudyDataset, *, batch_size: int = 16, workers: int = 0,
                    device: torch.device | str = "cpu", desc: str = "predict") -> np.ndarray:
    """Study probabilities [S, K] in dataset order (eval mode: deterministic views and order)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_studies, generator=torch.Generator().manual_seed(0))
    out = []
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
        logits = model(batch["features"].to(device), batch["view_mask"].to(device),
                       batch["view_types"].to(device))
        out.append(torch.sigmoid(logits.float()).cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, model.config["num_classes"]), np.float32)


def train_fusion(store_path: str, out: Path, opts: FusionOptions, cfg: TrainConfig, *,
                 resume: bool = False, overwrite: bool = False) -> FitResult:
    opts.validate()
    cfg.validate()
    ddp = setup_distributed(cfg.device)
    store = open_store(store_path)
    if not store.complete:
        raise ChxError(f"store {store_path} is incomplete ({len(store.missing_rows()):,} of "
                       f"{store.n_images:,} images not extracted); rerun `chx extract-features` "
                       f"with the same options to finish it")
    classes = list(store.class_names)
    C = store.feature_shape[0]
    preload = opts.preload_for(store)
    train_set = StudyDataset(store_path, "train", max_views=opts.max_views, train=True,
                             shuffle=opts.shuffle, flip_aug=opts.flip_aug, preload=preload)
    if len(train_set) == 0:
        raise ChxError(f"store {store_path} has no training studies (split 'train'); assign splits in "
                       f"the manifest (`chx prepare ... --val-fraction`) and extract again")
    val_set = StudyDataset(store_path, "val", max_views=opts.max_views, preload=preload)
    train_labels = train_set.labels
    positives = np.nansum(train_labels >= 0.5, axis=0)
    zero = [c for c, n in zip(classes, positives) if n == 0]
    if zero and ddp.is_main:
        warn(f"warning: {len(zero)} class(es) have no positive training study: {', '.join(zero)}")
    prior = class_prior(train_labels)

    torch.manual_seed(cfg.seed)
    model = FusionModel(C, len(classes), dim=opts.dim, max_views=opts.max_views,
                        layers=opts.encoder_layers, heads=opts.heads, ffn_dim=opts.ffn_dim,
                        dropout=opts.dropout, pos_enc=opts.pos_enc,
                        segment_embedding=opts.segment_embedding, view_embedding=opts.view_embedding)
    loss_fn = WeightedASL(torch.as_tensor(prior, dtype=torch.float32)).to(ddp.device)
    kw = dict(seed=cfg.seed, rank=ddp.rank, world_size=ddp.world_size)
    sampler = (ClassAwareSampler(train_labels, **kw) if opts.balance
               else ShuffleSampler(len(train_set), **kw))

    def batch_loss(model, batch, device):
        logits = model(batch["features"].to(device, non_blocking=True), batch["view_mask"].to(device),
                       batch["view_types"].to(device))
        return loss_fn(logits, batch["target"].to(device))

    evaluate = None
    if len(val_set):
        baseline = prior_baseline(prior, val_set.labels, classes)

        def evaluate(model):
            probs = predict_studies(model, val_set, batch_size=opts.eval_batch_size,
                                    device=ddp.device, desc="validate")
            return {**summarize(probs, val_set.labels, classes, train_counts=positives), **baseline}
    elif ddp.is_main:
        warn("warning: the store has no validation studies (split 'val'): best.pt = last checkpoint")

    meta = {
        "kind": "fusion",
        "model_config": model.config,
        "class_names": classes,
        "class_prior": [float(p) for p in prior],
        "train_counts": [int(n) for n in positives],
        "store_fingerprint": store.fingerprint,
        "options": {**asdict(opts), "store": str(store_path)},
    }
    return fit(model, train_set, sampler, batch_loss, evaluate, cfg, out, meta, resume=resume,
               overwrite=overwrite, ddp=ddp, collate_fn=partial(collate_studies))
