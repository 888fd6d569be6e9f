"""`chx prepare`: native label files -> one manifest; `chx cache-images`: its images decoded once."""

from __future__ import annotations

from pathlib import Path

import click

from chx.cli._base import CONTEXT, _images_of, _refuse_existing, cli
from chx.cli.options import options
from chx.errors import ChxError
from chx.options import CacheImagesOptions, PrepareOptions


def _with_adapters(f):
    """Put the adapter list (name and one line each) into the command's help, and add the options
    the adapters declare (each once, its help naming the adapters that take it)."""
    from chx.pipeline.prepare import adapter_listing, adapter_options
    f.__doc__ = f.__doc__.replace("{adapters}", adapter_listing())
    for opt, owners in reversed(adapter_options()):   # click lists the last-applied option first
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
    from chx.pipeline.prepare import classes_help
    return classes_help()


@cli.command(context_settings=CONTEXT, short_help="Native label files -> one manifest.")
@click.argument("dataset")
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--classes", default=None, metavar="LIST", help=_classes_help())   # from the adapters
@options(o=PrepareOptions)
@_with_adapters
def prepare(dataset, sources, classes, o: PrepareOptions, **adapter_options):
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
    from chx.pipeline.prepare import check_adapter
    from chx.pipeline.prepare import prepare as run_prepare

    ctx = click.get_current_context()
    typed = click.core.ParameterSource.COMMANDLINE
    adapter = check_adapter(dataset, [n for n in adapter_options if ctx.get_parameter_source(n) == typed])
    if o.only_existing and o.images is None:
        raise ChxError("--only-existing needs --images ROOT (the folder to look for the images in)")
    for src in sources:
        if not src.exists():
            raise ChxError(f"{src} does not exist; give the dataset's label file(s) or folder")
    out = o.out or Path(f"{dataset}.parquet")
    _refuse_existing(out, o.overwrite, "manifest", why="a new manifest (another --seed, another split) under models "
                                           "made from the old one invites patient leakage")
    s = run_prepare(dataset, list(sources), out, classes=classes, images=o.images,
                    only_existing=o.only_existing, val_fraction=o.val_fraction,
                    test_fraction=o.test_fraction, seed=o.seed,
                    options={a.name: adapter_options[a.name] for a in adapter.options})
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


@cli.command("cache-images", context_settings=CONTEXT, short_help="Decode a manifest's images once into an image cache.")
@options(o=CacheImagesOptions)
def cache_images(o: CacheImagesOptions):
    """Decode every image of a manifest once, resized as the model preprocesses (--size, --resize, or
    a --checkpoint's), into a sharded image cache; then give --images-cache to train-backbone,
    extract-features, train-joint, evaluate, compare, pseudo-label, predict or explain (with
    --manifest): they read the same tensors from it, exactly, without decoding the originals again.

    Rerunning the same command continues with the shards not yet done; --shard i/n (or torchrun)
    fills one cache from several processes; `chx store verify` checks it and --repair redoes
    damaged shards.

    \b
    Example:
      chx cache-images --manifest mimic.parquet --images mimic-cxr-jpg/ --size 1024 -o mimic-1024.zarr
      chx train-backbone --manifest mimic.parquet --images-cache mimic-1024.zarr --size 1024 -o runs/b
    """
    from chx.pipeline.cache_images import cache_images as run

    r = run(o, _images_of(o.manifest, o.images), echo=click.echo)
    state = "complete" if r.complete else f"{r.remaining:,} images still to do (other shards or a rerun)"
    speed = f" at {r.images_per_s:.1f} images/s" if r.written else ""
    click.echo(f"cached {r.written:,} images ({r.preprocess.size} px {r.preprocess.mode}){speed}; "
               f"image cache {r.cache} is {state}")
