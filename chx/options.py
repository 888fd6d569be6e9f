"""Every option of every command, declared once: its default, help, choices, bounds and flag form.

Plain dataclasses without torch or click, so `chx --help` stays fast. A field declared with
:func:`option` is a command-line option: the CLI builds its click option from the field
(``chx.cli.options.options``), a config file (``--config``) is checked against it, the stages take
these objects, and a run folder's config.json records them (the model card reads them back). A
field declared without :func:`option` is internal (not on the command line).

Adding an option is one step: a field with :func:`option` in the dataclass of its command.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path

from chx.errors import ChxError
from chx.store._codec import FEATURE_DTYPES as DTYPES   # feature maps' dtypes (torch-free; chx.store loads zarr)


def option(default=MISSING, help: str = "", *, flag: str | None = None, short: str | None = None,
           switch: bool = True, choices: tuple[str, ...] | None = None, min: float | None = None,
           max: float | None = None, path: str | None = None, exists: bool = False,
           multiple: bool = False, required: bool = False, metavar: str | None = None,
           show_default: bool = True, on_resume: str | None = None) -> Field:
    """A dataclass field that is a command-line option (all plain data, in the field's metadata).

    ``flag``: the long option when it is not ``--field-name``; ``short``: e.g. ``-o``; ``switch``:
    a bool is ``--x/--no-x`` (True) or a bare ``--x`` flag (False); ``choices``, ``min``/``max``
    (inclusive bounds): what a value may be; ``path``: ``file``, ``dir`` or ``any`` for a path
    option (with ``exists``: it must exist); ``multiple``: repeatable (a tuple); ``on_resume``
    (train-*): ``free`` may change on --resume, ``applied`` changes with a warning."""
    meta = {"help": help, "flag": flag, "short": short, "switch": switch,
            "choices": tuple(choices) if choices is not None else None, "min": min, "max": max,
            "path": path, "exists": exists, "multiple": multiple, "required": required,
            "metavar": metavar, "show_default": show_default, "on_resume": on_resume}
    if multiple and default is MISSING:
        default = ()
    return field(default=default, metadata={"chx_option": meta})


def option_meta(f: Field) -> dict | None:
    """The :func:`option` declaration of a dataclass field; None for an internal field."""
    return f.metadata.get("chx_option")


def option_fields(cls) -> list[Field]:
    """The fields of ``cls`` that are command-line options, in declaration order."""
    return [f for f in fields(cls) if option_meta(f) is not None]


def choices_of(cls, name: str) -> tuple[str, ...] | None:
    """The declared choices of option ``name`` of ``cls``."""
    return next(option_meta(f)["choices"] for f in option_fields(cls) if f.name == name)


def resume_rule(rule: str, classes=None) -> set[str]:
    """The options declared ``on_resume=rule`` (``free`` or ``applied``) in ``classes`` (default:
    the training option classes)."""
    classes = classes or (TrainConfig, BackboneOptions, FusionOptions, JointOptions, ImagesCacheOption)
    return {f.name for cls in classes for f in option_fields(cls) if option_meta(f)["on_resume"] == rule}

DEFAULT_BACKBONE = "convnext_small.fb_in22k_ft_in1k"   # the paper's stage-1 backbone
# Choice lists whose owners import torch (chx.models.heads, chx.losses, chx.data.study_dataset,
# chx.data.transforms): spelled here so `--help` needs no torch; tests/test_cli_options.py keeps
# them equal to the owners'.
HEADS = ("ml-decoder", "csra", "linear")
LOSSES = ("wasl", "asl", "db", "bce")
PRELOAD = ("auto", "ram", "gpu", "off")    # and the hidden alias "on" (older runs' config.json)
RESIZE_MODES = ("letterbox", "squash")
SOFT_TARGETS = ("expected", "reference")
SOFT_TARGETS_HELP = ("The loss on soft (pseudo) labels: expected (linear in the label: the expected loss of a "
                     "hard label drawn with that probability) or reference (the CheXFusion code's formula, "
                     "which sharpens pseudo labels). Equal on 0/1 labels.")
SHUFFLE_HELP = "Random view order in training (order must carry no information)."
RECORDED_ROOT = "  [default: the root `chx prepare --images` recorded in the manifest]"
AUGMENT_ON = ("auto", "workers", "device")    # chx.data.batch_augment.augment_on_device


def _augment_on() -> Field:   # train-backbone (a function, so that train-joint can take it too)
    return option("auto", "Where the stage-1 training augmentation runs: workers (image by image in the "
                          "DataLoader workers, on the CPU) or device (batched on the training device; the "
                          "workers only read and resize); the same distributions. auto: device on CUDA, "
                          "else workers.", choices=AUGMENT_ON, on_resume="free")


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


# ------------------------------------------------------------------------------------------------------
# The inputs and outputs of each command (files, folders, --overwrite), declared like the options above.
# Declarations several commands share are the functions below (a dataclass field cannot be shared).


def _images(of: str = "the manifest") -> Field:
    return option(None, f"Images root of {of}.{RECORDED_ROOT}", path="dir", exists=True)


def _overwrite(help: str) -> Field:
    return option(False, help, switch=False)


def _out(default, help: str, path: str = "any", required: bool = False) -> Field:
    return option(default, help, short="-o", path=path, required=required)


def _run_folder(default: str) -> Field:
    return _out(Path(default), "Run folder: config.json, metrics.jsonl, last.pt, best.pt.", path="dir")


def _batch_size(default: int = 16, help: str = "Batch size.") -> Field:
    return option(default, help, min=1)


def _workers(default: int = 2, help: str = "DataLoader workers.") -> Field:
    return option(default, help, min=0)


def _device() -> Field:
    return option("auto", "auto, cpu or cuda.")


def _required(help: str, kind: type = Path) -> Field:
    return option(None, help, required=True, path="any" if kind is Path else None)


GROUPS = ("prevalence", "thirds", "cxr-lt")    # chx.metrics.group_indices; DEFAULT_GROUPS first
BOOTSTRAP_RESAMPLES = 1000                      # chx.metrics.BOOTSTRAP_RESAMPLES (a test keeps them equal)


def _groups() -> Field:
    return option(GROUPS[0], "Head/medium/tail classes: prevalence: head > 10 %, tail < 1 % training "
                             "prevalence (CXR-LT 2024's rule, any class list; the rule chx prepare reports and "
                             "training validation uses); thirds: thirds of the training-frequency rank; "
                             "cxr-lt: CXR-LT 2023's 8/10/8 of its 26 classes.", choices=GROUPS)


def _bootstrap() -> Field:
    return option(BOOTSTRAP_RESAMPLES, "Resamples of the evaluated studies (images for a backbone) for the "
                                       "95 % mAP intervals (fixed seed; paired for differences); 0: no "
                                       "intervals.", min=0)


@dataclass
class PrepareOptions:
    """Options of `chx prepare` (besides --classes and the adapters' own: chx.data.adapters)."""

    out: Path | None = _out(None, "Manifest to write (.parquet, or .csv).  [default: DATASET.parquet]",
                            path="file")
    images: Path | None = option(None, "Images root: find each image under it and store its path relative to "
                                       "it; says how many were found, and fails when none is.",
                                 path="dir", exists=True)
    only_existing: bool = option(False, "With --images: drop rows whose image file is not under the root.",
                                 switch=False)
    val_fraction: float = option(0.0, "Fraction of patients for validation (split by patient, rare classes "
                                      "kept in each split).")
    test_fraction: float = option(0.0, "Fraction of patients for test.")
    seed: int = option(0, "Seed of the split.")
    overwrite: bool = _overwrite("Replace an existing -o manifest (checkpoints and stores made from it record "
                                 "its hash).")


@dataclass
class RunControl:
    """How a train-* command treats its run folder."""

    resume: bool = option(False, "Continue the run in --out from its last.pt, exactly: `--resume -o RUN` reads "
                                 "the run's options from RUN/config.json (options given must be the run's).",
                          switch=False)
    overwrite: bool = _overwrite("Start again in an --out that already holds a run.")


@dataclass
class TrainBackboneInputs:
    """The data and run folder of `chx train-backbone`."""

    manifests: tuple[Path, ...] = option(help="Manifest(s); repeat to train on their union (e.g. with a "
                                              "pseudo-labelled one). Rows with split 'train' or no split "
                                              "train; split 'val' validates.",
                                         flag="--manifest", multiple=True, required=True, path="any")
    images: tuple[Path, ...] = option(help="Images root; once for all manifests or once per --manifest.  "
                                           "[default: the root `chx prepare --images` recorded in each "
                                           "manifest]", multiple=True, path="any")
    out: Path = _run_folder("runs/backbone")


@dataclass
class TrainFusionInputs:
    """The store and run folder of `chx train-fusion`."""

    store: str = option(None, "Complete feature store from extract-features.", required=True)
    out: Path = _run_folder("runs/fusion")


@dataclass
class TrainJointInputs:
    """The data, starting models and run folder of `chx train-joint`."""

    manifest: Path = _required("Manifest of the images; split 'train' (or none) trains, 'val' validates (per "
                               "study).")
    images: Path | None = option(None, f"Images root of the manifest.{RECORDED_ROOT}", path="any")
    backbone: Path = _required("Stage-1 checkpoint (best.pt of train-backbone) to start the backbone from; its "
                               "preprocessing is used.")
    fusion: Path | None = option(None, "Fusion checkpoint trained on that backbone's store to start the fusion "
                                       "model from (its architecture, view slots and the store's pooling).  "
                                       "[default: a fresh fusion model with train-fusion's defaults, on "
                                       "unpooled maps]", path="any")
    out: Path = _run_folder("runs/joint")


@dataclass
class PseudoLabelOptions:
    """Options of `chx pseudo-label`."""

    checkpoint: Path = _required("Stage-1 checkpoint (best.pt of train-backbone).")
    manifest: Path = _required("Manifest to fill, prepared onto the checkpoint's classes (e.g. NIH onto "
                               "CXR-LT's 26).")
    images: Path | None = _images("that manifest")
    out: Path = _out(None, "Manifest to write, with null labels replaced by probabilities.", path="file",
                     required=True)
    tta: bool = option(True, "Mean of the image and its hflip.")
    batch_size: int = _batch_size()
    workers: int = _workers()
    device: str = _device()


@dataclass
class EvaluateOptions:
    """Options of `chx evaluate`."""

    checkpoint: Path | None = option(None, "A backbone, fusion or joint (train-joint) checkpoint (best.pt).",
                                     path="any")
    store: str | None = option(None, "Feature store (for a fusion checkpoint).")
    manifest: Path | None = option(None, "Manifest (for a backbone or joint checkpoint), with --images.",
                                   path="any")
    images: Path | None = _images("--manifest")
    split: str = option("test", "Split to evaluate.")
    thresholds_from: str = option("val", "Split on which per-class F1 thresholds are tuned (max F1); 'none' "
                                         "= 0.5.")
    groups: str = _groups()
    bootstrap: int = _bootstrap()
    views: str = option("all", "Fusion and joint checkpoints: keep only these views of each study (robustness "
                               "to a missing view).", choices=("all", "frontal", "lateral"))
    out: Path | None = _out(None, "Report folder: metrics.json, per_class.csv, summary.md, plots.  [default: "
                                  "eval-SPLIT]", path="dir")
    compare_runs: tuple[Path, ...] = option(help="Instead: print one side-by-side table of report folders: "
                                                 "--compare eval-f eval-b.", flag="--compare", multiple=True,
                                            path="any")
    overwrite: bool = _overwrite("Replace an existing report folder -o.")
    absent_classes: str = option("skip", "Classes without a positive in the split: left out of the macro means "
                                         "(skip), or counted as AP 0 (zero: what the reference code's "
                                         "torchmetrics mAP does; for comparison).", choices=("skip", "zero"))
    batch_size: int = _batch_size()
    workers: int = _workers()


@dataclass
class CompareOptions:
    """Options of `chx compare`."""

    backbone: Path = _required("Stage-1 checkpoint.")
    fusion: Path = _required("Fusion checkpoint trained on that backbone's store.")
    manifest: Path = _required("Manifest of the images.")
    images: Path | None = _images()
    store: str = option(None, "The feature store the fusion model was trained on.", required=True)
    split: str = option("val", "Split to compare on.")
    groups: str = _groups()
    bootstrap: int = _bootstrap()
    out: Path | None = _out(None, "Also write the table (Markdown) and the full results (same name, .json) "
                                  "here.", path="file")
    overwrite: bool = _overwrite("Replace an existing -o table (and its .json) that chx compare wrote.")
    batch_size: int = _batch_size()
    workers: int = _workers()


EXPORT_FORMATS = ("bundle", "hf", "onnx")


@dataclass
class ExportOptions:
    """Options of `chx export`."""

    backbone: Path | None = option(None, "Stage-1 checkpoint.", path="any")
    fusion: Path | None = option(None, "Fusion checkpoint trained on that backbone's features.", path="any")
    joint: Path | None = option(None, "Instead of --backbone and --fusion: a train-joint checkpoint (it holds "
                                      "both).", path="any")
    fmt: str = option("bundle", "bundle: one file; hf: a Hugging Face folder (model.safetensors, config.json "
                                "and a generated model card README.md); onnx: backbone.onnx and fusion.onnx "
                                "(dynamic batch and views, checked against torch) with config.json, for "
                                "--runtime onnxruntime (needs pip install 'chx[onnx]').", flag="--format",
                      choices=EXPORT_FORMATS)
    out: Path | None = _out(None, "File (bundle) or folder (hf, onnx) to write.  [default: model.chx, model-hf "
                                  "or model-onnx]")
    overwrite: bool = _overwrite("Replace an existing -o file or folder.")


@dataclass
class EnsembleOptions:
    """Options of `chx ensemble` (besides the MEMBER arguments)."""

    out: Path = _out(None, "Ensemble bundle folder to write (ensemble.json and a copy of every member).",
                     path="dir", required=True)
    weights: str | None = option(None, "One positive weight per member, in their order (normalised): --weights "
                                       "2,1,1.  [default: equal]", metavar="LIST")
    from_run: Path | None = option(None, "Instead of MEMBER paths: the last --last validation checkpoints of this "
                                         "run folder (trained with --keep-checkpoints).", path="dir")
    last: int | None = option(None, "With --from-run: how many of its last validation checkpoints.  [default: 1]",
                              min=1)
    backbone: Path | None = option(None, "With --from-run of a fusion run: the stage-1 checkpoint its store was "
                                         "extracted with.", path="any")
    overwrite: bool = _overwrite("Replace an existing -o ensemble folder.")


@dataclass
class ImportReferenceOptions:
    """Options of `chx import-reference` (besides the checkpoint argument)."""

    kind: str = option(None, "backbone: the reference's stage-1 model; fusion: its FusionBackbone.",
                       choices=("backbone", "fusion"), required=True)
    classes: str = option(None, "The class names the reference model was trained on, in its order: "
                                "'cxr-lt-2023', a comma-separated list or a file with one class per line.",
                          required=True, metavar="LIST")
    backbone_name: str = option(DEFAULT_BACKBONE, "timm name of its backbone (the paper's by default).",
                                flag="--backbone")
    out: Path = _out(None, "chx checkpoint to write.", path="file", required=True)
    overwrite: bool = _overwrite("Replace an existing -o file.")


@dataclass
class MakeDemoDataOptions:
    """Options of `chx make-demo-data` (besides the OUT argument)."""

    studies: int = option(1000, "Number of studies.", min=10)
    seed: int = option(0, "Seed (same seed, same files).")
    size: int = option(160, "Image size in pixels.", min=32)
    views: int = option(DemoConfig.views, "Most views per study: 3, the standard demo; 4, the 4-view variant "
                                          "(PA, AP, LATERAL, LL; a one-view-type sign shows in one of the "
                                          "study's views of that type).", min=3, max=4)


@dataclass
class DemoInputs:
    """Where `chx demo` writes and, optionally, the data it runs on instead of synthetic data."""

    out: Path = _out(Path("demo-out"), "Folder for the data, runs, store and table (a demo folder is replaced; "
                                       "any other non-empty folder is refused).", path="dir")
    manifest: Path | None = option(None, "Run on this manifest instead of synthetic data (splits "
                                         "train/val[/test]).", path="file", exists=True)
    images: Path | None = _images("--manifest")


# predict and explain: the models and the studies they read.

def _backbone() -> Field:
    return option(None, "Stage-1 checkpoint (instead of --bundle, with --fusion).", path="any")


def _fusion() -> Field:
    return option(None, "Fusion checkpoint.", path="any")


def _studies() -> Field:
    return option(None, "A folder holding one sub-folder of images (PNG, JPEG, DICOM) per study.",
                  flag="--studies", path="any")


def _files() -> Field:
    return option(help="Image files of ONE study: --files a.dcm b.dcm (or repeat the option).", multiple=True,
                  path="any")


def _views() -> Field:
    return option(None, "The views of the --files images, one per file in the same order: --views PA,LATERAL "
                        "(PA, AP, LATERAL, LL, OTHER, or auto: the DICOM ViewPosition, else a view word of the "
                        "file name). [default: auto]", metavar="LIST")


def _study_id() -> Field:
    return option("study", "Study id of the --files study.")


def _inputs_manifest() -> Field:
    return option(None, "A manifest (labels not needed) listing the images, their studies and views.", path="any")


@dataclass
class PredictOptions:
    """Options of `chx predict` (besides the --files words after the option)."""

    bundle: Path | None = option(None, "File or folder from `chx export` (--format bundle or hf; onnx with "
                                       "--runtime onnxruntime).", path="any")
    backbone: Path | None = _backbone()
    fusion: Path | None = _fusion()
    joint: Path | None = option(None, "A train-joint checkpoint (it holds both models; instead of --bundle).",
                                path="any")
    studies_dir: Path | None = _studies()
    files: tuple[Path, ...] = _files()
    views: str | None = _views()
    study_id: str = _study_id()
    manifest: Path | None = _inputs_manifest()
    images: Path | None = _images("--manifest")
    split: str | None = option(None, "Only the --manifest studies of this split (e.g. test).  [default: every "
                                     "split]")
    batch_size: int = _batch_size(help="Images per backbone step and studies per fusion step (studies are "
                                       "batched together).")
    workers: int = _workers(help="DataLoader workers decoding images.")
    out: Path = _out(Path("predictions.csv"), "Output file (.csv, .parquet or .json).", path="file")
    fmt: str | None = option(None, "csv/json/parquet: one row per study; cxr-lt: the CXR-LT 2023/2024 "
                                   "submission, one row per image (dicom_id = image_id) with its study's "
                                   "probabilities, joined by study id; cxr-lt-2026: the same keyed by ImageID (the "
                                   "image's file name), 30 classes.  [default: from the -o suffix: .json, "
                                   ".parquet, else csv]", flag="--format",
                             choices=("csv", "json", "parquet", "cxr-lt", "cxr-lt-2026"))
    device: str = _device()
    runtime: str = option("torch", "torch, or onnxruntime: the graphs of `chx export --format onnx` (--bundle "
                                   "DIR) on the CPU, the same preprocessing (needs pip install 'chx[onnx]').",
                          choices=("torch", "onnxruntime"))
    explain_out: Path | None = option(None, "Also write explanations into this folder, as `chx explain` does: one "
                                            "PNG per study (its top findings' attention on each view), "
                                            "explain.json and index.html.", flag="--explain", path="dir")
    overwrite: bool = _overwrite("Replace an existing -o file (and --explain folder).")


@dataclass
class ExplainOptions:
    """Options of `chx explain` (top_k also of `chx predict --explain`)."""

    bundle: Path | None = option(None, "File from `chx export`: maps of the fusion model's attention over all "
                                       "views.", path="any")
    backbone: Path | None = _backbone()
    fusion: Path | None = _fusion()
    checkpoint: Path | None = option(None, "A stage-1 checkpoint alone (instead of the fusion models): "
                                           "single-image maps, each image with its own probabilities.", path="any")
    studies_dir: Path | None = _studies()
    files: tuple[Path, ...] = _files()
    views: str | None = _views()
    study_id: str = _study_id()
    manifest: Path | None = _inputs_manifest()
    images: Path | None = _images("--manifest")
    split: str | None = option(None, "Only the --manifest images of this split (e.g. test).")
    limit: int | None = option(None, "Only the first N studies.", min=1)
    top_k: int = option(4, "Rows of each figure: the study's most probable findings.", min=1)
    classes: str | None = option(None, "Comma-separated class names to show (in this order) instead of the "
                                       "top-k.", metavar="LIST")
    method: str = option("attention", "attention: the ML-Decoder head's cross-attention (one map per finding); "
                                      "grad-cam: Grad-CAM on the last feature map (with --checkpoint only).",
                         choices=("attention", "grad-cam"))
    out: Path = _out(Path("explanations"), "Output folder: one PNG per study, explain.json, index.html.",
                     path="dir")
    device: str = _device()
    overwrite: bool = _overwrite("Replace an existing -o folder.")


@dataclass
class ImagesCacheOption:
    """``--images-cache`` of every command that reads the images of a manifest."""

    images_cache: str | None = option(None, "Image cache from `chx cache-images` (the model's --size and --resize): "
                                            "read the images from it instead of the original files (the same "
                                            "tensors, exactly; the files are then not needed).", metavar="PATH",
                                      on_resume="free")


@dataclass
class CacheImagesOptions:
    """Options of `chx cache-images`."""

    manifest: Path = _required("Manifest of the images to cache (readers look them up by image_id: a cache of "
                               "all rows serves every split).")
    images: Path | None = _images()
    out: str = _out(None, "Image cache: a folder (Zarr v3, default; or an fsspec URL) or a file ending .h5 "
                          "(HDF5, one writer).", required=True)
    size: int | None = option(None, "Side the images are resized to: the model's --size.  [default: the "
                                    "--checkpoint's]", min=1)
    resize: str | None = option(None, "The model's --resize.  [default: the --checkpoint's, else letterbox]",
                                choices=RESIZE_MODES)
    checkpoint: Path | None = option(None, "Take --size and --resize from this checkpoint's preprocessing.",
                                     path="any")
    batch_size: int = _batch_size(32, "Images per batch from the decoding workers.")
    workers: int = _workers(2, "DataLoader workers decoding images.")
    shard: str | None = _shard()
    shard_images: int | None = option(None, "Images per shard object.  [default: ~256 MiB, 64-512 images]", min=1)
    compress: bool = option(False, "Compress the images losslessly (Zarr: zstd; HDF5: lzf) in a new cache.",
                            switch=False)
    repair: bool = option(False, "Verify the cache (checksums, missing objects) and decode its damaged shards "
                                 "again.", switch=False)
    overwrite: bool = _overwrite("Replace a cache of another size, resize mode or manifest (only a store chx "
                                 "made: anything else at that path is refused, never deleted).")
