"""The `chx` command line. Thin: parses options and calls `chx.pipeline` functions.

User mistakes (:class:`chx.errors.ChxError`) print one line and exit with code 2, never a traceback.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from chx.errors import ChxError, Interrupted
from chx.workers import end_children
from chx.options import (BackboneOptions, DemoConfig, ExplainOptions, ExtractOptions, FusionOptions,
                         JointOptions, TrainConfig)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Group(click.Group):
    """Keeps commands in the order they were added (the pipeline's order) in --help."""

    def list_commands(self, ctx):
        return list(self.commands)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(package_name="chx")
def cli():
    """chx: CheXFusion-style multi-view, long-tailed chest X-ray classification.

    Stages run one after the other, each restartable:
    prepare -> train-backbone -> extract-features -> train-fusion -> evaluate / predict.
    """


# ----------------------------------------------------------------------------------------- prepare

def _with_adapters(f):
    """Put the adapter list (name and one line each) into the command's help, and add the options
    the adapters declare (each once, its help naming the adapters that take it)."""
    from chx.data.adapters import ADAPTERS, merged_options
    listing = "\n".join(f"      {name:<12} {a.summary}" for name, a in ADAPTERS.items())
    f.__doc__ = f.__doc__.replace("{adapters}", listing)
    for opt, owners in reversed(merged_options()):   # click lists the last-applied option first
        f = click.option(opt.flag, opt.name, **_adapter_option_kwargs(opt, owners))(f)
    return f


def _adapter_option_kwargs(opt, owners: list[str]) -> dict:
    """click.option keywords for a :class:`chx.data.adapters.AdapterOption`."""
    kw = dict(default=opt.default, multiple=opt.multiple, metavar=opt.metavar,
              show_default=opt.default_text or True, help=f"{', '.join(owners)}: {opt.help}")
    if opt.type is bool:
        return {**kw, "is_flag": True}
    if opt.choices:
        return {**kw, "type": click.Choice(opt.choices)}
    if opt.minimum is not None:
        return {**kw, "type": (click.IntRange if opt.type is int else click.FloatRange)(min=opt.minimum)}
    return {**kw, "type": opt.type}


def _classes_help() -> str:
    from chx.data.adapters import ADAPTERS
    from chx.data.classes import NAMED_CLASS_LISTS
    others = {}
    for name, a in ADAPTERS.items():
        if a.default_classes != "data":
            others.setdefault(a.default_classes, []).append(name)
    defaults = "".join(f"; {d} for {', '.join(names)}" for d, names in others.items())
    return (f"Target class list: a named list ({', '.join(NAMED_CLASS_LISTS)}), 'data' (the dataset's own "
            f"classes), a comma-separated list, or a file with one class per line.  "
            f"[default: data{defaults}]")


@cli.command(context_settings=CONTEXT, short_help="Native label files -> one manifest.")
@click.argument("dataset")
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Manifest to write (.parquet, or .csv).  [default: DATASET.parquet]")
@click.option("--classes", default=None, metavar="LIST", help=_classes_help())
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Images root: find each image under it and store its path relative to it; says "
                   "how many were found, and fails when none is.")
@click.option("--only-existing", is_flag=True,
              help="With --images: drop rows whose image file is not under the root.")
@click.option("--val-fraction", type=float, default=0.0, show_default=True,
              help="Fraction of patients for validation (split by patient, rare classes kept in each split).")
@click.option("--test-fraction", type=float, default=0.0, show_default=True,
              help="Fraction of patients for test.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing -o manifest (checkpoints and stores made from it record its hash).")
@_with_adapters
def prepare(dataset, sources, out, classes, images, only_existing, val_fraction, test_fraction,
            seed, overwrite, **adapter_options):
    """Turn a dataset's native label files into a chx manifest.

    DATASET is one of the adapters below; SOURCES are its label files (or folder). Classes are
    harmonised onto the target list; a class the dataset does not annotate is left empty (null),
    never 0. The options after --seed belong to the adapters named in their help.

    \b
    Datasets:
{adapters}

    \b
    Examples:
      chx prepare nih Data_Entry_2017_v2020.csv --images nih/ --val-fraction 0.1 -o nih.parquet
      chx prepare chexpert CheXpert-v1.0-small/train.csv --uncertain ignore -o chexpert.parquet
      chx prepare covid covid-cxr/metadata.csv --images covid-cxr/images --val-fraction 0.2
      chx prepare mimic-cxr mimic-cxr-2.0.0-chexpert.csv.gz mimic-cxr-2.0.0-metadata.csv.gz \\
          mimic-cxr-2.0.0-split.csv.gz --images mimic-cxr-jpg/ -o mimic.parquet
      chx prepare table hospital.csv --path-col file --study-col accession --patient-col mrn \\
          --positive yes --negative no --images dicoms/ --val-fraction 0.1 -o hospital.parquet
    """
    from chx.data.adapters import get_adapter, refuse_foreign_options
    from chx.pipeline.prepare import prepare as run_prepare

    adapter = get_adapter(dataset)  # unknown name -> one clear line
    ctx = click.get_current_context()
    typed = click.core.ParameterSource.COMMANDLINE
    refuse_foreign_options(dataset, [n for n in adapter_options if ctx.get_parameter_source(n) == typed])
    if only_existing and images is None:
        raise ChxError("--only-existing needs --images ROOT (the folder to look for the images in)")
    for src in sources:
        if not src.exists():
            raise ChxError(f"{src} does not exist; give the dataset's label file(s) or folder")
    out = out or Path(f"{dataset}.parquet")
    _refuse_existing(out, overwrite, "manifest", why="a new manifest (another --seed, another split) under models made "
                                         "from the old one invites patient leakage")
    s = run_prepare(dataset, list(sources), out, classes=classes, images=images,
                    only_existing=only_existing, val_fraction=val_fraction,
                    test_fraction=test_fraction, seed=seed,
                    options={o.name: adapter_options[o.name] for o in adapter.options})
    splits = ", ".join(f"{k if k != 'None' else 'unassigned'} {v:,}" for k, v in s["splits"].items())
    click.echo(f"wrote {out}: {s['images']:,} images, {s['studies']:,} studies "
               f"({s['multi_view_studies']:,} multi-view), {s['subjects']:,} patients, "
               f"{len(s['positives'])} classes; splits: {splits}")
    click.echo("views: " + ", ".join(f"{v} {n:,}" for v, n in s["views"].items()))
    for line in s["notes"]:
        click.echo(f"note: {line}")
    annotated = [c for c in s["positives"] if s["annotated"][c]]
    click.echo("positives (images): " + ", ".join(f"{c} {s['positives'][c]:,}" for c in annotated))
    if s["unannotated"]:
        hint = "" if (classes or adapter.default_classes) == "data" else \
            "; --classes data keeps only the dataset's own classes"
        click.echo(f"warning: {len(s['unannotated'])} of {len(s['positives'])} classes are annotated by no "
                   f"row of {dataset} (always null: a model cannot learn them): {', '.join(s['unannotated'])}"
                   f"{hint}", err=True)
    g = s["groups"]
    click.echo(f"groups by training prevalence (head > 10%, tail < 1%): head {len(g['head'])}, "
               f"medium {len(g['medium'])}, tail {len(g['tail'])}"
               + (f"; tail: {', '.join(g['tail'])}" if g["tail"] else ""))


# ----------------------------------------------------------------------------------------- training

def _opt(defaults, name: str, *decls: str, **kw):
    """A click option whose default is the dataclass field ``name`` of ``defaults`` (chx.options:
    the one table of defaults)."""
    flags = decls or (f"--{name.replace('_', '-')}",)
    return click.option(*flags, name, default=getattr(defaults, name), show_default=True, **kw)


def train_options(f):
    """Optimisation options shared by train-backbone and train-fusion (paper defaults)."""
    T = TrainConfig
    opts = [
        _opt(T, "epochs", type=float, help="Epochs (fractions allowed)."),
        _opt(T, "batch_size", type=int, help="Batch size per process."),
        _opt(T, "lr", type=float, help="AdamW peak learning rate."),
        _opt(T, "weight_decay", type=float, help="AdamW weight decay."),
        _opt(T, "warmup", type=float,
             help="Linear warm-up, as a fraction of all steps; then cosine decay (stepped per step)."),
        _opt(T, "min_lr_ratio", type=float, help="The cosine decay ends at lr x this."),
        _opt(T, "grad_accum", type=int, help="Batches accumulated per optimizer step."),
        _opt(T, "clip_grad", type=float, help="Max gradient norm (0 = no clipping)."),
        _opt(T, "precision", type=click.Choice(["auto", "bf16", "fp16", "fp32"]),
             help="Mixed precision on GPU (auto: bf16 if supported, else fp16 with a grad scaler); "
                  "CPU always runs fp32."),
        _opt(T, "ema", type=float,
             help="EMA decay of the weights used for validation and prediction (0 = off; e.g. 0.999)."),
        _opt(T, "val_every", type=float, help="Validate (and checkpoint) every this fraction of an epoch."),
        _opt(T, "seed", type=int, help="Seed of initialisation, order, augmentation."),
        _opt(T, "workers", type=int, help="DataLoader worker processes."),
        _opt(T, "max_steps", type=int,
             help="Stop after this many optimizer steps (0 = train all epochs); the schedule is unchanged."),
        _opt(T, "log_every", type=int, help="Write the training loss to metrics.jsonl every this many steps."),
        _opt(T, "progress_every", type=float,
             help="Seconds between progress lines (step, loss, items/s, ETA) when not on a terminal."),
        _opt(T, "nonfinite", type=click.Choice(["stop", "skip"]),
             help="On a NaN/inf loss: stop (naming the step and images) or skip that batch."),
        _opt(T, "device", help="auto (cuda if available), cpu or cuda."),
        _opt(T, "tensorboard", "--tensorboard/--no-tensorboard",
             help="Also write the training loss, learning rate and validation metrics (per class too) "
                  "as TensorBoard scalars into --out (needs the extra: pip install 'chx[tensorboard]')."),
        click.option("--resume", is_flag=True,
                     help="Continue the run in --out from its last.pt, exactly: `--resume -o RUN` reads "
                          "the run's options from RUN/config.json (options given must be the run's)."),
        click.option("--overwrite", is_flag=True, help="Start again in an --out that already holds a run."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _train_config(kw: dict) -> TrainConfig:
    names = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: kw.pop(k) for k in list(kw) if k in names})


def _option_specs(command: click.Command) -> list:
    """The command's options as :class:`chx.config.OptionSpec` rows (what a config file may set)."""
    from chx.config import OptionSpec

    def kind(t: click.ParamType) -> str:   # what a config file's value must be (chx.config checks it)
        for cls, name in ((click.types.BoolParamType, "bool"), (click.types.IntParamType, "int"),
                          (click.types.FloatParamType, "float"), (click.Choice, "choice"),
                          (click.Path, "path"), (click.types.StringParamType, "str")):
            if isinstance(t, cls):
                return name
        return "any"

    return [OptionSpec(p.name, next((o for o in p.opts if o.startswith("--")), p.opts[0]),
                       (p.secondary_opts or [None])[0], p.is_flag, p.multiple, p.default, kind(p.type),
                       lambda v, t=p.type: t.convert(v, None, None))
            for p in command.params if isinstance(p, click.Option) and p.expose_value]


def _config_option(f):
    """``--config FILE``: the file's values become the command's defaults (click's default_map).
    The option is eager, so the file is read before any other option is: a value typed on the
    command line still wins, and a required option may come from the file."""
    def load(ctx, param, path):
        if path is not None:
            from chx.config import config_values

            values = config_values(path, ctx.command.name, _option_specs(ctx.command))
            ctx.default_map = {**(ctx.default_map or {}), **values}
        return path

    return click.option("--config", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        is_eager=True, expose_value=False, callback=load,
                        help="YAML or JSON file of this command's options (names as the long options, "
                             "without the dashes), or a run folder's config.json (the same run again); "
                             "options on the command line override the file.")(f)


def _out_argument(args: list[str]) -> str | None:
    """The value of -o/--out among raw command-line words (the last one given), or None."""
    out = None
    for i, word in enumerate(args):
        if word in ("-o", "--out") and i + 1 < len(args):
            out = args[i + 1]
        elif word.startswith("--out="):
            out = word.split("=", 1)[1]
        elif word.startswith("-o") and len(word) > 2 and not word.startswith("--"):
            out = word[2:]
    return out


class _RunCommand(click.Command):
    """A train-* command: ``--resume -o RUN`` without ``--config`` reads RUN/config.json first (as
    ``--config RUN/config.json --resume`` does), so the run's options need not be given again;
    options given on the command line override it, and the resume check refuses those that would
    change what the run computes. ``--max-steps`` is not taken from the run: without it the
    resumed run trains to the end of its schedule, as a full --resume command line does."""

    def parse_args(self, ctx, args):
        words = list(args)
        if "--resume" in words and not any(w == "--config" or w.startswith("--config=") for w in words):
            default = next(p.default for p in self.params if p.name == "out")
            config = Path(_out_argument(words) or default) / "config.json"
            if not config.is_file():
                raise ChxError(f"--resume: {config} does not exist, so {config.parent} holds no run to "
                               f"resume; give the run's folder as -o, or run without --resume to start")
            from chx.config import config_values

            values = config_values(config, self.name, _option_specs(self))
            values.pop("max_steps", None)   # a run stopped by --max-steps goes on to its end
            ctx.default_map = {**values, **(ctx.default_map or {})}
        return super().parse_args(ctx, args)


@cli.command("train-backbone", cls=_RunCommand, context_settings=CONTEXT,
             short_help="Stage 1: ConvNeXt + ML-Decoder on images.")
@_config_option
@click.option("--manifest", "manifests", multiple=True, required=True,
              type=click.Path(path_type=Path),
              help="Manifest(s); repeat to train on their union (e.g. with a pseudo-labelled one). "
                   "Rows with split 'train' or no split train; split 'val' validates.")
@click.option("--images", "images", multiple=True, type=click.Path(path_type=Path),
              help="Images root; once for all manifests or once per --manifest."
                   "  [default: the root `chx prepare --images` recorded in each manifest]")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/backbone"),
              show_default=True, help="Run folder: config.json, metrics.jsonl, last.pt, best.pt.")
@_opt(BackboneOptions, "model", help="Any timm ConvNeXt name (e.g. convnext_atto for a quick CPU run).")
@_opt(BackboneOptions, "size", type=click.IntRange(min=32), help="Input size in pixels (square).")
@_opt(BackboneOptions, "resize", type=click.Choice(["letterbox", "squash"]),
      help="Keep the aspect ratio and pad (letterbox) or stretch (squash, the reference's way).")
@_opt(BackboneOptions, "pretrained", "--pretrained/--no-pretrained",
      help="Start from timm's pretrained weights (needs the network once).")
@_opt(BackboneOptions, "weights", type=click.Path(exists=True, dir_okay=False),
      help="Local timm/safetensors weights file to start from (offline alternative to --pretrained).")
@_opt(BackboneOptions, "balance", "--balance/--no-balance",
      help="Class-aware balanced sampling (round-robin over classes).")
@_opt(BackboneOptions, "tta", "--tta/--no-tta",
      help="Validation with the mean of the image and its horizontal flip.")
@_opt(BackboneOptions, "grad_checkpointing", "--grad-checkpointing", is_flag=True,
      help="Trade compute for memory (large inputs on GPU).")
@_opt(BackboneOptions, "eval_batch_size", type=click.IntRange(min=1), help="Batch size of validation.")
@_opt(BackboneOptions, "soft_targets", type=click.Choice(["expected", "reference"]),
      help="The loss on soft (pseudo) labels: expected (linear in the label: the expected loss of a "
           "hard label drawn with that probability) or reference (the CheXFusion code's formula, "
           "which sharpens pseudo labels). Equal on 0/1 labels.")
@_opt(BackboneOptions, "head", type=click.Choice(["ml-decoder", "csra", "linear"]),
      help="Classification head: ML-Decoder (CheXFusion's), CSRA (class-specific residual attention) "
           "or linear (average pooling + linear).")
@_opt(BackboneOptions, "csra_heads", type=int, help="CSRA heads: 1, 2, 4, 6 or 8 (the paper's temperature sets).")
@_opt(BackboneOptions, "csra_lambda", type=click.FloatRange(min=0), help="CSRA: weight of the attention pooling.")
@_opt(BackboneOptions, "loss", type=click.Choice(["wasl", "asl", "db", "bce"]),
      help="Loss: weighted ASL (CheXFusion's), ASL, distribution-balanced (DB) or BCE.")
@_opt(BackboneOptions, "clahe", "--clahe/--no-clahe", help="CLAHE augmentation (p 0.5, clip limit 1-4).")
@_opt(BackboneOptions, "coarse_dropout", type=click.FloatRange(0, 0.5), metavar="FRACTION",
      help="Coarse dropout augmentation: 1-8 black squares of this fraction of the side (p 0.5); 0 = off.")
@train_options
def train_backbone(manifests, images, out, model, size, resize, pretrained, weights, balance, tta,
                   grad_checkpointing, eval_batch_size, soft_targets, resume, overwrite, **kw):
    """Stage 1: train a ConvNeXt + ML-Decoder image classifier with weighted ASL.

    \b
    Example (a quick CPU run on real images):
      chx train-backbone --manifest covid.parquet --images covid-cxr/images \\
          --model convnext_atto --size 256 --no-pretrained --epochs 3 -o runs/covid-b
    """
    from chx.pipeline.train_backbone import train_backbone as run

    images = images or [_images_of(m, None) for m in manifests]
    cfg = _train_config(kw)
    opts = BackboneOptions(model=model, size=size, resize=resize, pretrained=pretrained,
                           weights=weights, balance=balance, tta=tta,
                           grad_checkpointing=grad_checkpointing, eval_batch_size=eval_batch_size,
                           soft_targets=soft_targets,
                           **{k: kw.pop(k) for k in ("head", "csra_heads", "csra_lambda", "loss", "clahe",
                                                     "coarse_dropout")})
    result = run(list(manifests), list(images), out, opts, cfg, resume=resume, overwrite=overwrite)
    _report_fit(result)


def _refuse_existing(out: Path, overwrite: bool, kind: str, why: str = "", option: str = "-o") -> None:
    """THE overwrite rule (:func:`chx.atomic.check_output`): an existing output is replaced only with
    --overwrite and only when it is chx's output of ``kind``; anything else is refused by name."""
    from chx.atomic import check_output

    check_output(out, kind, overwrite, option=option, why=why)


def _images_of(manifest, images, *, required: bool = True):
    """--images, else the images root ``manifest`` records (`chx prepare --images`; one line when it
    records none or it no longer exists). ``required=False``: None when it records none."""
    if manifest is None or images:
        return images
    from chx.data.manifest import images_root, recorded_images_root

    if not required and recorded_images_root(manifest) is None:
        return images
    return images_root(manifest)


def _values_then_extras(option: str, values, extras) -> list:
    """An option that takes several values (``--files a b``): click gives the first value to the
    option and the rest as extra arguments; extra arguments without the option are a mistake."""
    if extras and not values:
        raise ChxError(f"unexpected argument(s) {' '.join(map(str, extras))}; did you mean {option} "
                       f"{' '.join(map(str, extras))}?")
    return [*values, *extras]


def _report_fit(result) -> None:
    if result.interrupted:
        sys.exit(128 + int(result.interrupted))
    m = result.last_metrics or {}
    summary = f"; val mAP {m['mAP']:.4f}, mAUC {m['mAUC']:.4f}" if "mAP" in m else ""
    if "baseline_mAP" in m:
        summary += f" (class-prior baseline: mAP {m['baseline_mAP']:.4f}, mAUC {m['baseline_mAUC']:.4f})"
    best = f" (best val mAP {result.best_metric:.4f})" if result.best_metric not in (None, float("-inf")) else ""
    click.echo(f"trained {result.step} steps{summary}{best}; run folder {result.out}")


@cli.command("pseudo-label", context_settings=CONTEXT, short_help="Fill unannotated labels with soft labels.")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path),
              help="Stage-1 checkpoint (best.pt of train-backbone).")
@click.option("--manifest", required=True, type=click.Path(path_type=Path),
              help="Manifest to fill, prepared onto the checkpoint's classes (e.g. NIH onto CXR-LT's 26).")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Images root of that manifest.  [default: the root `chx prepare --images` recorded in the manifest]")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Manifest to write, with null labels replaced by probabilities.")
@click.option("--tta/--no-tta", default=True, show_default=True, help="Mean of the image and its hflip.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Batch size.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="DataLoader workers.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
def pseudo_label(checkpoint, manifest, images, out, tta, batch_size, workers, device):
    """Self-training: fill a manifest's unannotated (null) labels with soft pseudo labels.

    Only null entries change; the dataset's own 0/1 labels stay. Train again on the union with
    `chx train-backbone --manifest own.parquet --manifest pseudo.parquet --images A --images B`.
    """
    from chx.pipeline.pseudo_label import pseudo_label as run

    images = _images_of(manifest, images)
    s = run(checkpoint, manifest, images, out, tta=tta, batch_size=batch_size, workers=workers,
            device=device)
    click.echo(f"wrote {out}: {s['images']:,} images; {s['filled']:,} null labels filled with "
               f"probabilities, {s['kept']:,} labels kept")


# ----------------------------------------------------------------------------------------- stage 2

@cli.command("extract-features", context_settings=CONTEXT, short_help="Stage 2a: backbone maps -> feature store.")
@_config_option
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path),
              help="Stage-1 checkpoint (best.pt of train-backbone); its preprocessing is reused.")
@click.option("--manifest", required=True, type=click.Path(path_type=Path), help="Manifest of the images.")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Images root of the manifest.  [default: the root `chx prepare --images` recorded in the manifest]")
@click.option("--store", "store", required=True,
              help="Feature store: a folder (Zarr v3, default; or an fsspec URL like memory://x) or a "
                   "file ending .h5 (HDF5, one writer).")
@_opt(ExtractOptions, "pool", type=int,
      help="Average-pool K x K before storing (2 -> a quarter of the size).")
@_opt(ExtractOptions, "flip", "--flip", is_flag=True, help="Also store the horizontally flipped image's maps (TTA, augmentation).")
@_opt(ExtractOptions, "batch_size", type=click.IntRange(min=1), help="Batch size.")
@_opt(ExtractOptions, "workers", type=click.IntRange(min=0),
      help="DataLoader workers decoding images while the model runs.")
@_opt(ExtractOptions, "device", help="auto, cpu or cuda.")
@_opt(ExtractOptions, "shard", metavar="I/N",
              help="Fill only this writer's shards (shard % N == I; run N processes at once; Zarr "
                   "only). Under torchrun the rank is used.")
@_opt(ExtractOptions, "compress", "--compress/--no-compress",
              help="Compress the maps in a new store (Zarr: zstd; HDF5: lzf). Float16 maps barely compress "
                   "(~1.09x) and it slows writing and reading; worth it only where bytes cost more than time.")
@_opt(ExtractOptions, "dtype", type=click.Choice(["float16", "bfloat16", "float8"]),
      help="How maps are stored: float16; bfloat16; float8 (e4m3 with a per-image, per-channel scale: half "
           "the bytes, error <= 1/16 of the channel's max). Reads give float16.")
@_opt(ExtractOptions, "shard_images", type=click.IntRange(min=1),
      help="Images per shard object.  [default: from the map size: ~256 MiB, 64-512 images]")
@_opt(ExtractOptions, "repair", "--repair", is_flag=True,
      help="Verify the store (checksums, missing objects) and extract its damaged shards again.")
@click.option("--overwrite", is_flag=True,
              help="Replace a store made by another checkpoint/options (only a store chx made: anything "
                   "else at that path is refused, never deleted).")
def extract_features(checkpoint, manifest, images, store, pool, flip, batch_size, workers, device,
                     shard, compress, dtype, shard_images, repair, overwrite):
    """Stage 2a: cache the frozen backbone's feature maps of every image, grouped by study.

    Rerunning the same command continues with the images not yet done; a store made by another
    checkpoint, preprocessing or class list is refused (--overwrite replaces it).
    """
    from chx.pipeline.extract import extract_features as run

    images = _images_of(manifest, images)
    r = run(checkpoint, manifest, images, store, pool=pool, flip=flip, batch_size=batch_size,
            workers=workers, device=device, shard=shard, compress=compress, overwrite=overwrite,
            dtype=dtype, shard_images=shard_images, repair=repair, echo=click.echo)
    state = "complete" if r.complete else f"{r.remaining:,} images still to do (other shards or a rerun)"
    speed = f" at {r.images_per_s:.1f} images/s" if r.written else ""
    click.echo(f"wrote {r.written:,} images{speed}; store {r.store} is {state}")


def _study_training_options(defaults):
    """The options of study-level training that train-fusion and train-joint share, with their
    defaults from ``defaults`` (FusionOptions or JointOptions)."""
    decorators = [
        _opt(defaults, "shuffle", "--shuffle/--no-shuffle",
             help="Random view order in training (order must carry no information)."),
        _opt(defaults, "balance", "--balance/--no-balance", help="Class-aware sampling of studies."),
        _opt(defaults, "eval_batch_size", type=click.IntRange(min=1), help="Studies per validation batch."),
        _opt(defaults, "soft_targets", type=click.Choice(["expected", "reference"]),
             help="The loss on soft (pseudo) labels: expected (linear in the label: the expected loss "
                  "of a hard label drawn with that probability) or reference (the CheXFusion code's "
                  "formula, which sharpens pseudo labels). Equal on 0/1 labels."),
    ]

    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


@cli.command("train-fusion", cls=_RunCommand, context_settings=CONTEXT,
             short_help="Stage 2b: fusion transformer from the store.")
@_config_option
@click.option("--store", "store", required=True, help="Complete feature store from extract-features.")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/fusion"),
              show_default=True, help="Run folder: config.json, metrics.jsonl, last.pt, best.pt.")
@_opt(FusionOptions, "max_views", type=click.IntRange(min=1),
              help="View slots per study (more views: a random subset in training, a fixed choice at evaluation).")
@_opt(FusionOptions, "encoder_layers", type=click.IntRange(min=0),
              help="Transformer encoder layers (0: ML-Decoder directly on the projected tokens).")
@click.option("--dim", type=click.IntRange(min=8), default=FusionOptions.dim,
              help="Token width D.  [default: the store's channels C]")
@_opt(FusionOptions, "heads", type=click.IntRange(min=1), help="Attention heads.")
@_opt(FusionOptions, "ffn_dim", type=click.IntRange(min=1), help="Feed-forward width.")
@_opt(FusionOptions, "dropout", type=float, help="Dropout.")
@_opt(FusionOptions, "pos_enc", "--pos-enc/--no-pos-enc", help="2-D positional encoding per view.")
@_opt(FusionOptions, "segment_embedding", "--segment-embedding/--no-segment-embedding",
              help="Learnable embedding of each view slot.")
@_opt(FusionOptions, "view_embedding", "--view-embedding/--no-view-embedding",
              help="Learnable embedding of the view type (frontal, lateral, other).")
@_opt(FusionOptions, "view_experts", "--view-experts/--no-view-experts",
              help="One projection (the 3x3 stride-2 conv) per view type (frontal, lateral, other); "
                   "each view goes through its own type's projection only.")
@_opt(FusionOptions, "experts", type=click.IntRange(min=0),
              help="A mixture of this many projections, mixed with weights learned per view type "
                   "(0 = off: one shared projection; >= 2; not with --view-experts).")
@_opt(FusionOptions, "flip_aug", "--flip-aug/--no-flip-aug",
              help="Use the store's flipped maps for a random half of the training studies (stores made with --flip).")
@_study_training_options(FusionOptions)
@_opt(FusionOptions, "buffer_shards", type=click.IntRange(min=1),
      help="Streaming (--preload off): each epoch shuffles the store's shards, then the studies within "
           "buffers of this many shards, so every shard is read once per epoch.")
@_opt(FusionOptions, "preload", type=click.Choice(["auto", "ram", "gpu", "off"]),
              help="Where the split's features are held: ram, gpu (batches gathered on the GPU), off "
                   "(streamed from the store, whole shards at a time); auto: gpu when they fit in half "
                   "its free memory, else ram when they fit in half the available memory, else off.")
@train_options
def train_fusion(store, out, max_views, encoder_layers, dim, heads, ffn_dim, dropout, pos_enc,
                 segment_embedding, view_embedding, view_experts, experts, shuffle, balance, flip_aug,
                 eval_batch_size, soft_targets, buffer_shards, preload, resume, overwrite, **kw):
    """Stage 2b: train the CheXFusion transformer from the feature store alone.

    No image is read and no backbone is run.

    \b
    Example:
      chx train-fusion --store runs/covid.zarr --epochs 20 --lr 1e-4 -o runs/covid-f
    """
    from chx.pipeline.train_fusion import train_fusion as run

    cfg = _train_config(kw)
    opts = FusionOptions(max_views=max_views, encoder_layers=encoder_layers, dim=dim, heads=heads,
                         ffn_dim=ffn_dim, dropout=dropout, pos_enc=pos_enc,
                         segment_embedding=segment_embedding, view_embedding=view_embedding,
                         view_experts=view_experts, experts=experts,
                         shuffle=shuffle, balance=balance, flip_aug=flip_aug, soft_targets=soft_targets,
                         buffer_shards=buffer_shards, preload=preload, eval_batch_size=eval_batch_size)
    _report_fit(run(store, out, opts, cfg, resume=resume, overwrite=overwrite))


@cli.command("train-joint", cls=_RunCommand, context_settings=CONTEXT,
             short_help="Backbone + fusion fine-tuned together from images.")
@_config_option
@click.option("--manifest", required=True, type=click.Path(path_type=Path),
              help="Manifest of the images; split 'train' (or none) trains, 'val' validates (per study).")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Images root of the manifest.  [default: the root `chx prepare --images` recorded in the manifest]")
@click.option("--backbone", required=True, type=click.Path(path_type=Path),
              help="Stage-1 checkpoint (best.pt of train-backbone) to start the backbone from; its "
                   "preprocessing is used.")
@click.option("--fusion", type=click.Path(path_type=Path), default=None,
              help="Fusion checkpoint trained on that backbone's store to start the fusion model from "
                   "(its architecture, view slots and the store's pooling).  [default: a fresh fusion "
                   "model with train-fusion's defaults, on unpooled maps]")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/joint"),
              show_default=True, help="Run folder: config.json, metrics.jsonl, last.pt, best.pt.")
@click.option("--max-views", type=click.IntRange(min=1), default=JointOptions.max_views,
              help="View slots per study (more views: a random subset in training, a fixed choice at "
                   "evaluation); with --fusion it must be that model's.  [default: the --fusion "
                   f"model's, else {FusionOptions.max_views}]")
@_opt(JointOptions, "backbone_lr_mult", type=click.FloatRange(min=0),
      help="The backbone's learning rate is --lr x this (the fusion model's is --lr); 0 keeps the "
           "backbone's weights fixed.")
@_opt(JointOptions, "grad_checkpointing", "--grad-checkpointing/--no-grad-checkpointing",
      help="Recompute the backbone's activations in the backward pass: less memory, more compute, "
           "the same losses.")
@_opt(JointOptions, "tta", "--tta/--no-tta",
      help="Validation (and the exported bundle) with the mean of the views and their horizontal flips.")
@_study_training_options(JointOptions)
@train_options
def train_joint(manifest, images, backbone, fusion, out, max_views, backbone_lr_mult, grad_checkpointing,
                shuffle, balance, tta, eval_batch_size, soft_targets, resume, overwrite, **kw):
    """Fine-tune the stage-1 backbone and the fusion model together, end to end from images.

    Each view's backbone map feeds the fusion model as the store would hold it (same pooling,
    float16); the same trainer and loss as the other stages; --batch-size counts studies.
    The checkpoint works with `chx export --joint`, `chx predict --joint` and `chx evaluate`.

    \b
    Example:
      chx train-joint --manifest covid.parquet --images covid-cxr/images \\
          --backbone runs/covid-b/best.pt --fusion runs/covid-f/best.pt --epochs 2 -o runs/covid-j
    """
    from chx.pipeline.train_joint import train_joint as run

    images = _images_of(manifest, images)
    cfg = _train_config(kw)
    opts = JointOptions(max_views=max_views, backbone_lr_mult=backbone_lr_mult,
                        grad_checkpointing=grad_checkpointing, shuffle=shuffle, balance=balance, tta=tta,
                        eval_batch_size=eval_batch_size, soft_targets=soft_targets)
    _report_fit(run(manifest, images, backbone, out, opts, cfg, fusion=fusion, resume=resume,
                    overwrite=overwrite))


@cli.group("store", cls=_Group, context_settings=CONTEXT,
           short_help="Inspect and check feature stores (store info, store verify).")
def store_group():
    """Inspect and check feature stores."""


@store_group.command("info", context_settings=CONTEXT)
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def store_info(path, as_json):
    """Layout, images, studies, views per study, splits, dtype and bytes per image, size on disk
    (what `du` shows) and logical size, objects, fingerprint, completeness."""
    import json

    from chx.store import open_store

    with open_store(path) as s:
        info = s.info()
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    mb = lambda b: "n/a" if b is None else f"{b / 2**20:,.1f} MiB"  # noqa: E731
    kb = lambda b: "n/a" if b is None else f"{b / 2**10:,.1f} KiB"  # noqa: E731
    files = info.get("files")
    rows = [("backend", f"{info.get('backend', '')} (format {info.get('format_version')})"),
            ("layout", info.get("layout", "")),
            ("images", f"{info['images']:,}"), ("studies", f"{info['studies']:,}"),
            ("views per study", ", ".join(f"{k}: {v}" for k, v in sorted(info["views_per_study"].items(),
                                                                          key=lambda kv: int(kv[0])))),
            ("splits (studies)", ", ".join(f"{k or 'none'}: {v}" for k, v in info["splits"].items())),
            ("feature shape", f"{tuple(info['feature_shape'])}{' + flipped' if info.get('flip') else ''}"),
            ("dtype", f"{info.get('dtype')} (read as float16)"),
            ("bytes per image", f"{kb(info.get('bytes_per_image'))} stored, "
                                f"{kb(info.get('bytes_per_image_decoded'))} as float16"),
            ("size on disk (du)", mb(info.get("bytes_on_disk"))),
            ("logical size", mb(info.get("bytes_logical"))),
            ("files", "n/a" if not files else f"{files:,} ({info['files_per_image']:.3f} per image)"),
            ("compression ratio", f"{info['compression_ratio']:.2f}" if info.get("compressed")
             and info.get("compression_ratio") else "1 (uncompressed)"),
            ("shards", f"{info.get('shards', 0):,} ({info.get('missing_shards', 0):,} not done, "
                       f"{info.get('shards_without_objects', 0):,} done but without objects)"),
            ("complete", str(info["complete"])),
            ("classes", f"{len(info['class_names'])}: {', '.join(info['class_names'][:5])}"
                        f"{', ...' if len(info['class_names']) > 5 else ''}"),
            ("fingerprint", ", ".join(f"{k}={v}" for k, v in info["fingerprint"].items()))]
    for k, v in rows:
        click.echo(f"{k:<18} {v}")
    if info.get("shards_without_objects"):
        click.echo("warning: shards marked done have no objects: run `chx store verify` and "
                   "`chx extract-features ... --repair`", err=True)


@store_group.command("verify", context_settings=CONTEXT)
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def store_verify(path, as_json):
    """Read every shard and check it against the checksums stored at write time; list missing,
    truncated, undecodable or changed shards. Exit code 2 when there is a problem; repair with
    `chx extract-features ... --repair` (the same command that made the store)."""
    import json

    from chx.store import open_store

    with open_store(path) as s:
        report = s.verify()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        click.echo(report.summary())
        for p in report.problems[:50]:
            click.echo(f"  shard {p.shard} (rows {p.rows[0]}-{p.rows[1] - 1}, from image {p.first_image}): "
                       f"{p.problem}")
        if len(report.problems) > 50:
            click.echo(f"  ... and {len(report.problems) - 50} more")
    if not report.ok:
        sys.exit(2)


# ----------------------------------------------------------------------------------------- evaluate

_groups_option = click.option(
    "--groups", type=click.Choice(["prevalence", "thirds", "cxr-lt"]), default="prevalence", show_default=True,
    help="Head/medium/tail classes: prevalence: head > 10 %, tail < 1 % training prevalence (CXR-LT 2024's "
         "rule, any class list; the rule chx prepare reports and training validation uses); thirds: "
         "thirds of the training-frequency rank; cxr-lt: CXR-LT 2023's 8/10/8 of its 26 classes.")
_bootstrap_option = click.option(
    "--bootstrap", type=click.IntRange(min=0), default=1000, show_default=True,
    help="Resamples of the evaluated studies (images for a backbone) for the 95 % mAP intervals "
         "(fixed seed; paired for differences); 0: no intervals.")


@cli.command("evaluate", context_settings=CONTEXT, short_help="Long-tail metrics, report and plots.")
@_config_option
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="A backbone, fusion or joint (train-joint) checkpoint (best.pt).")
@click.option("--store", default=None, help="Feature store (for a fusion checkpoint).")
@click.option("--manifest", type=click.Path(path_type=Path), default=None,
              help="Manifest (for a backbone or joint checkpoint), with --images.")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Images root of --manifest.  [default: the root `chx prepare --images` recorded in the manifest]")
@click.option("--split", default="test", show_default=True, help="Split to evaluate.")
@click.option("--thresholds-from", default="val", show_default=True,
              help="Split on which per-class F1 thresholds are tuned (max F1); 'none' = 0.5.")
@_groups_option
@_bootstrap_option
@click.option("--views", type=click.Choice(["all", "frontal", "lateral"]), default="all", show_default=True,
              help="Fusion and joint checkpoints: keep only these views of each study (robustness to a "
                   "missing view).")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder: metrics.json, per_class.csv, summary.md, plots.  [default: eval-SPLIT]")
@click.option("--compare", "compare_runs", multiple=True, type=click.Path(path_type=Path),
              help="Instead: print one side-by-side table of report folders: --compare eval-f eval-b.")
@click.argument("more_runs", nargs=-1, type=click.Path(path_type=Path), metavar="")
@click.option("--overwrite", is_flag=True, help="Replace an existing report folder -o.")
@click.option("--absent-classes", type=click.Choice(["skip", "zero"]), default="skip", show_default=True,
              help="Classes without a positive in the split: left out of the macro means (skip), or "
                   "counted as AP 0 (zero: what the reference code's torchmetrics mAP does; for comparison).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Batch size.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="DataLoader workers.")
def evaluate(checkpoint, store, manifest, images, split, thresholds_from, groups, bootstrap, views, out,
             compare_runs, more_runs, overwrite, absent_classes, batch_size, workers):
    """Per-class and macro AP (the ranking metric), AUROC, F1 at tuned thresholds, head/medium/tail
    mAP and calibration (ECE) of a checkpoint on one split; writes a report folder with plots.

    \b
    Examples:
      chx evaluate --checkpoint runs/f/best.pt --store covid.zarr --split val -o eval-f
      chx evaluate --checkpoint runs/b/best.pt --manifest covid.parquet --images covid-cxr/images --split val
      chx evaluate --compare eval-f eval-b
    """
    compare_runs = _values_then_extras("--compare", compare_runs, more_runs)
    if compare_runs:
        from chx.pipeline.report import compare_runs as run_compare

        given = [name for name, v in (("--checkpoint", checkpoint), ("--store", store), ("--manifest", manifest),
                                      ("-o", out), ("--overwrite", overwrite)) if v]
        if given:
            raise ChxError(f"--compare only prints a table of existing report folders; {', '.join(given)} "
                           f"would be ignored: evaluate first (without --compare), then compare the reports")

        click.echo(run_compare(list(compare_runs)))
        return
    if checkpoint is None:
        raise ChxError("give --checkpoint (or --compare REPORT_DIR ... to compare reports)")
    from chx.pipeline.evaluate import evaluate as run
    from chx.pipeline.report import summary_table

    out = out or Path(f"eval-{split}")
    images = _images_of(manifest, images, required=False)
    result = run(checkpoint, out, store=store, manifest=manifest, images=images, split=split,
                 thresholds_from=None if thresholds_from == "none" else thresholds_from, groups=groups,
                 views=views, batch_size=batch_size, workers=workers, overwrite=overwrite,
                 absent_classes=absent_classes, bootstrap=bootstrap)
    click.echo(summary_table(result))
    click.echo(f"\nreport: {out}/ (metrics.json, per_class.csv, predictions.csv, summary.md, plots)")


@cli.command("compare", context_settings=CONTEXT, short_help="Fusion vs per-study aggregations of stage 1.")
@click.option("--backbone", required=True, type=click.Path(path_type=Path), help="Stage-1 checkpoint.")
@click.option("--fusion", required=True, type=click.Path(path_type=Path),
              help="Fusion checkpoint trained on that backbone's store.")
@click.option("--manifest", required=True, type=click.Path(path_type=Path), help="Manifest of the images.")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Images root of the manifest.  [default: the root `chx prepare --images` recorded in the manifest]")
@click.option("--store", required=True, help="The feature store the fusion model was trained on.")
@click.option("--split", default="val", show_default=True, help="Split to compare on.")
@_groups_option
@_bootstrap_option
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the table (Markdown) and the full results (same name, .json) here.")
@click.option("--overwrite", is_flag=True, help="Replace an existing -o table (and its .json) that chx compare wrote.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Batch size.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="DataLoader workers.")
def compare(backbone, fusion, manifest, images, store, split, groups, bootstrap, out, overwrite, batch_size,
            workers):
    """Score fusion against the stage-1 model's predictions aggregated per study (mean, max, the
    reference's view-weighted mean, frontal-only, lateral-only), every method on the same studies
    (frontal-only and lateral-only cover fewer studies: fusion is scored on those too).

    Stage 1 and fusion both use flip TTA as `chx evaluate` does; mAP is per study.

    \b
    Example:
      chx compare --backbone runs/b/best.pt --fusion runs/f/best.pt --manifest covid.parquet \\
          --images covid-cxr/images --store runs/covid.zarr --split val -o compare-val.md
    """
    from chx.atomic import json_text
    from chx.pipeline.compare import compare_methods, format_table

    if out is not None:
        _refuse_existing(out, overwrite, "comparison")
        _refuse_existing(out.with_suffix(".json"), overwrite, "comparison")
    images = _images_of(manifest, images)
    results = compare_methods(backbone, fusion, manifest, images, store, split, workers=workers,
                              batch_size=batch_size, groups=groups, bootstrap=bootstrap)
    table = format_table(results, title=f"{split} split (mAP per study)")
    click.echo(table)
    if out is not None:
        from chx.atomic import atomic_path

        with atomic_path(out) as tmp:
            tmp.write_text(table + "\n")
        with atomic_path(out.with_suffix(".json")) as tmp:
            tmp.write_text(json_text(results, indent=1))
        click.echo(f"wrote {out} and {out.with_suffix('.json')}")


# ----------------------------------------------------------------------------------------- inference

@cli.command("export", context_settings=CONTEXT,
             short_help="Both models for predict: one file, a Hugging Face folder or ONNX graphs.")
@click.option("--backbone", type=click.Path(path_type=Path), default=None, help="Stage-1 checkpoint.")
@click.option("--fusion", type=click.Path(path_type=Path), default=None,
              help="Fusion checkpoint trained on that backbone's features.")
@click.option("--joint", type=click.Path(path_type=Path), default=None,
              help="Instead of --backbone and --fusion: a train-joint checkpoint (it holds both).")
@click.option("--format", "fmt", type=click.Choice(["bundle", "hf", "onnx"]), default="bundle", show_default=True,
              help="bundle: one file; hf: a Hugging Face folder (model.safetensors, config.json and a "
                   "generated model card README.md); onnx: backbone.onnx and fusion.onnx (dynamic batch "
                   "and views, checked against torch) with config.json, for --runtime onnxruntime "
                   "(needs pip install 'chx[onnx]').")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="File (bundle) or folder (hf, onnx) to write.  [default: model.chx, model-hf or model-onnx]")
@click.option("--overwrite", is_flag=True, help="Replace an existing -o file or folder.")
def export(backbone, fusion, joint, fmt, out, overwrite):
    """Export both models' weights, the class names and the preprocessing for `chx predict` and
    other tools. Everything loads offline; nothing is uploaded (push an hf folder with your own tools).

    \b
    Examples:
      chx export --backbone runs/b/best.pt --fusion runs/f/best.pt -o model.chx
      chx export --joint runs/j/best.pt -o model.chx
      chx export --backbone runs/b/best.pt --fusion runs/f/best.pt --format hf -o model-hf
      chx export --backbone runs/b/best.pt --fusion runs/f/best.pt --format onnx -o model-onnx
    """
    from chx.pipeline import export as stage

    out = out or Path({"bundle": "model.chx", "hf": "model-hf", "onnx": "model-onnx"}[fmt])
    _refuse_existing(out, overwrite, {"bundle": "bundle", "hf": "export-hf", "onnx": "export-onnx"}[fmt])
    if fmt == "bundle":
        b = stage.export_bundle(backbone, fusion, out, joint=joint)
    elif fmt == "hf":
        specs = {name: _option_specs(command) for name, command in cli.commands.items()}
        b = stage.export_hf(backbone, fusion, out, specs, joint=joint)
    else:
        r = stage.export_onnx(backbone, fusion, out, joint=joint)
        b = r["bundle"]
        click.echo(f"checked: ONNX Runtime's probabilities are within {r['max_abs_diff']:.1e} of torch's")
    click.echo(f"wrote {out}: {len(b['class_names'])} classes, backbone "
               f"{b['backbone']['model_config']['backbone_name']} at {b['backbone']['preprocess']['size']} px")


@cli.command("import-reference", context_settings=CONTEXT,
             short_help="A CheXFusion reference checkpoint -> a chx checkpoint.")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--kind", type=click.Choice(["backbone", "fusion"]), required=True,
              help="backbone: the reference's stage-1 model; fusion: its FusionBackbone.")
@click.option("--classes", required=True, metavar="LIST",
              help="The class names the reference model was trained on, in its order: 'cxr-lt-2023', "
                   "a comma-separated list or a file with one class per line.")
@click.option("--backbone", "backbone_name", default=BackboneOptions.model, show_default=True,
              help="timm name of its backbone (the paper's by default).")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="chx checkpoint to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing -o file.")
def import_reference(ckpt, kind, classes, backbone_name, out, overwrite):
    """Convert a checkpoint of the CheXFusion reference code (its Lightning key layout) into a
    chx checkpoint for evaluate, extract-features, export and as a start for fine-tuning.

    Every key is mapped or dropped for a stated reason (printed); anything else is refused by name.
    The reference's positional encoding is not reproduced, so an imported head gives other logits
    than the reference until it is fine-tuned; backbone feature maps are the reference's exactly.
    Preprocessing: the reference's 1024 px squash, its ImageNet normalisation folded into the stem.

    \b
    Example:
      chx import-reference epoch=5.ckpt --kind backbone --classes cxr-lt-2023 -o runs/ref-b/best.pt
    """
    from chx.data.classes import resolve_classes
    from chx.models import save_checkpoint
    from chx.models.reference import convert_reference_checkpoint

    _refuse_existing(out, overwrite, "checkpoint")
    names = resolve_classes(classes, default="cxr-lt-2023")
    if not names:
        raise ChxError("--classes: give the reference model's class list (a named list, names, or a file)")
    converted = convert_reference_checkpoint(ckpt, kind, names, backbone_name=backbone_name)
    save_checkpoint(converted, out)
    for what, why in (converted.get("imported_from", {}).get("dropped") or {}).items():
        click.echo(f"dropped {what}: {why}")
    click.echo(f"wrote {out}: {kind} checkpoint, {len(names)} classes")


_VIEWS_HELP = ("The views of the --files images, one per file in the same order: --views PA,LATERAL (PA, AP, "
               "LATERAL, LL, OTHER, or auto: the DICOM ViewPosition, else a view word of the file name). "
               "[default: auto]")


@cli.command("predict", context_settings=CONTEXT, short_help="Study probabilities for new images.")
@click.option("--bundle", type=click.Path(path_type=Path), default=None,
              help="File or folder from `chx export` (--format bundle or hf; onnx with --runtime onnxruntime).")
@click.option("--backbone", type=click.Path(path_type=Path), default=None,
              help="Stage-1 checkpoint (instead of --bundle, with --fusion).")
@click.option("--fusion", type=click.Path(path_type=Path), default=None, help="Fusion checkpoint.")
@click.option("--joint", type=click.Path(path_type=Path), default=None,
              help="A train-joint checkpoint (it holds both models; instead of --bundle).")
@click.option("--studies", "studies_dir", type=click.Path(path_type=Path), default=None,
              help="A folder holding one sub-folder of images (PNG, JPEG, DICOM) per study.")
@click.option("--files", multiple=True, type=click.Path(path_type=Path),
              help="Image files of ONE study: --files a.dcm b.dcm (or repeat the option).")
@click.option("--views", "views", default=None, metavar="LIST", help=_VIEWS_HELP)
@click.option("--study-id", default="study", show_default=True, help="Study id of the --files study.")
@click.argument("more_files", nargs=-1, type=click.Path(path_type=Path), metavar="")
@click.option("--manifest", type=click.Path(path_type=Path), default=None,
              help="A manifest (labels not needed) listing the images, their studies and views.")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Images root of --manifest.  [default: the root `chx prepare --images` recorded in the manifest]")
@click.option("--split", default=None,
              help="Only the --manifest studies of this split (e.g. test).  [default: every split]")
@_opt(ExtractOptions, "batch_size", type=click.IntRange(min=1),
      help="Images per backbone step and studies per fusion step (studies are batched together).")
@_opt(ExtractOptions, "workers", type=click.IntRange(min=0), help="DataLoader workers decoding images.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("predictions.csv"),
              show_default=True, help="Output file (.csv, .parquet or .json).")
@click.option("--format", "fmt", type=click.Choice(["csv", "json", "parquet", "cxr-lt", "cxr-lt-2026"]),
              default=None,
              help="csv/json/parquet: one row per study; cxr-lt: the CXR-LT 2023/2024 submission, one row "
                   "per image (dicom_id = image_id) with its study's probabilities, joined by study id; "
                   "cxr-lt-2026: the same keyed by ImageID (the image's file name), 30 classes.  "
                   "[default: from the -o suffix: .json, .parquet, else csv]")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--runtime", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True,
              help="torch, or onnxruntime: the graphs of `chx export --format onnx` (--bundle DIR) on the CPU, "
                   "the same preprocessing (needs pip install 'chx[onnx]').")
@click.option("--explain", "explain_out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write explanations into this folder, as `chx explain` does: one PNG per study "
                   "(its top findings' attention on each view), explain.json and index.html.")
@click.option("--overwrite", is_flag=True, help="Replace an existing -o file (and --explain folder).")
def predict(bundle, backbone, fusion, joint, studies_dir, files, views, study_id, more_files, manifest, images,
            split, batch_size, workers, out, fmt, device, runtime, explain_out, overwrite):
    """Run stage 1 + fusion end to end on new studies, with training's preprocessing; deterministic.

    Views (PA, AP, LATERAL, LL, OTHER) matter to the fusion model as in training: a manifest's view
    column; for image files --views, else a DICOM's ViewPosition, else a view word in the file name
    (whole words of letters, any case: pa, ap, lateral, lat, ll, frontal = PA; view2_lateral.jpg ->
    LATERAL, s1-PA.png -> PA), else OTHER, with a warning when the model uses views.

    \b
    Examples:
      chx predict --bundle model.chx --files frontal.dcm lateral.dcm --study-id s1 -o s1.csv
      chx predict --bundle model.chx --files a.png b.png --views PA,LATERAL -o s1.csv
      chx predict --bundle model.chx --studies new-studies/ -o predictions.csv
      chx predict --bundle model.chx --manifest m.parquet --images imgs/ --split test -o test.csv
      chx predict --bundle model-onnx --runtime onnxruntime --studies new-studies/ -o predictions.csv
    """
    from chx.pipeline.predict import check_manifest_file, collect_inputs, load_predictor
    from chx.pipeline.predict import predict as run

    from chx.pipeline.predict import output_format

    files = _values_then_extras("--files", files, more_files)
    fmt = output_format(out, fmt)
    _refuse_existing(out, overwrite, "predictions")
    if explain_out is not None:
        if runtime != "torch":
            raise ChxError("--explain needs the models' attention: use it with --runtime torch")
        _refuse_existing(explain_out, overwrite, "explain", option="--explain")
    check_manifest_file(manifest)
    images = _images_of(manifest, images)
    inputs = collect_inputs(studies_dir, files or None, manifest, images, study_id=study_id, views=views,
                            split=split)
    predictor = load_predictor(runtime, bundle, backbone, fusion, joint=joint, device=device)
    _warn_views(inputs, predictor)
    table = run(predictor, inputs, out, fmt, batch_size=batch_size, workers=workers)
    click.echo(f"wrote {out}: {table.height:,} rows ({inputs['study_id'].n_unique():,} studies, "
               f"{inputs.height:,} images)")
    if explain_out is not None:
        from chx.pipeline.explain import FusionExplainer
        from chx.pipeline.explain import explain as run_explain

        _report_explain(run_explain(FusionExplainer(predictor), inputs, explain_out, ExplainOptions.top_k,
                                    option="--explain"), explain_out)


def _warn_views(inputs, predictor) -> None:
    """One line on stderr (once per run) when a model that uses views meets images of unknown view."""
    from chx.pipeline.predict import fusion_config_of, unknown_views_warning

    message = unknown_views_warning(inputs, fusion_config_of(predictor))
    if message:
        click.echo(message, err=True)


def _explainer(bundle, backbone, fusion, checkpoint, method, device):
    """The explainer of the model(s) given: a stage-1 ``checkpoint`` alone, or the fusion pair."""
    from chx.pipeline.explain import FusionExplainer, ImageExplainer
    from chx.pipeline.predict import Predictor

    if checkpoint is not None:
        if bundle or backbone or fusion:
            raise ChxError("--checkpoint (a stage-1 model on its own) does not go with --bundle, --backbone "
                           "or --fusion: give one model")
        return ImageExplainer.load(checkpoint, device=device, method=method)
    if method != "attention":
        raise ChxError(f"--method {method} needs --checkpoint (a stage-1 model); fusion maps are its "
                       f"attention: drop --method or give --checkpoint")
    return FusionExplainer(Predictor.load(bundle, backbone, fusion, device=device))


def _report_explain(doc: dict, out: Path) -> None:
    n = len(doc["studies"])
    click.echo(f"wrote {out}/: {n:,} figure{'' if n == 1 else 's'}, explain.json, index.html (open it in a "
               f"browser)")


@cli.command("explain", context_settings=CONTEXT, short_help="Which view and region drove each finding.")
@click.option("--bundle", type=click.Path(path_type=Path), default=None,
              help="File from `chx export`: maps of the fusion model's attention over all views.")
@click.option("--backbone", type=click.Path(path_type=Path), default=None,
              help="Stage-1 checkpoint (instead of --bundle, with --fusion).")
@click.option("--fusion", type=click.Path(path_type=Path), default=None, help="Fusion checkpoint.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="A stage-1 checkpoint alone (instead of the fusion models): single-image maps, each "
                   "image with its own probabilities.")
@click.option("--studies", "studies_dir", type=click.Path(path_type=Path), default=None,
              help="A folder holding one sub-folder of images (PNG, JPEG, DICOM) per study.")
@click.option("--files", multiple=True, type=click.Path(path_type=Path),
              help="Image files of ONE study: --files a.dcm b.dcm (or repeat the option).")
@click.option("--views", "views", default=None, metavar="LIST", help=_VIEWS_HELP)
@click.option("--study-id", default="study", show_default=True, help="Study id of the --files study.")
@click.argument("more_files", nargs=-1, type=click.Path(path_type=Path), metavar="")
@click.option("--manifest", type=click.Path(path_type=Path), default=None,
              help="A manifest (labels not needed) listing the images, their studies and views.")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Images root of --manifest.  [default: the root `chx prepare --images` recorded in the manifest]")
@click.option("--split", default=None, help="Only the --manifest images of this split (e.g. test).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N studies.")
@_opt(ExplainOptions, "top_k", type=click.IntRange(min=1),
      help="Rows of each figure: the study's most probable findings.")
@click.option("--classes", default=None, metavar="LIST",
              help="Comma-separated class names to show (in this order) instead of the top-k.")
@_opt(ExplainOptions, "method", type=click.Choice(["attention", "grad-cam"]),
      help="attention: the ML-Decoder head's cross-attention (one map per finding); grad-cam: Grad-CAM on "
           "the last feature map (with --checkpoint only).")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("explanations"),
              show_default=True, help="Output folder: one PNG per study, explain.json, index.html.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--overwrite", is_flag=True, help="Replace an existing -o folder.")
def explain(bundle, backbone, fusion, checkpoint, studies_dir, files, views, study_id, more_files, manifest,
            images, split, limit, top_k, classes, method, out, device, overwrite):
    """Show which view and which region drove each finding: per study one PNG (rows: findings,
    columns: views, each image with the finding's map on its own pixels, captioned with the
    probability and the view's share of the attention), explain.json (probabilities, shares, peaks
    in image pixels) and index.html, a gallery that opens offline in a browser.

    \b
    Examples:
      chx explain --bundle model.chx --files a.png b.png --views PA,LATERAL --study-id s1 -o s1-explained
      chx explain --bundle model.chx --manifest m.parquet --images imgs/ --split test --limit 20 -o ex
      chx explain --checkpoint runs/b/best.pt --files x.png -o x-explained
    """
    from chx.pipeline.explain import explain as run
    from chx.pipeline.explain import select_studies
    from chx.pipeline.predict import check_manifest_file, collect_inputs

    files = _values_then_extras("--files", files, more_files)
    _refuse_existing(out, overwrite, "explain")
    check_manifest_file(manifest)
    images = _images_of(manifest, images)
    inputs = collect_inputs(studies_dir, files or None, manifest, images, study_id=study_id, views=views,
                            split=split)
    inputs = select_studies(inputs, limit=limit)
    explainer = _explainer(bundle, backbone, fusion, checkpoint, method, device)
    if checkpoint is None:      # the fusion models use views; a stage-1 model alone does not
        _warn_views(inputs, explainer.predictor)
    chosen = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    _report_explain(run(explainer, inputs, out, top_k, chosen, images=images if manifest else None), out)


# ----------------------------------------------------------------------------------------- demo

@cli.command("make-demo-data", context_settings=CONTEXT, short_help="Write the synthetic multi-view dataset.")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--studies", type=click.IntRange(min=10), default=1000, show_default=True, help="Number of studies.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed (same seed, same files).")
@click.option("--size", type=click.IntRange(min=32), default=160, show_default=True, help="Image size in pixels.")
@_opt(DemoConfig, "views", type=click.IntRange(3, 4),
      help="Most views per study: 3, the standard demo; 4, the 4-view variant (PA, AP, LATERAL, LL; "
           "a one-view-type sign shows in one of the study's views of that type).")
def make_demo_data(out, studies, seed, size, views):
    """Write a synthetic multi-view dataset: OUT/images/*.png, OUT/manifest.parquet and
    OUT/signs.parquet (the box of each drawn sign).

    Frontal + lateral views per study (some with one, a few with three); long-tailed findings whose
    signs show in both views, only the frontal or only the lateral view; split by patient. With
    --views 4: studies of 1-4 views, for choosing how many views to fuse (train-fusion --max-views).
    """
    from chx.data.demo import make_demo_data as run

    path = run(out, studies=studies, seed=seed, size=size, max_views=views)
    click.echo(f"wrote {path} and {out / 'images'}")


@cli.command("demo", context_settings=CONTEXT, short_help="Whole pipeline on the synthetic demo (or your data).")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"),
              show_default=True, help="Folder for the data, runs, store and table (a demo folder is replaced; any "
                   "other non-empty folder is refused).")
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Run on this manifest instead of synthetic data (splits train/val[/test]).")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Images root of --manifest.  [default: the root `chx prepare --images` recorded in the manifest]")
@_opt(DemoConfig, "studies", type=click.IntRange(min=50),
              help="Synthetic studies to generate.")
@_opt(DemoConfig, "size", type=click.IntRange(min=32), help="Image size in pixels.")
@_opt(DemoConfig, "model", help="timm ConvNeXt for stage 1.")
@_opt(DemoConfig, "backbone_epochs", type=float, help="Stage-1 epochs.")
@_opt(DemoConfig, "backbone_lr", type=float,
              help="Stage-1 learning rate (from scratch: higher than the paper's fine-tuning 3e-5).")
@_opt(DemoConfig, "fusion_epochs", type=float, help="Stage-2 epochs.")
@_opt(DemoConfig, "fusion_lr", type=float, help="Stage-2 learning rate.")
@_opt(DemoConfig, "workers", type=click.IntRange(min=0), help="DataLoader workers.")
@_opt(DemoConfig, "seed", type=int, help="Seed of data, splits and training.")
@_opt(DemoConfig, "views", type=click.IntRange(3, 4),
      help="Most views per synthetic study: 3, the standard demo; 4, the 4-view variant (see make-demo-data).")
def demo(out, manifest, images, studies, size, model, backbone_epochs, backbone_lr, fusion_epochs,
         fusion_lr, workers, seed, views):
    """Run the whole pipeline: data -> train-backbone -> extract-features -> train-fusion ->
    comparison of fusion with the stage-1 model's per-study aggregations (mean, max,
    view-weighted, frontal-only, lateral-only) on the test split.

    Without --manifest it generates the synthetic multi-view data, whose findings are visible in
    both views, only the frontal or only the lateral view, and also prints mAP by visibility.
    Offline, CPU-friendly (about 9 minutes on 2 cores with the defaults).
    """
    from chx.pipeline.demo import run_demo, visibility_table

    if manifest is None and images is not None:
        raise ChxError("--images goes with --manifest (the manifest's paths are relative to --images)")
    images = _images_of(manifest, images)
    cfg = DemoConfig(studies=studies, size=size, model=model, backbone_epochs=backbone_epochs,
                     backbone_lr=backbone_lr, fusion_epochs=fusion_epochs, fusion_lr=fusion_lr,
                     workers=workers, seed=seed, views=views)
    from chx.atomic import write_marker

    _refuse_existing(out, True, "demo")   # the help says "(replaced)": a demo folder only, never another
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "demo")
    result = run_demo(out, cfg, manifest=manifest, images=images, echo=click.echo)
    if manifest is None:
        from chx.data.demo import visibility

        click.echo("\nmAP by where a finding is visible:")
        click.echo(visibility_table(result["results"], visibility()))


# ----------------------------------------------------------------------------------------- entry

def _one_line(error: ChxError) -> str:
    """The user's message, also when a DataLoader worker raised it (torch re-raises it in the main
    process with the worker's traceback prepended: keep the original message only)."""
    message = str(error)
    if "Original Traceback" in message:
        last = [line for line in message.strip().splitlines() if line.strip()][-1]
        prefix = f"{type(error).__module__}.{type(error).__name__}: "
        message = last[len(prefix):] if last.startswith(prefix) else last
    return message


class _Terminated(BaseException):
    """SIGTERM outside a training loop: unwinds like Ctrl-C, so that ``finally`` blocks (temp files,
    DataLoader workers, store handles) run before chx exits with 143."""


def _raise_terminated(signum, frame):
    raise _Terminated


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 2. Every exit path
    (success, a user error, any exception, SIGINT, SIGTERM) ends the child processes chx started."""
    old_term = _set_signal(signal.SIGTERM, _raise_terminated)
    try:
        rc = cli.main(args=argv, prog_name="chx", standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except click.exceptions.Abort:   # click's form of Ctrl-C (KeyboardInterrupt)
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        # One line, like every other user error: what is wrong and where to read more.
        hint = ""
        ctx = getattr(e, "ctx", None)
        if ctx is not None:
            hint = f" (see `{ctx.command_path} --help`)"
        click.echo(f"error: {e.format_message()}{hint}", err=True)
        sys.exit(e.exit_code)
    except ChxError as e:
        click.echo(f"error: {_one_line(e)}", err=True)
        sys.exit(2)
    except Interrupted as e:
        click.echo(str(e), err=True)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except _Terminated:
        click.echo("terminated", err=True)
        sys.exit(128 + signal.SIGTERM)
    except BrokenPipeError:
        sys.exit(1)
    finally:
        end_children()
        _set_signal(signal.SIGTERM, old_term)


def _set_signal(signum, handler):
    """Install a handler; returns the old one (None off the main thread, where Python allows none)."""
    if handler is None:
        return None
    try:
        return signal.signal(signum, handler)
    except ValueError:
        return None
