"""The `chx` command line. Thin: parses options and calls `chx.pipeline` functions.

User mistakes (:class:`chx.errors.ChxError`) print one line and exit with code 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from chx.errors import ChxError

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
    """Put the adapter list (name and one line each) into the command's help."""
    from chx.data.adapters import ADAPTERS
    listing = "\n".join(f"      {name:<10} {a.summary}" for name, a in ADAPTERS.items())
    f.__doc__ = f.__doc__.replace("{adapters}", listing)
    return f


@cli.command(context_settings=CONTEXT, short_help="Native label files -> one manifest.")
@click.argument("dataset")
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Manifest to write (.parquet, or .csv).  [default: DATASET.parquet]")
@click.option("--classes", default=None, metavar="LIST",
              help="Target class list: 'cxr-lt-2023' (the 26 CXR-LT 2023 classes), 'data' (the "
                   "dataset's own classes), a comma-separated list, or a file with one class per "
                   "line.  [default: cxr-lt-2023; 'data' for covid]")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Images root: find each image under it and store its path relative to it.")
@click.option("--only-existing", is_flag=True,
              help="With --images: drop rows whose image file is not under the root.")
@click.option("--val-fraction", type=float, default=0.0, show_default=True,
              help="Fraction of patients for validation (split by patient, rare classes kept in each split).")
@click.option("--test-fraction", type=float, default=0.0, show_default=True,
              help="Fraction of patients for test.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split.")
@click.option("--uncertain", type=click.Choice(["ignore", "ones", "zeros"]), default="ignore",
              show_default=True, help="chexpert: what -1 (uncertain) becomes: null, 1 or 0.")
@click.option("--min-readers", type=click.IntRange(min=1), default=1, show_default=True,
              help="vindr: a finding is positive when at least this many readers marked it.")
@_with_adapters
def prepare(dataset, sources, out, classes, images, only_existing, val_fraction, test_fraction,
            seed, uncertain, min_readers):
    """Turn a dataset's native label files into a chx manifest.

    DATASET is one of the adapters below; SOURCES are its label files (or folder). Classes are
    harmonised onto the target list; a class the dataset does not annotate is left empty (null),
    never 0.

    \b
    Datasets:
{adapters}

    \b
    Examples:
      chx prepare nih Data_Entry_2017_v2020.csv --images nih/ --val-fraction 0.1 -o nih.parquet
      chx prepare chexpert CheXpert-v1.0-small/train.csv --uncertain ignore -o chexpert.parquet
      chx prepare covid covid-cxr/metadata.csv --images covid-cxr/images --val-fraction 0.2
    """
    from chx.data.adapters import get_adapter
    from chx.pipeline.prepare import prepare as run_prepare

    ctx = click.get_current_context()
    get_adapter(dataset)  # unknown name -> one clear line
    for name, owner in (("uncertain", "chexpert"), ("min_readers", "vindr")):
        given = ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
        if given and dataset != owner:
            raise ChxError(f"--{name.replace('_', '-')} applies only to `chx prepare {owner}`")
    if only_existing and images is None:
        raise ChxError("--only-existing needs --images ROOT (the folder to look for the images in)")
    for src in sources:
        if not src.exists():
            raise ChxError(f"{src} does not exist; give the dataset's label file(s) or folder")
    options = {"chexpert": {"uncertain": uncertain}, "vindr": {"min_readers": min_readers}}.get(dataset, {})
    out = out or Path(f"{dataset}.parquet")
    s = run_prepare(dataset, list(sources), out, classes=classes, images=images,
                    only_existing=only_existing, val_fraction=val_fraction,
                    test_fraction=test_fraction, seed=seed, options=options)
    splits = ", ".join(f"{k if k != 'None' else 'unassigned'} {v:,}" for k, v in s["splits"].items())
    click.echo(f"wrote {out}: {s['images']:,} images, {s['studies']:,} studies "
               f"({s['multi_view_studies']:,} multi-view), {s['subjects']:,} patients, "
               f"{len(s['positives'])} classes; splits: {splits}")
    annotated = [c for c in s["positives"] if s["annotated"][c]]
    missing = [c for c in s["positives"] if not s["annotated"][c]]
    click.echo("positives: " + ", ".join(f"{c} {s['positives'][c]:,}" for c in annotated))
    if missing:
        click.echo(f"not annotated by {dataset} (null): " + ", ".join(missing))


# ----------------------------------------------------------------------------------------- training

def train_options(f):
    """Optimisation options shared by train-backbone and train-fusion (paper defaults)."""
    opts = [
        click.option("--epochs", type=float, default=6.0, show_default=True,
                     help="Epochs (fractions allowed)."),
        click.option("--batch-size", type=int, default=8, show_default=True, help="Batch size per process."),
        click.option("--lr", type=float, default=3e-5, show_default=True, help="AdamW peak learning rate."),
        click.option("--weight-decay", type=float, default=0.01, show_default=True, help="AdamW weight decay."),
        click.option("--warmup", type=float, default=0.05, show_default=True,
                     help="Linear warm-up, as a fraction of all steps; then cosine decay (stepped per step)."),
        click.option("--grad-accum", type=int, default=1, show_default=True,
                     help="Batches accumulated per optimizer step."),
        click.option("--clip-grad", type=float, default=1.0, show_default=True,
                     help="Max gradient norm (0 = no clipping)."),
        click.option("--precision", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto",
                     show_default=True, help="Mixed precision on GPU (auto: bf16 if supported, else fp16 "
                     "with a grad scaler); CPU always runs fp32."),
        click.option("--ema", type=float, default=0.0, show_default=True,
                     help="EMA decay of the weights used for validation and prediction (0 = off; e.g. 0.999)."),
        click.option("--val-every", type=float, default=0.25, show_default=True,
                     help="Validate (and checkpoint) every this fraction of an epoch."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of initialisation, order, augmentation."),
        click.option("--workers", type=int, default=2, show_default=True, help="DataLoader worker processes."),
        click.option("--max-steps", type=int, default=0, show_default=True,
                     help="Stop after this many optimizer steps (0 = train all epochs); the schedule is unchanged."),
        click.option("--log-every", type=int, default=10, show_default=True,
                     help="Write the training loss to metrics.jsonl every this many steps."),
        click.option("--nonfinite", type=click.Choice(["stop", "skip"]), default="stop", show_default=True,
                     help="On a NaN/inf loss: stop (naming the step and images) or skip that batch."),
        click.option("--device", default="auto", show_default=True,
                     help="auto (cuda if available), cpu or cuda."),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt, exactly."),
        click.option("--overwrite", is_flag=True, help="Start again in an --out that already holds a run."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _train_config(kw: dict):
    from chx.pipeline.trainer import TrainConfig
    names = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: kw.pop(k) for k in list(kw) if k in names})


@cli.command("train-backbone", context_settings=CONTEXT, short_help="Stage 1: ConvNeXt + ML-Decoder on images.")
@click.option("--manifest", "manifests", multiple=True, required=True,
              type=click.Path(path_type=Path),
              help="Manifest(s); repeat to train on their union (e.g. with a pseudo-labelled one). "
                   "Rows with split 'train' or no split train; split 'val' validates.")
@click.option("--images", "images", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Images root; once for all manifests or once per --manifest.")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/backbone"),
              show_default=True, help="Run folder: config.json, metrics.jsonl, last.pt, best.pt.")
@click.option("--model", default="convnext_small.fb_in22k_ft_in1k", show_default=True,
              help="Any timm ConvNeXt name (e.g. convnext_atto for a quick CPU run).")
@click.option("--size", type=click.IntRange(min=32), default=1024, show_default=True,
              help="Input size in pixels (square).")
@click.option("--resize", type=click.Choice(["letterbox", "squash"]), default="letterbox", show_default=True,
              help="Keep the aspect ratio and pad (letterbox) or stretch (squash, the reference's way).")
@click.option("--pretrained/--no-pretrained", default=True, show_default=True,
              help="Start from timm's pretrained weights (needs the network once).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Local timm/safetensors weights file to start from (offline alternative to --pretrained).")
@click.option("--balance/--no-balance", default=True, show_default=True,
              help="Class-aware balanced sampling (round-robin over classes).")
@click.option("--tta/--no-tta", default=True, show_default=True,
              help="Validation with the mean of the image and its horizontal flip.")
@click.option("--grad-checkpointing", is_flag=True, help="Trade compute for memory (large inputs on GPU).")
@train_options
def train_backbone(manifests, images, out, model, size, resize, pretrained, weights, balance, tta,
                   grad_checkpointing, resume, overwrite, **kw):
    """Stage 1: train a ConvNeXt + ML-Decoder image classifier with weighted ASL.

    \b
    Example (a quick CPU run on real images):
      chx train-backbone --manifest covid.parquet --images covid-cxr/images \\
          --model convnext_atto --size 256 --no-pretrained --epochs 3 -o runs/covid-b
    """
    from chx.pipeline.train_backbone import BackboneOptions
    from chx.pipeline.train_backbone import train_backbone as run

    cfg = _train_config(kw)
    opts = BackboneOptions(model=model, size=size, resize=resize, pretrained=pretrained,
                           weights=weights, balance=balance, tta=tta,
                           grad_checkpointing=grad_checkpointing)
    result = run(list(manifests), list(images), out, opts, cfg, resume=resume, overwrite=overwrite)
    _report_fit(result)


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
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Images root of that manifest.")
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

    s = run(checkpoint, manifest, images, out, tta=tta, batch_size=batch_size, workers=workers,
            device=device)
    click.echo(f"wrote {out}: {s['images']:,} images; {s['filled']:,} null labels filled with "
               f"probabilities, {s['kept']:,} labels kept")


# ----------------------------------------------------------------------------------------- stage 2

@cli.command("extract-features", context_settings=CONTEXT, short_help="Stage 2a: backbone maps -> feature store.")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path),
              help="Stage-1 checkpoint (best.pt of train-backbone); its preprocessing is reused.")
@click.option("--manifest", required=True, type=click.Path(path_type=Path), help="Manifest of the images.")
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Images root of the manifest.")
@click.option("--store", "store", required=True,
              help="Feature store: a folder (Zarr v3, default; or an fsspec URL like memory://x) or a "
                   "file ending .h5 (HDF5, one writer).")
@click.option("--pool", type=int, default=1, show_default=True,
              help="Average-pool K x K before storing (2 -> a quarter of the size).")
@click.option("--flip", is_flag=True, help="Also store the horizontally flipped image's maps (TTA, augmentation).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Batch size.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="DataLoader workers decoding images while the model runs.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--shard", default=None, metavar="I/N",
              help="Fill only images with row % N == I (run N processes at once; Zarr only). "
                   "Under torchrun the rank is used.")
@click.option("--compress/--no-compress", default=False, show_default=True,
              help="Compress the maps in a new store (Zarr: zstd; HDF5: lzf). Float16 maps barely compress "
                   "(~1.09x) and it slows writing and reading; worth it only where bytes cost more than time.")
@click.option("--overwrite", is_flag=True, help="Replace a store made by another checkpoint/options.")
def extract_features(checkpoint, manifest, images, store, pool, flip, batch_size, workers, device,
                     shard, compress, overwrite):
    """Stage 2a: cache the frozen backbone's feature maps of every image, grouped by study.

    Rerunning the same command continues with the images not yet done; a store made by another
    checkpoint, preprocessing or class list is refused (--overwrite replaces it).
    """
    from chx.pipeline.extract import extract_features as run

    r = run(checkpoint, manifest, images, store, pool=pool, flip=flip, batch_size=batch_size,
            workers=workers, device=device, shard=shard, compress=compress, overwrite=overwrite,
            echo=click.echo)
    state = "complete" if r.complete else f"{r.remaining:,} images still to do (other shards or a rerun)"
    speed = f" at {r.images_per_s:.1f} images/s" if r.written else ""
    click.echo(f"wrote {r.written:,} images{speed}; store {r.store} is {state}")


@cli.command("train-fusion", context_settings=CONTEXT, short_help="Stage 2b: fusion transformer from the store.")
@click.option("--store", "store", required=True, help="Complete feature store from extract-features.")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/fusion"),
              show_default=True, help="Run folder: config.json, metrics.jsonl, last.pt, best.pt.")
@click.option("--max-views", type=click.IntRange(min=1), default=4, show_default=True,
              help="View slots per study (more views: a random subset in training, a fixed choice at evaluation).")
@click.option("--encoder-layers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Transformer encoder layers (0: ML-Decoder directly on the projected tokens).")
@click.option("--dim", type=click.IntRange(min=8), default=None,
              help="Token width D.  [default: the store's channels C]")
@click.option("--heads", type=click.IntRange(min=1), default=8, show_default=True, help="Attention heads.")
@click.option("--ffn-dim", type=click.IntRange(min=1), default=2048, show_default=True, help="Feed-forward width.")
@click.option("--dropout", type=float, default=0.1, show_default=True, help="Dropout.")
@click.option("--pos-enc/--no-pos-enc", default=True, show_default=True, help="2-D positional encoding per view.")
@click.option("--segment-embedding/--no-segment-embedding", default=True, show_default=True,
              help="Learnable embedding of each view slot.")
@click.option("--view-embedding/--no-view-embedding", default=False, show_default=True,
              help="Learnable embedding of the view type (frontal, lateral, other).")
@click.option("--shuffle/--no-shuffle", default=True, show_default=True,
              help="Random view order in training (order must carry no information).")
@click.option("--balance/--no-balance", default=False, show_default=True, help="Class-aware sampling of studies.")
@click.option("--flip-aug/--no-flip-aug", default=True, show_default=True,
              help="Use the store's flipped maps for a random half of the training studies (stores made with --flip).")
@click.option("--preload", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Hold the store's features in memory (auto: when they fit in 4 GiB).")
@train_options
def train_fusion(store, out, max_views, encoder_layers, dim, heads, ffn_dim, dropout, pos_enc,
                 segment_embedding, view_embedding, shuffle, balance, flip_aug, preload, resume,
                 overwrite, **kw):
    """Stage 2b: train the CheXFusion transformer from the feature store alone.

    No image is read and no backbone is run.

    \b
    Example:
      chx train-fusion --store runs/covid.zarr --epochs 20 --lr 1e-4 -o runs/covid-f
    """
    from chx.pipeline.train_fusion import FusionOptions
    from chx.pipeline.train_fusion import train_fusion as run

    cfg = _train_config(kw)
    opts = FusionOptions(max_views=max_views, encoder_layers=encoder_layers, dim=dim, heads=heads,
                         ffn_dim=ffn_dim, dropout=dropout, pos_enc=pos_enc,
                         segment_embedding=segment_embedding, view_embedding=view_embedding,
                         shuffle=shuffle, balance=balance, flip_aug=flip_aug, preload=preload)
    _report_fit(run(store, out, opts, cfg, resume=resume, overwrite=overwrite))


@cli.group("store", cls=_Group, context_settings=CONTEXT, short_help="Inspect feature stores (store info).")
def store_group():
    """Inspect feature stores."""


@store_group.command("info", context_settings=CONTEXT)
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def store_info(path, as_json):
    """Images, studies, views per study, splits, size on disk, compression, fingerprint, completeness."""
    import json

    from chx.store import open_store

    with open_store(path) as s:
        info = s.info()
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    mb = lambda b: "n/a" if b is None else f"{b / 2**20:,.1f} MiB"  # noqa: E731
    rows = [("backend", info.get("backend", "")), ("images", f"{info['images']:,}"),
            ("studies", f"{info['studies']:,}"),
            ("views per study", ", ".join(f"{k}: {v}" for k, v in sorted(info["views_per_study"].items(),
                                                                          key=lambda kv: int(kv[0])))),
            ("splits (studies)", ", ".join(f"{k or 'none'}: {v}" for k, v in info["splits"].items())),
            ("feature shape", f"{tuple(info['feature_shape'])} {info.get('dtype', 'float16')}"),
            ("size on disk", mb(info.get("bytes_on_disk"))),
            ("uncompressed", mb(info.get("bytes_uncompressed"))),
            ("compression ratio", f"{info['compression_ratio']:.2f}" if info.get("compression_ratio") else "n/a"),
            ("done", f"{info['done']:,} / {info['images']:,}"), ("complete", str(info["complete"])),
            ("classes", f"{len(info['class_names'])}: {', '.join(info['class_names'][:5])}{', ...' if len(info['class_names']) > 5 else ''}"),
            ("fingerprint", ", ".join(f"{k}={v}" for k, v in info["fingerprint"].items()))]
    for k, v in rows:
        click.echo(f"{k:<18} {v}")


# ----------------------------------------------------------------------------------------- evaluate

@cli.command("evaluate", context_settings=CONTEXT, short_help="Long-tail metrics, report and plots.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="A backbone or fusion checkpoint (best.pt).")
@click.option("--store", default=None, help="Feature store (for a fusion checkpoint).")
@click.option("--manifest", type=click.Path(path_type=Path), default=None,
              help="Manifest (for a backbone checkpoint), with --images.")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Images root of --manifest.")
@click.option("--split", default="test", show_default=True, help="Split to evaluate.")
@click.option("--thresholds-from", default="val", show_default=True,
              help="Split on which per-class F1 thresholds are tuned (max F1); 'none' = 0.5.")
@click.option("--groups", type=click.Choice(["thirds", "cxr-lt"]), default="thirds", show_default=True,
              help="Head/medium/tail by training frequency: thirds, or CXR-LT's 8/10/8 (26 classes).")
@click.option("--views", type=click.Choice(["all", "frontal", "lateral"]), default="all", show_default=True,
              help="Fusion only: keep only these views of each study (robustness to a missing view).")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder: metrics.json, per_class.csv, summary.md, plots.  [default: eval-SPLIT]")
@click.option("--compare", "compare_runs", multiple=True, type=click.Path(path_type=Path),
              help="Instead: print one side-by-side table of report folders (repeat the option).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Batch size.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="DataLoader workers.")
def evaluate(checkpoint, store, manifest, images, split, thresholds_from, groups, views, out,
             compare_runs, batch_size, workers):
    """Per-class and macro AP (the ranking metric), AUROC, F1 at tuned thresholds, head/medium/tail
    mAP and calibration (ECE) of a checkpoint on one split; writes a report folder with plots.

    \b
    Examples:
      chx evaluate --checkpoint runs/f/best.pt --store covid.zarr --split val -o eval-f
      chx evaluate --checkpoint runs/b/best.pt --manifest covid.parquet --images covid-cxr/images --split val
      chx evaluate --compare eval-f eval-b
    """
    if compare_runs:
        from chx.pipeline.report import compare_runs as run_compare

        click.echo(run_compare(list(compare_runs)))
        return
    if checkpoint is None:
        raise ChxError("give --checkpoint (or --compare REPORT_DIR ... to compare reports)")
    from chx.pipeline.evaluate import evaluate as run
    from chx.pipeline.report import summary_table

    out = out or Path(f"eval-{split}")
    result = run(checkpoint, out, store=store, manifest=manifest, images=images, split=split,
                 thresholds_from=None if thresholds_from == "none" else thresholds_from, groups=groups,
                 views=views, batch_size=batch_size, workers=workers)
    click.echo(summary_table(result))
    click.echo(f"\nreport: {out}/ (metrics.json, per_class.csv, summary.md, plots)")


# ----------------------------------------------------------------------------------------- inference

@cli.command("export", context_settings=CONTEXT, short_help="Bundle stage-1 + fusion weights for predict.")
@click.option("--backbone", required=True, type=click.Path(path_type=Path), help="Stage-1 checkpoint.")
@click.option("--fusion", required=True, type=click.Path(path_type=Path),
              help="Fusion checkpoint trained on that backbone's features.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("model.chx"),
              show_default=True, help="Bundle file to write.")
def export(backbone, fusion, out):
    """Bundle both models' weights, the class names and the preprocessing into one file."""
    from chx.pipeline.predict import export_bundle

    b = export_bundle(backbone, fusion, out)
    click.echo(f"wrote {out}: {len(b['class_names'])} classes, backbone "
               f"{b['backbone']['model_config']['backbone_name']} at {b['backbone']['preprocess']['size']} px")


@cli.command("predict", context_settings=CONTEXT, short_help="Study probabilities for new images.")
@click.option("--bundle", type=click.Path(path_type=Path), default=None, help="File from `chx export`.")
@click.option("--backbone", type=click.Path(path_type=Path), default=None,
              help="Stage-1 checkpoint (instead of --bundle, with --fusion).")
@click.option("--fusion", type=click.Path(path_type=Path), default=None, help="Fusion checkpoint.")
@click.option("--studies", "studies_dir", type=click.Path(path_type=Path), default=None,
              help="A folder holding one sub-folder of images (PNG, JPEG, DICOM) per study.")
@click.option("--files", multiple=True, type=click.Path(path_type=Path),
              help="Image files of ONE study (repeat the option).")
@click.option("--manifest", type=click.Path(path_type=Path), default=None,
              help="A manifest (labels not needed) listing the images and their studies.")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Images root of --manifest.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("predictions.csv"),
              show_default=True, help="Output file (.csv, .parquet or .json).")
@click.option("--format", "fmt", type=click.Choice(["csv", "json", "cxr-lt"]), default="csv", show_default=True,
              help="csv/json: one row per study; cxr-lt: the challenge submission, one row per image "
                   "(dicom_id) with its study's probabilities, joined by study id.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
def predict(bundle, backbone, fusion, studies_dir, files, manifest, images, out, fmt, device):
    """Run stage 1 + fusion end to end on new studies, with training's preprocessing; deterministic."""
    from chx.pipeline.predict import Predictor, collect_inputs
    from chx.pipeline.predict import predict as run

    inputs = collect_inputs(studies_dir, list(files) or None, manifest, images)
    predictor = Predictor.load(bundle, backbone, fusion, device=device)
    table = run(predictor, inputs, out, fmt)
    click.echo(f"wrote {out}: {table.height:,} rows ({inputs['study_id'].n_unique():,} studies, "
               f"{inputs.height:,} images)")


# ----------------------------------------------------------------------------------------- demo

@cli.command("make-demo-data", context_settings=CONTEXT, short_help="Write the synthetic multi-view dataset.")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--studies", type=click.IntRange(min=10), default=1000, show_default=True, help="Number of studies.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed (same seed, same files).")
@click.option("--size", type=click.IntRange(min=32), default=160, show_default=True, help="Image size in pixels.")
def make_demo_data(out, studies, seed, size):
    """Write a synthetic multi-view dataset: OUT/images/*.png and OUT/manifest.parquet.

    Frontal + lateral views per study (some with one, a few with three); long-tailed findings whose
    signs show in both views, only the frontal or only the lateral view; split by patient.
    """
    from chx.data.demo import make_demo_data as run

    path = run(out, studies=studies, seed=seed, size=size)
    click.echo(f"wrote {path} and {out / 'images'}")


@cli.command("demo", context_settings=CONTEXT, short_help="Whole pipeline on the synthetic demo (or your data).")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"),
              show_default=True, help="Folder for the data, runs, store and table (replaced).")
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Run on this manifest instead of synthetic data (needs --images; splits train/val[/test]).")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Images root of --manifest.")
@click.option("--studies", type=click.IntRange(min=50), default=1000, show_default=True,
              help="Synthetic studies to generate.")
@click.option("--size", type=click.IntRange(min=32), default=128, show_default=True, help="Image size in pixels.")
@click.option("--model", default="convnext_atto", show_default=True, help="timm ConvNeXt for stage 1.")
@click.option("--backbone-epochs", type=float, default=4, show_default=True, help="Stage-1 epochs.")
@click.option("--backbone-lr", type=float, default=1e-3, show_default=True,
              help="Stage-1 learning rate (from scratch: higher than the paper's fine-tuning 3e-5).")
@click.option("--fusion-epochs", type=float, default=30, show_default=True, help="Stage-2 epochs.")
@click.option("--fusion-lr", type=float, default=3e-4, show_default=True, help="Stage-2 learning rate.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="DataLoader workers.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of data, splits and training.")
def demo(out, manifest, images, studies, size, model, backbone_epochs, backbone_lr, fusion_epochs,
         fusion_lr, workers, seed):
    """Run the whole pipeline: data -> train-backbone -> extract-features -> train-fusion ->
    comparison of fusion with the stage-1 model's per-study aggregations (mean, max,
    view-weighted, frontal-only, lateral-only) on the test split.

    Without --manifest it generates the synthetic multi-view data, whose findings are visible in
    both views, only the frontal or only the lateral view, and also prints mAP by visibility.
    Offline, CPU-friendly (4-6 minutes on 2 cores with the defaults).
    """
    from chx.pipeline.demo import DemoConfig, run_demo, visibility_table

    if (manifest is None) != (images is None):
        raise ChxError("--manifest and --images go together (the manifest's paths are relative to --images)")
    cfg = DemoConfig(studies=studies, size=size, model=model, backbone_epochs=backbone_epochs,
                     backbone_lr=backbone_lr, fusion_epochs=fusion_epochs, fusion_lr=fusion_lr,
                     workers=workers, seed=seed)
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


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        rc = cli.main(args=argv, prog_name="chx", standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
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
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)
