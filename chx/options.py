"""Every option of the stages and its default, in one place (the paper's defaults where it has one).

Plain dataclasses without torch, so `chx --help` stays fast: the CLI takes its defaults from here,
the stages take these objects, and a run folder's config.json records them.
"""

from __future__ import annotations

from dataclasses import dataclass

from chx.errors import ChxError

DEFAULT_BACKBONE = "convnext_small.fb_in22k_ft_in1k"   # the paper's stage-1 backbone


@dataclass
class TrainConfig:
    """Optimisation options (paper defaults: AdamW 3e-5, wd 0.01, batch 8, 4 validations/epoch)."""

    epochs: float = 6.0
    batch_size: int = 8
    lr: float = 3e-5
    weight_decay: float = 0.01
    warmup: float = 0.05          # fraction of all optimizer steps
    min_lr_ratio: float = 0.01    # cosine ends at lr * min_lr_ratio
    grad_accum: int = 1
    clip_grad: float = 1.0        # max grad norm; 0 = off
    precision: str = "auto"       # auto (bf16/fp16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    ema: float = 0.0              # EMA decay; 0 = off
    val_every: float = 0.25       # validate every this fraction of an epoch
    seed: int = 0
    workers: int = 2
    max_steps: int = 0            # stop after this many optimizer steps (0 = all); schedule unchanged
    log_every: int = 10
    nonfinite: str = "stop"       # stop | skip: what a NaN/inf loss does
    device: str = "auto"
    progress_every: float = 30.0  # seconds between progress lines when stderr is not a terminal
    tensorboard: bool = False     # also write loss, lr and validation metrics as TensorBoard scalars

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

    model: str = DEFAULT_BACKBONE
    size: int = 1024
    resize: str = "letterbox"
    pretrained: bool = True
    weights: str | None = None
    balance: bool = True
    tta: bool = True
    grad_checkpointing: bool = False
    eval_batch_size: int = 16
    soft_targets: str = "expected"   # expected | reference: the loss on soft (pseudo) labels
    head: str = "ml-decoder"     # ml-decoder | csra | linear (chx.models.heads)
    csra_heads: int = 1          # CSRA: 1, 2, 4, 6 or 8 heads (the paper's temperature sets)
    csra_lambda: float = 0.1     # CSRA: weight of the class-specific attention pooling
    loss: str = "wasl"           # wasl | asl | db | bce (chx.losses)
    clahe: bool = False          # CLAHE augmentation (p 0.5, clip limit 1-4, 8 x 8 tiles)
    coarse_dropout: float = 0.0  # hole side as a fraction of the image side (1-8 holes, p 0.5); 0 = off


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
    view_experts: bool = False   # one projection per view type (frontal, lateral, other), hard-routed
    experts: int = 0             # E >= 2: a mixture of E projections gated by the view type; 0 = off
    shuffle: bool = True
    balance: bool = False
    flip_aug: bool = True
    eval_batch_size: int = 16
    soft_targets: str = "expected"   # expected | reference: the loss on soft (pseudo) labels
    preload: str = "auto"        # auto | ram | gpu | off: where the store's features are held
    buffer_shards: int = 4       # streaming (preload off): studies are shuffled within this many shards

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

    max_views: int | None = None     # None: the --fusion model's, else FusionOptions.max_views
    backbone_lr_mult: float = 0.1    # the backbone trains at lr x this; the fusion model at lr
    grad_checkpointing: bool = False
    shuffle: bool = True             # random view order in training, as train-fusion
    balance: bool = False            # class-aware sampling of studies
    tta: bool = True                 # validation (and the exported bundle) with flip TTA
    eval_batch_size: int = 16        # studies per validation batch
    soft_targets: str = "expected"   # expected | reference: the loss on soft (pseudo) labels

    def validate(self) -> None:
        if self.max_views is not None and self.max_views < 1:
            raise ChxError(f"--max-views {self.max_views}: must be >= 1")
        if self.backbone_lr_mult < 0:
            raise ChxError(f"--backbone-lr-mult {self.backbone_lr_mult}: must be >= 0 (0 freezes the "
                           f"backbone)")


@dataclass
class ExtractOptions:
    """Options of `chx extract-features` (stage 2a)."""

    pool: int = 1                 # average-pool K x K before storing
    flip: bool = False            # also store the flipped image's maps
    batch_size: int = 16
    workers: int = 2
    device: str = "auto"
    shard: str | None = None      # "i/n": this process fills every n-th shard from i
    compress: bool = False
    overwrite: bool = False
    dtype: str = "float16"        # float16 | bfloat16 | float8 (e4m3 + per-channel scale: half the bytes)
    repair: bool = False          # re-extract the shards `chx store verify` finds damaged
    shard_images: int | None = None   # images per shard (None: from the map size, ~256 MiB)

    def validate(self) -> None:
        if self.dtype not in ("float16", "bfloat16", "float8"):
            raise ChxError(f"--dtype {self.dtype}: use float16, bfloat16 or float8")
        if self.shard_images is not None and self.shard_images < 1:
            raise ChxError(f"--shard-images {self.shard_images}: must be >= 1")
        if self.pool < 1:
            raise ChxError(f"--pool {self.pool}: must be >= 1 (1 = no pooling)")
        if self.batch_size < 1:
            raise ChxError(f"--batch-size {self.batch_size}: must be >= 1")
        if self.workers < 0:
            raise ChxError(f"--workers {self.workers}: must be >= 0")


@dataclass
class ExplainOptions:
    """Options of `chx explain` (and `chx predict --explain`)."""

    top_k: int = 4                # findings per study figure, by probability
    method: str = "attention"     # attention | grad-cam (grad-cam: stage-1 checkpoints only)


@dataclass
class DemoConfig:
    studies: int = 1000
    size: int = 128
    model: str = "convnext_atto"
    backbone_epochs: float = 4
    backbone_lr: float = 1e-3
    fusion_epochs: float = 30
    fusion_lr: float = 3e-4
    batch_size: int = 16
    workers: int = 2
    seed: int = 0
    views: int = 3          # synthetic data's most views per study: 3 standard, 4 the 4-view variant
