"""The training commands (train-backbone, pseudo-label, extract-features, train-fusion,
train-joint) and `chx store info` / `chx store verify`."""

from __future__ import annotations

import sys
from dataclasses import asdict

import click

from chx.cli._base import CONTEXT, _config_option, _Group, _images_of, _report_fit, _RunCommand, cli
from chx.cli.options import options
from chx.options import (BackboneOptions, ExtractInputs, ExtractOptions, FusionOptions, ImagesCacheOption,
                         JointOptions, PseudoLabelOptions, RunControl, TrainBackboneInputs, TrainConfig, TrainFusionInputs,
                         TrainJointInputs)


@cli.command("train-backbone", cls=_RunCommand, context_settings=CONTEXT,
             short_help="Stage 1: ConvNeXt + ML-Decoder on images.")
@_config_option
@options(io=TrainBackboneInputs, opts=BackboneOptions, train=TrainConfig, run=RunControl, cache=ImagesCacheOption)
def train_backbone(io: TrainBackboneInputs, opts: BackboneOptions, train: TrainConfig, run: RunControl,
                   cache: ImagesCacheOption):
    """Stage 1: train a ConvNeXt + ML-Decoder image classifier with weighted ASL.

    \b
    Example (a quick CPU run on real images):
      chx train-backbone --manifest covid.parquet --images covid-cxr/images \\
          --model convnext_atto --size 256 --no-pretrained --epochs 3 -o runs/covid-b
    """
    from chx.pipeline.train_backbone import train_backbone as stage

    need = cache.images_cache is None     # with --images-cache the image files are not read
    images = io.images or [_images_of(m, None, required=need) for m in io.manifests]
    _report_fit(stage(list(io.manifests), list(images), io.out, opts, train, resume=run.resume,
                      overwrite=run.overwrite, images_cache=cache.images_cache))


@cli.command("pseudo-label", context_settings=CONTEXT, short_help="Fill unannotated labels with soft labels.")
@options(o=PseudoLabelOptions, cache=ImagesCacheOption)
def pseudo_label(o: PseudoLabelOptions, cache: ImagesCacheOption):
    """Self-training: fill a manifest's unannotated (null) labels with soft pseudo labels.

    Only null entries change; the dataset's own 0/1 labels stay. Train again on the union with
    `chx train-backbone --manifest own.parquet --manifest pseudo.parquet --images A --images B`.
    """
    from chx.pipeline.pseudo_label import pseudo_label as run

    images = _images_of(o.manifest, o.images, required=cache.images_cache is None)
    s = run(o.checkpoint, o.manifest, images, o.out, tta=o.tta, batch_size=o.batch_size, workers=o.workers,
            device=o.device, images_cache=cache.images_cache)
    click.echo(f"wrote {o.out}: {s['images']:,} images; {s['filled']:,} null labels filled with "
               f"probabilities, {s['kept']:,} labels kept")


# ----------------------------------------------------------------------------------------- stage 2

@cli.command("extract-features", context_settings=CONTEXT, short_help="Stage 2a: backbone maps -> feature store.")
@_config_option
@options(io=ExtractInputs, opts=ExtractOptions, cache=ImagesCacheOption)
def extract_features(io: ExtractInputs, opts: ExtractOptions, cache: ImagesCacheOption):
    """Stage 2a: cache the frozen backbone's feature maps of every image, grouped by study.

    Rerunning the same command continues with the images not yet done; a store made by another
    checkpoint, preprocessing or class list is refused (--overwrite replaces it).
    """
    from chx.pipeline.extract import extract_features as run

    images = _images_of(io.manifest, io.images, required=cache.images_cache is None)
    r = run(io.checkpoint, io.manifest, images, io.store, **asdict(opts), echo=click.echo,
            images_cache=cache.images_cache)
    state = "complete" if r.complete else f"{r.remaining:,} images still to do (other shards or a rerun)"
    speed = f" at {r.images_per_s:.1f} images/s" if r.written else ""
    click.echo(f"wrote {r.written:,} images{speed}; store {r.store} is {state}")


@cli.command("train-fusion", cls=_RunCommand, context_settings=CONTEXT,
             short_help="Stage 2b: fusion transformer from the store.")
@_config_option
@options(io=TrainFusionInputs, opts=FusionOptions, train=TrainConfig, run=RunControl)
def train_fusion(io: TrainFusionInputs, opts: FusionOptions, train: TrainConfig, run: RunControl):
    """Stage 2b: train the CheXFusion transformer from the feature store alone.

    No image is read and no backbone is run.

    \b
    Example:
      chx train-fusion --store runs/covid.zarr --epochs 20 --lr 1e-4 -o runs/covid-f
    """
    from chx.pipeline.train_fusion import train_fusion as stage

    _report_fit(stage(io.store, io.out, opts, train, resume=run.resume, overwrite=run.overwrite))


@cli.command("train-joint", cls=_RunCommand, context_settings=CONTEXT,
             short_help="Backbone + fusion fine-tuned together from images.")
@_config_option
@options(io=TrainJointInputs, opts=JointOptions, train=TrainConfig, run=RunControl, cache=ImagesCacheOption)
def train_joint(io: TrainJointInputs, opts: JointOptions, train: TrainConfig, run: RunControl,
                cache: ImagesCacheOption):
    """Fine-tune the stage-1 backbone and the fusion model together, end to end from images.

    Each view's backbone map feeds the fusion model as the store would hold it (same pooling,
    float16); the same trainer and loss as the other stages; --batch-size counts studies.
    The checkpoint works with `chx export --joint`, `chx predict --joint` and `chx evaluate`.

    \b
    Example:
      chx train-joint --manifest covid.parquet --images covid-cxr/images \\
          --backbone runs/covid-b/best.pt --fusion runs/covid-f/best.pt --epochs 2 -o runs/covid-j
    """
    from chx.pipeline.train_joint import train_joint as stage

    images = _images_of(io.manifest, io.images, required=cache.images_cache is None)
    _report_fit(stage(io.manifest, images, io.backbone, io.out, opts, train, fusion=io.fusion,
                      resume=run.resume, overwrite=run.overwrite, images_cache=cache.images_cache))


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
    from chx.atomic import json_text
    from chx.pipeline.tools import store_info as run

    info = run(path)
    if as_json:   # valid JSON: a NaN or inf (of a fingerprint, say) is null, never a bare NaN
        click.echo(json_text(info, indent=2, default=str))
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
            ("dtype", f"{info.get('dtype')} " + ("(an image cache: read as is)" if info.get("dtype") == "uint8"
                                                 else "(read as float16)")),
            ("bytes per image", f"{kb(info.get('bytes_per_image'))} stored"
                                + (f", {kb(info.get('bytes_per_image_decoded'))} as float16"
                                   if info.get("dtype") != "uint8" else "")),
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
    from chx.atomic import json_text
    from chx.pipeline.tools import verify_store

    report = verify_store(path)
    if as_json:
        click.echo(json_text(report.to_dict(), indent=2, default=str))
    else:
        click.echo(report.summary())
        for p in report.problems[:50]:
            click.echo(f"  shard {p.shard} (rows {p.rows[0]}-{p.rows[1] - 1}, from image {p.first_image}): "
                       f"{p.problem}")
        if len(report.problems) > 50:
            click.echo(f"  ... and {len(report.problems) - 50} more")
    if not report.ok:
        sys.exit(2)
