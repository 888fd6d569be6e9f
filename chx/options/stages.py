"""The options the pipeline stages take: optimisation (:class:`TrainConfig`), stage 1, fusion, joint
fine-tuning, extraction, the demo, and the image cache; and which of them may change on ``--resume``."""

from __future__ import annotations

from dataclasses import Field, dataclass
from pathlib import Path

from chx.errors import ChxError
from chx.options._declare import (DEFAULT_BACKBONE, HEADS, LOSSES, PRELOAD, RECORDED_ROOT, RESIZE_MODES,
                                  SHUFFLE_HELP, SOFT_TARGETS, SOFT_TARGETS_HELP, option, option_fields,
                                  option_meta, _augment_on)
from chx.store._codec import FEATURE_DTYPES as DTYPES   # feature maps' dtypes (torch-free; chx.store loads zarr)


@dataclass
class TrainConfig:
    """Optimisation options (paper defaults: AdamW 3e-5, wd 0.01, batch 8, 4 validations/epoch)."""

    epochs: float = option(6.0, "Epochs (fractions allowed).", on_resume="applied")
    batch_size: int = option(8, "Batch size per process.")
    lr: float = option(3e-5, "AdamW peak learning rate.")
    weight_decay: float = option(0.01, "AdamW weight decay.")
    warmup: float = option(0.05, "Linear warm-up, as a fraction of all steps; then cosine decay (stepped "
                                 "per step).")
    min_lr_ratio: float = option(0.01, "The cosine decay ends at lr x this.")
    grad_accum: int = option(1, "Batches accumulated per optimizer step.")
    clip_grad: float = option(1.0, "Max gradient norm (0 = no clipping).")
    precision: str = option("auto", "Mixed precision on GPU (auto: bf16 if supported, else fp16 with a grad "
                                    "scaler); CPU always runs fp32.", choices=("auto", "bf16", "fp16", "fp32"))
    ema: float = option(0.0, "EMA decay of the weights used for validation and prediction (0 = off; e.g. "
                             "0.999).")
    val_every: float = option(0.25, "Validate (and checkpoint) every this fraction of an epoch.")
    keep_checkpoints: int = option(0, "Also keep the weights of the last this many validations as ckpt-stepN.pt "
                                      "(for `chx ensemble --from-run`); 0: only best.pt and last.pt.", min=0,
                                   on_resume="free")
    seed: int = option(0, "Seed of initialisation, order, augmentation.")
    workers: int = option(2, "DataLoader worker processes.", on_resume="free")
    max_steps: int = option(0, "Stop after this many optimizer steps (0 = train all epochs); the schedule "
                               "is unchanged.", on_resume="free")
    log_every: int = option(10, "Write the training loss to metrics.jsonl every this many steps.",
                            on_resume="free")
    progress_every: float = option(30.0, "Seconds between progress lines (step, loss, items/s, ETA) when not "
                                         "on a terminal.", on_resume="free")
    nonfinite: str = option("stop", "On a NaN/inf loss: stop (naming the step and images) or skip that batch.",
                            choices=("stop", "skip"), on_resume="free")
    device: str = option("auto", "auto (cuda if available), cpu or cuda.", on_resume="free")
    tensorboard: bool = option(False, "Also write the training loss, learning rate and validation metrics "
                                      "(per class too) as TensorBoard scalars into --out (needs the extra: "
                                      "pip install 'chx[tensorboard]').", on_resume="free")

    def validate(self) -> None:
        checks = [
            (self.epochs > 0, "--epochs", "must be > 0"),
            (self.batch_size >= 1, "--batch-size", "must be >= 1"),
            (self.lr > 0, "--lr", "must be > 0"),
            (self.weight_decay >= 0, "--weight-decay", "must be >= 0"),
            (0 <= self.warmup < 1, "--warmup", "must be a fraction in [0, 1)"),
            (self.grad_accum >= 1, "--grad-accum", "must be >= 1"),
            (self.clip_grad >= 0, "--clip-grad", "must be >= 0 (0 = off)"),
            (0 <= self.ema < 1, "--ema", "must be a decay in [0, 1) (0 = off)"),
            (0 < self.val_every <= 1e6, "--val-every", "must be > 0 (a fraction of an epoch)"),
            (self.keep_checkpoints >= 0, "--keep-checkpoints", "must be >= 0 (0 = none)"),
            (self.workers >= 0, "--workers", "must be >= 0"),
            (self.precision in ("auto", "bf16", "fp16", "fp32"), "--precision", "must be auto, bf16, fp16 or fp32"),
            (self.nonfinite in ("stop", "skip"), "--nonfinite", "must be stop or skip"),
            (self.progress_every > 0, "--progress-every", "must be > 0 seconds"),
        ]
        for ok, name, what in checks:
            if not ok:
                raise ChxError(f"{name} {getattr(self, name[2:].replace('-', '_'), '')} {what}")


@dataclass
class BackboneOptions:
    """Model and data options of stage 1 (paper defaults)."""

    model: str = option(DEFAULT_BACKBONE, "Any timm ConvNeXt name (e.g. convnext_atto for a quick CPU run).")
    size: int = option(1024, "Input size in pixels (square).", min=32)
    resize: str = option("letterbox", "Keep the aspect ratio and pad (letterbox) or stretch (squash, the "
                                      "reference's way).", choices=RESIZE_MODES)
    pretrained: bool = option(True, "Start from timm's pretrained weights (needs the network once).")
    weights: str | None = option(None, "Local timm/safetensors weights file to start from (offline "
                                       "alternative to --pretrained).", path="file", exists=True)
    balance: bool = option(True, "Class-aware balanced sampling (round-robin over classes).")
    tta: bool = option(True, "Validation with the mean of the image and its horizontal flip.")
    grad_checkpointing: bool = option(False, "Trade compute for memory (large inputs on GPU).", switch=False,
                                      on_resume="free")
    eval_batch_size: int = option(16, "Batch size of validation.", min=1, on_resume="free")
    soft_targets: str = option("expected", SOFT_TARGETS_HELP, choices=SOFT_TARGETS)
    head: str = option("ml-decoder", "Classification head: ML-Decoder (CheXFusion's), CSRA (class-specific "
                                     "residual attention) or linear (average pooling + linear).",
                       choices=HEADS)   # chx.models.heads.HEADS (a test keeps them equal)
    csra_heads: int = option(1, "CSRA heads: 1, 2, 4, 6 or 8 (the paper's temperature sets).")
    csra_lambda: float = option(0.1, "CSRA: weight of the attention pooling.", min=0)
    loss: str = option("wasl", "Loss: weighted ASL (CheXFusion's), ASL, distribution-balanced (DB) or BCE.",
                       choices=LOSSES)  # chx.losses.LOSSES (a test keeps them equal)
    clahe: bool = option(False, "CLAHE augmentation (p 0.5, clip limit 1-4).")
    coarse_dropout: float = option(0.0, "Coarse dropout augmentation: 1-8 black squares of this fraction of "
                                        "the side (p 0.5); 0 = off.", min=0, max=0.5, metavar="FRACTION")
    augment_on: str = _augment_on()


@dataclass
class FusionOptions:
    """Model and data options of stage 2 (paper defaults; D = C when ``dim`` is None)."""

    max_views: int = option(4, "View slots per study (more views: a random subset in training, a fixed "
                               "choice at evaluation).", min=1)
    encoder_layers: int = option(2, "Transformer encoder layers (0: ML-Decoder directly on the projected "
                                    "tokens).", min=0)
    dim: int | None = option(None, "Token width D.  [default: the store's channels C]", min=8)
    heads: int = option(8, "Attention heads.", min=1)
    ffn_dim: int = option(2048, "Feed-forward width.", min=1)
    dropout: float = option(0.1, "Dropout.")
    pos_enc: bool = option(True, "2-D positional encoding per view.")
    segment_embedding: bool = option(True, "Learnable embedding of each view slot.")
    view_embedding: bool = option(False, "Learnable embedding of the view type (frontal, lateral, other).")
    view_experts: bool = option(False, "One projection (the 3x3 stride-2 conv) per view type (frontal, "
                                       "lateral, other); each view goes through its own type's projection "
                                       "only.")
    experts: int = option(0, "A mixture of this many projections, mixed with weights learned per view type "
                             "(0 = off: one shared projection; >= 2; not with --view-experts).", min=0)
    flip_aug: bool = option(True, "Use the store's flipped maps for a random half of the training studies "
                                  "(stores made with --flip).")
    shuffle: bool = option(True, SHUFFLE_HELP)
    balance: bool = option(False, "Class-aware sampling of studies.")
    eval_batch_size: int = option(16, "Studies per validation batch.", min=1, on_resume="free")
    soft_targets: str = option("expected", SOFT_TARGETS_HELP, choices=SOFT_TARGETS)
    buffer_shards: int = option(4, "Streaming (--preload off): each epoch shuffles the store's shards, then "
                                   "the studies within buffers of this many shards, so every shard is read "
                                   "once per epoch.", min=1)
    preload: str = option("auto", "Where the split's features are held: ram, gpu (batches gathered on the "
                                  "GPU), off (streamed from the store, whole shards at a time); auto: gpu "
                                  "when they fit in half its free memory, else ram when they fit in half the "
                                  "available memory, else off.", choices=PRELOAD, on_resume="free")

    def validate(self) -> None:
        if self.max_views < 1:
            raise ChxError(f"--max-views {self.max_views}: must be >= 1")
        if self.encoder_layers < 0:
            raise ChxError(f"--encoder-layers {self.encoder_layers}: must be >= 0")
        if not 0 <= self.dropout < 1:
            raise ChxError(f"--dropout {self.dropout}: must be in [0, 1)")
        if self.preload not in ("auto", "ram", "gpu", "off", "on"):
            raise ChxError(f"--preload {self.preload}: use auto, ram, gpu or off")
        if self.buffer_shards < 1:
            raise ChxError(f"--buffer-shards {self.buffer_shards}: must be >= 1")
        if self.experts == 1 or self.experts < 0:
            raise ChxError(f"--experts {self.experts}: must be 0 (off) or >= 2 (a mixture of experts)")
        if self.view_experts and self.experts:
            raise ChxError(f"--view-experts and --experts {self.experts} exclude each other: give one "
                           f"(hard routing by view type, or a mixture gated by the view type)")


@dataclass
class JointOptions:
    """Options of `chx train-joint`: the stage-1 backbone and the fusion model fine-tuned together
    from images (model architecture: the --backbone and --fusion checkpoints', or the fusion
    defaults above for a fresh fusion model)."""

    max_views: int | None = option(None, "View slots per study (more views: a random subset in training, a "
                                         "fixed choice at evaluation); with --fusion it must be that model's."
                                         "  [default: the --fusion model's, else "
                                         f"{FusionOptions.max_views}]", min=1)
    backbone_lr_mult: float = option(0.1, "The backbone's learning rate is --lr x this (the fusion model's is "
                                          "--lr); 0 keeps the backbone's weights fixed.", min=0)
    grad_checkpointing: bool = option(False, "Recompute the backbone's activations in the backward pass: less "
                                             "memory, more compute, the same losses.", on_resume="free")
    tta: bool = option(True, "Validation (and the exported bundle) with the mean of the views and their "
                             "horizontal flips.")
    shuffle: bool = option(True, SHUFFLE_HELP)
    balance: bool = option(False, "Class-aware sampling of studies.")
    eval_batch_size: int = option(16, "Studies per validation batch.", min=1, on_resume="free")
    soft_targets: str = option("expected", SOFT_TARGETS_HELP, choices=SOFT_TARGETS)
    augment_on: str = _augment_on()

    def validate(self) -> None:
        if self.max_views is not None and self.max_views < 1:
            raise ChxError(f"--max-views {self.max_views}: must be >= 1")
        if self.backbone_lr_mult < 0:
            raise ChxError(f"--backbone-lr-mult {self.backbone_lr_mult}: must be >= 0 (0 freezes the "
                           f"backbone)")


def _shard() -> Field:   # extract-features and cache-images
    return option(None, "Fill only this writer's shards (shard % N == I; run N processes at once; Zarr only). "
                        "auto: from a SLURM array task (SLURM_ARRAY_TASK_ID/_COUNT) or torchrun "
                        "(RANK/WORLD_SIZE). Under torchrun the rank is used anyway.", metavar="I/N|auto")


@dataclass
class ExtractOptions:
    """Options of `chx extract-features` (stage 2a)."""

    pool: int = option(1, "Average-pool K x K before storing (2 -> a quarter of the size).")
    flip: bool = option(False, "Also store the horizontally flipped image's maps (TTA, augmentation).",
                        switch=False)
    batch_size: int = option(16, "Batch size.", min=1)
    workers: int = option(2, "DataLoader workers decoding images while the model runs.", min=0)
    device: str = option("auto", "auto, cpu or cuda.")
    precision: str = option("auto", "Arithmetic of the backbone's forward on a GPU: auto (bf16 if supported, "
                                    "else fp16), bf16, fp16 or fp32 (1.7x slower end to end on an H200); the "
                                    "CPU always runs fp32. Recorded in the store; predict repeats it (ONNX "
                                    "exports run fp32).",
                            choices=("auto", "bf16", "fp16", "fp32"))
    shard: str | None = _shard()
    compress: bool = option(False, "Compress the maps in a new store (Zarr: zstd; HDF5: lzf). Float16 maps "
                                   "barely compress (~1.09x) and it slows writing and reading; worth it only "
                                   "where bytes cost more than time.")
    dtype: str = option("float16", "How maps are stored: float16; bfloat16; float8 (e4m3 with a per-image, "
                                   "per-channel scale: half the bytes, error <= 1/16 of the channel's max). "
                                   "Reads give float16.", choices=DTYPES)
    shard_images: int | None = option(None, "Images per shard object.  [default: from the map size: ~256 MiB, "
                                            "64-512 images]", min=1)
    repair: bool = option(False, "Verify the store (checksums, missing objects) and extract its damaged shards "
                                 "again.", switch=False)
    overwrite: bool = option(False, "Replace a store made by another checkpoint/options (only a store chx made: "
                                    "anything else at that path is refused, never deleted).", switch=False)

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ChxError(f"--dtype {self.dtype}: use {', '.join(DTYPES[:-1])} or {DTYPES[-1]}")
        if self.shard_images is not None and self.shard_images < 1:
            raise ChxError(f"--shard-images {self.shard_images}: must be >= 1")
        if self.pool < 1:
            raise ChxError(f"--pool {self.pool}: must be >= 1 (1 = no pooling)")
        if self.batch_size < 1:
            raise ChxError(f"--batch-size {self.batch_size}: must be >= 1")
        if self.workers < 0:
            raise ChxError(f"--workers {self.workers}: must be >= 0")


@dataclass
class ExtractInputs:
    """The model, images and store of `chx extract-features`."""

    checkpoint: Path = option(None, "Stage-1 checkpoint (best.pt of train-backbone); its preprocessing is "
                                    "reused.", required=True, path="any")
    manifest: Path = option(None, "Manifest of the images.", required=True, path="any")
    images: Path | None = option(None, f"Images root of the manifest.{RECORDED_ROOT}", path="dir", exists=True)
    store: str = option(None, "Feature store: a folder (Zarr v3, default; or an fsspec URL like memory://x) or "
                              "a file ending .h5 (HDF5, one writer).", required=True)


@dataclass
class DemoConfig:
    """Options of `chx demo` (the synthetic data and both stages' training)."""

    studies: int = option(1000, "Synthetic studies to generate.", min=50)
    size: int = option(128, "Image size in pixels.", min=32)
    model: str = option("convnext_atto", "timm ConvNeXt for stage 1.")
    backbone_epochs: float = option(4, "Stage-1 epochs.")
    backbone_lr: float = option(1e-3, "Stage-1 learning rate (from scratch: higher than the paper's "
                                      "fine-tuning 3e-5).")
    fusion_epochs: float = option(30, "Stage-2 epochs.")
    fusion_lr: float = option(3e-4, "Stage-2 learning rate.")
    batch_size: int = 16
    workers: int = option(2, "DataLoader workers.", min=0)
    seed: int = option(0, "Seed of data, splits and training.")
    views: int = option(3, "Most views per synthetic study: 3, the standard demo; 4, the 4-view variant (see "
                           "make-demo-data).", min=3, max=4)


@dataclass
class ImagesCacheOption:
    """``--images-cache`` of every command that reads the images of a manifest."""

    images_cache: str | None = option(None, "Image cache from `chx cache-images` (the model's --size and --resize): "
                                            "read the images from it instead of the original files (the same "
                                            "tensors, exactly; the files are then not needed, except for "
                                            "explain's figures and ensemble members of another size).",
                                      metavar="PATH",
                                      on_resume="free")


def resume_rule(rule: str, classes=None) -> set[str]:
    """The options declared ``on_resume=rule`` (``free`` or ``applied``) in ``classes`` (default:
    the training option classes)."""
    classes = classes or (TrainConfig, BackboneOptions, FusionOptions, JointOptions, ImagesCacheOption)
    return {f.name for cls in classes for f in option_fields(cls) if option_meta(f)["on_resume"] == rule}
