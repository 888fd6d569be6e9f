"""`chx make-demo-data` and `chx demo`."""

from __future__ import annotations

from pathlib import Path

import click

from chx.cli._base import CONTEXT, _images_of, _refuse_existing, cli
from chx.cli.options import options
from chx.errors import ChxError
from chx.options import DemoConfig, DemoInputs, MakeDemoDataOptions


@cli.command("make-demo-data", context_settings=CONTEXT, short_help="Write the synthetic multi-view dataset.")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@options(o=MakeDemoDataOptions)
def make_demo_data(out, o: MakeDemoDataOptions):
    """Write a synthetic multi-view dataset: OUT/images/*.png, OUT/manifest.parquet and
    OUT/signs.parquet (the box of each drawn sign).

    Frontal + lateral views per study (some with one, a few with three); long-tailed findings whose
    signs show in both views, only the frontal or only the lateral view; split by patient. With
    --views 4: studies of 1-4 views, for choosing how many views to fuse (train-fusion --max-views).
    """
    from chx.pipeline.tools import make_demo_data as run

    path = run(out, studies=o.studies, seed=o.seed, size=o.size, views=o.views)
    click.echo(f"wrote {path} and {out / 'images'}")


@cli.command("demo", context_settings=CONTEXT, short_help="Whole pipeline on the synthetic demo (or your data).")
@options(io=DemoInputs, cfg=DemoConfig)
def demo(io: DemoInputs, cfg: DemoConfig):
    """Run the whole pipeline: data -> train-backbone -> extract-features -> train-fusion ->
    comparison of fusion with the stage-1 model's per-study aggregations (mean, max,
    view-weighted, frontal-only, lateral-only) on the test split.

    Without --manifest it generates the synthetic multi-view data, whose findings are visible in
    both views, only the frontal or only the lateral view, and also prints mAP by visibility.
    Offline, CPU-friendly (about 9 minutes on 2 cores with the defaults).
    """
    from chx.pipeline.demo import run_demo, visibility_table

    out, manifest = io.out, io.manifest
    if manifest is None and io.images is not None:
        raise ChxError("--images goes with --manifest (the manifest's paths are relative to --images)")
    images = _images_of(manifest, io.images)
    from chx.atomic import write_marker

    _refuse_existing(out, True, "demo")   # the help says "(replaced)": a demo folder only, never another
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "demo")
    result = run_demo(out, cfg, manifest=manifest, images=images, echo=click.echo)
    if manifest is None:
        from chx.pipeline.tools import demo_visibility

        click.echo("\nmAP by where a finding is visible:")
        click.echo(visibility_table(result["results"], demo_visibility()))
