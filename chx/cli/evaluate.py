"""`chx evaluate` and `chx compare`."""

from __future__ import annotations

from pathlib import Path

import click

from chx.cli._base import CONTEXT, _config_option, _images_of, _refuse_existing, _values_then_extras, cli
from chx.cli.options import options
from chx.errors import ChxError
from chx.options import CompareOptions, EvaluateOptions, ImagesCacheOption


@cli.command("evaluate", context_settings=CONTEXT, short_help="Long-tail metrics, report and plots.")
@_config_option
@options(o=EvaluateOptions, cache=ImagesCacheOption)
@click.argument("more_runs", nargs=-1, type=click.Path(path_type=Path), metavar="")
def evaluate(o: EvaluateOptions, cache: ImagesCacheOption, more_runs):
    """Per-class and macro AP (the ranking metric), AUROC, F1 at tuned thresholds, head/medium/tail
    mAP and calibration (ECE) of a checkpoint on one split; writes a report folder with plots.

    \b
    Examples:
      chx evaluate --checkpoint runs/f/best.pt --store covid.zarr --split val -o eval-f
      chx evaluate --checkpoint runs/b/best.pt --manifest covid.parquet --images covid-cxr/images --split val
      chx evaluate --compare eval-f eval-b
    """
    compare_runs = _values_then_extras("--compare", o.compare_runs, more_runs)
    if compare_runs:
        from chx.pipeline.report import compare_runs as run_compare

        given = [name for name, v in (("--checkpoint", o.checkpoint), ("--store", o.store),
                                      ("--manifest", o.manifest), ("-o", o.out), ("--overwrite", o.overwrite)) if v]
        if given:
            raise ChxError(f"--compare only prints a table of existing report folders; {', '.join(given)} "
                           f"would be ignored: evaluate first (without --compare), then compare the reports")

        click.echo(run_compare(list(compare_runs)))
        return
    if o.checkpoint is None:
        raise ChxError("give --checkpoint (or --compare REPORT_DIR ... to compare reports)")
    from chx.pipeline.evaluate import evaluate as run
    from chx.pipeline.report import summary_table

    out = o.out or Path(f"eval-{o.split}")
    images = _images_of(o.manifest, o.images, required=False)
    if o.checkpoint.is_dir():     # an ensemble bundle (`chx ensemble`): every member and the ensemble
        from chx.pipeline.ensemble import evaluate_ensemble

        result = evaluate_ensemble(o.checkpoint, out, manifest=o.manifest, images=images, split=o.split,
                                   thresholds_from=None if o.thresholds_from == "none" else o.thresholds_from,
                                   groups=o.groups, bootstrap=o.bootstrap, absent_classes=o.absent_classes,
                                   batch_size=o.batch_size, workers=o.workers, overwrite=o.overwrite, views=o.views,
                                   images_cache=cache.images_cache)
        click.echo(summary_table(result))
        click.echo(f"\nreport: {out}/ (metrics.json with the members' rows, summary.md, predictions.csv, plots)")
        return
    result = run(o.checkpoint, out, store=o.store, manifest=o.manifest, images=images, split=o.split,
                 thresholds_from=None if o.thresholds_from == "none" else o.thresholds_from, groups=o.groups,
                 views=o.views, batch_size=o.batch_size, workers=o.workers, overwrite=o.overwrite,
                 absent_classes=o.absent_classes, bootstrap=o.bootstrap, images_cache=cache.images_cache)
    click.echo(summary_table(result))
    click.echo(f"\nreport: {out}/ (metrics.json, per_class.csv, predictions.csv, summary.md, plots)")


@cli.command("compare", context_settings=CONTEXT,
             short_help="Fusion vs per-study aggregations of stage 1; an ensemble vs its members.")
@options(o=CompareOptions, cache=ImagesCacheOption)
def compare(o: CompareOptions, cache: ImagesCacheOption):
    """Score fusion against the stage-1 model's predictions aggregated per study (mean, max, the
    reference's view-weighted mean, frontal-only, lateral-only), every method on the same studies
    (frontal-only and lateral-only cover fewer studies: fusion is scored on those too). Or, with
    --ensemble, score an ensemble bundle against each of its members on the same studies.

    Stage 1 and fusion both use flip TTA as `chx evaluate` does; mAP is per study. Every row has a
    bootstrap 95 % interval; the difference column is paired (both scored on the same resampled studies).

    \b
    Examples:
      chx compare --backbone runs/b/best.pt --fusion runs/f/best.pt --manifest covid.parquet \\
          --images covid-cxr/images --store runs/covid.zarr --split val -o compare-val.md
      chx compare --ensemble ens --manifest covid.parquet --images covid-cxr/images --split val
    """
    from chx.atomic import json_text
    from chx.pipeline.compare import compare_ensemble, compare_methods, format_table

    pair = {"--backbone": o.backbone, "--fusion": o.fusion, "--store": o.store}
    if o.ensemble is not None and any(v is not None for v in pair.values()):
        given = ", ".join(k for k, v in pair.items() if v is not None)
        raise ChxError(f"--ensemble compares an ensemble with its members: drop {given} (or drop --ensemble)")
    if o.ensemble is not None and o.groups != CompareOptions.groups:
        raise ChxError(f"--groups {o.groups}: an ensemble records no training class counts, so compare --ensemble "
                       f"has no head/medium/tail rows: drop --groups")
    if o.ensemble is None and any(v is None for v in pair.values()):
        missing = ", ".join(k for k, v in pair.items() if v is None)
        raise ChxError(f"give --backbone, --fusion and --store (fusion against stage 1; missing: {missing}), or "
                       f"--ensemble ENS (an ensemble against its members)")
    out = o.out
    if out is not None:
        _refuse_existing(out, o.overwrite, "comparison")
        _refuse_existing(out.with_suffix(".json"), o.overwrite, "comparison")
    images = _images_of(o.manifest, o.images, required=cache.images_cache is None)
    if o.ensemble is not None:
        results = compare_ensemble(o.ensemble, o.manifest, images, o.split, workers=o.workers,
                                   batch_size=o.batch_size, bootstrap=o.bootstrap, images_cache=cache.images_cache)
        table = format_table(results, title=f"{o.split} split (mAP per study)", versus="ensemble")
    else:
        results = compare_methods(o.backbone, o.fusion, o.manifest, images, o.store, o.split, workers=o.workers,
                                  batch_size=o.batch_size, groups=o.groups, bootstrap=o.bootstrap,
                                  images_cache=cache.images_cache)
        table = format_table(results, title=f"{o.split} split (mAP per study)")
    click.echo(table)
    if out is not None:
        from chx.atomic import atomic_path

        with atomic_path(out) as tmp:
            tmp.write_text(table + "\n")
        with atomic_path(out.with_suffix(".json")) as tmp:
            tmp.write_text(json_text(results, indent=1))
        click.echo(f"wrote {out} and {out.with_suffix('.json')}")
