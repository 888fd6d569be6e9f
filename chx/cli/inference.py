"""Models for use: `chx export`, `chx import-reference`, `chx predict`, `chx explain`."""

from __future__ import annotations

from pathlib import Path

import click

from chx.cli._base import CONTEXT, _images_of, _option_specs, _refuse_existing, _values_then_extras, cli
from chx.cli.options import options
from chx.errors import ChxError
from chx.options import (EnsembleOptions, ExplainOptions, ExportOptions, ImagesCacheOption, ImportReferenceOptions,
                         PredictOptions)


@cli.command("export", context_settings=CONTEXT,
             short_help="Both models for predict: one file, a Hugging Face folder or ONNX graphs.")
@options(o=ExportOptions)
def export(o: ExportOptions):
    """Export both models' weights, the class names and the preprocessing for `chx predict` and
    other tools. Everything loads offline; nothing is uploaded (push an hf folder with your own tools).
    --ensemble writes an ensemble bundle (`chx ensemble`) as an ensemble folder of hf or onnx members.

    \b
    Examples:
      chx export --backbone runs/b/best.pt --fusion runs/f/best.pt -o model.chx
      chx export --joint runs/j/best.pt -o model.chx
      chx export --backbone runs/b/best.pt --fusion runs/f/best.pt --format hf -o model-hf
      chx export --backbone runs/b/best.pt --fusion runs/f/best.pt --format onnx -o model-onnx
      chx export --ensemble ens --format hf -o ens-hf
      chx export --ensemble ens --format onnx -o ens-onnx
      chx predict --bundle ens-onnx --runtime onnxruntime --studies new-studies/ -o predictions.csv
    """
    from chx.pipeline import export as stage

    fmt, backbone, fusion, joint = o.fmt, o.backbone, o.fusion, o.joint
    out = o.out or Path({"bundle": "model.chx", "hf": "model-hf", "onnx": "model-onnx"}[fmt])
    specs = {name: _option_specs(command) for name, command in cli.commands.items()} if fmt == "hf" else None
    if o.ensemble is not None:      # every member in that format, into an ensemble folder
        stage.require_ensemble_alone(fmt, backbone, fusion, joint)
        _refuse_existing(out, o.overwrite, "ensemble")
        r = stage.export_ensemble(o.ensemble, fmt, out, specs)
        _echo_onnx_check(r["max_abs_diff"])
        click.echo(f"wrote {out}: {len(r['doc']['members'])} {fmt} members, {len(r['doc']['class_names'])} classes")
        return
    _refuse_existing(out, o.overwrite, {"bundle": "bundle", "hf": "export-hf", "onnx": "export-onnx"}[fmt])
    if fmt == "bundle":
        b = stage.export_bundle(backbone, fusion, out, joint=joint)
    elif fmt == "hf":
        b = stage.export_hf(backbone, fusion, out, specs, joint=joint)
    else:
        r = stage.export_onnx(backbone, fusion, out, joint=joint)
        b = r["bundle"]
        _echo_onnx_check(r["max_abs_diff"])
    click.echo(f"wrote {out}: {len(b['class_names'])} classes, backbone "
               f"{b['backbone']['model_config']['backbone_name']} at {b['backbone']['preprocess']['size']} px")


def _echo_onnx_check(diff: float | None) -> None:
    if diff is not None:
        click.echo(f"checked: ONNX Runtime's probabilities are within {diff:.1e} of torch's")


@cli.command("ensemble", context_settings=CONTEXT, short_help="Several models averaged into one ensemble bundle.")
@click.argument("members", nargs=-1, type=click.Path(path_type=Path), metavar="MEMBER...")
@options(o=EnsembleOptions)
def ensemble(members, o: EnsembleOptions):
    """Combine models into one ensemble bundle (a folder) that predict and evaluate take wherever they
    take a bundle: its probabilities are the members' weighted mean (equal weights by default).

    A MEMBER is a bundle or hf folder of `chx export` (stage 1 + fusion), a train-joint checkpoint,
    or a stage-1 checkpoint (its image probabilities averaged per study). Backbones, input sizes
    and stores may differ; the class lists must be the same. Every member is copied into the folder.

    \b
    Examples:
      chx ensemble a.chx b.chx c-hf -o ens
      chx ensemble a.chx runs/j/best.pt --weights 2,1 -o ens
      chx ensemble --from-run runs/j --last 3 -o ens-j
      chx ensemble --from-run runs/f --last 3 --backbone runs/b/best.pt -o ens-f
      chx predict --bundle ens --studies new-studies/ -o predictions.csv
    """
    from chx.pipeline.ensemble import make_ensemble

    _refuse_existing(o.out, o.overwrite, "ensemble")
    doc = make_ensemble(list(members), o.out, o.weights, from_run=o.from_run, last=o.last, backbone=o.backbone)
    weights = ", ".join(f"{m['weight']:.3g}" for m in doc["members"])
    click.echo(f"wrote {o.out}: {len(doc['members'])} members (weights {weights}), {len(doc['class_names'])} classes")


@cli.command("import-reference", context_settings=CONTEXT,
             short_help="A CheXFusion reference checkpoint -> a chx checkpoint.")
@click.argument("ckpt", type=click.Path(path_type=Path))
@options(o=ImportReferenceOptions)
def import_reference(ckpt, o: ImportReferenceOptions):
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
    from chx.pipeline.tools import import_reference as run

    _refuse_existing(o.out, o.overwrite, "checkpoint")
    r = run(ckpt, o.kind, o.classes, o.backbone_name, o.out)
    for what, why in r["dropped"].items():
        click.echo(f"dropped {what}: {why}")
    click.echo(f"wrote {o.out}: {o.kind} checkpoint, {r['classes']} classes")


@cli.command("predict", context_settings=CONTEXT, short_help="Study probabilities for new images.")
@options(o=PredictOptions, cache=ImagesCacheOption)
@click.argument("more_files", nargs=-1, type=click.Path(path_type=Path), metavar="")
def predict(o: PredictOptions, cache: ImagesCacheOption, more_files):
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
      chx predict --bundle model.chx --manifest m.parquet --images-cache m-1024.zarr --split test -o test.csv
      chx predict --bundle model-onnx --runtime onnxruntime --studies new-studies/ -o predictions.csv
    """
    from chx.pipeline.predict import check_manifest_file, collect_inputs, load_predictor
    from chx.pipeline.predict import predict as run

    from chx.pipeline.predict import output_format

    files = _values_then_extras("--files", o.files, more_files)
    out, explain_out = o.out, o.explain_out
    fmt = output_format(out, o.fmt)
    _refuse_existing(out, o.overwrite, "predictions")
    if explain_out is not None:
        if o.runtime != "torch":
            raise ChxError("--explain needs the models' attention: use it with --runtime torch")
        _refuse_existing(explain_out, o.overwrite, "explain", option="--explain")
    if cache.images_cache is not None and o.runtime != "torch":
        raise ChxError("--images-cache needs --runtime torch (ONNX Runtime reads the image files): drop one of them")
    check_manifest_file(o.manifest)
    # with --images-cache the files are read only for --explain's figures (and members of other sizes)
    images = _images_of(o.manifest, o.images, required=cache.images_cache is None or explain_out is not None)
    inputs = collect_inputs(o.studies_dir, files or None, o.manifest, images, study_id=o.study_id, views=o.views,
                            split=o.split, images_cache=cache.images_cache)
    predictor = load_predictor(o.runtime, o.bundle, o.backbone, o.fusion, joint=o.joint, device=o.device,
                               images_cache=cache.images_cache, images=images)
    if explain_out is not None and hasattr(predictor, "members"):
        raise ChxError(f"--explain: {o.bundle} is an ensemble bundle, whose members attend differently; explain "
                       f"them one by one: chx explain --bundle {o.bundle}/members/NAME")
    _warn_views(inputs, predictor)
    table = run(predictor, inputs, out, fmt, batch_size=o.batch_size, workers=o.workers)
    click.echo(f"wrote {out}: {table.height:,} rows ({inputs['study_id'].n_unique():,} studies, "
               f"{inputs.height:,} images)")
    if explain_out is not None:
        from chx.pipeline.explain import explain as run_explain
        from chx.pipeline.explain import fusion_explainer

        _report_explain(run_explain(fusion_explainer(predictor), inputs, explain_out, ExplainOptions.top_k,
                                    option="--explain"), explain_out)


def _warn_views(inputs, predictor) -> None:
    """One line on stderr (once per run) when a model that uses views meets images of unknown view."""
    from chx.pipeline.predict import fusion_config_of, unknown_views_warning

    message = unknown_views_warning(inputs, fusion_config_of(predictor))
    if message:
        click.echo(message, err=True)


def _report_explain(doc: dict, out: Path) -> None:
    n = len(doc["studies"])
    click.echo(f"wrote {out}/: {n:,} figure{'' if n == 1 else 's'}, explain.json, index.html (open it in a "
               f"browser)")


@cli.command("explain", context_settings=CONTEXT, short_help="Which view and region drove each finding.")
@options(o=ExplainOptions, cache=ImagesCacheOption)
@click.argument("more_files", nargs=-1, type=click.Path(path_type=Path), metavar="")
def explain(o: ExplainOptions, cache: ImagesCacheOption, more_files):
    """Show which view and which region drove each finding: per study one PNG (rows: findings,
    columns: views, each image with the finding's map on its own pixels, captioned with the
    probability and the view's share of the attention), explain.json (probabilities, shares, peaks
    in image pixels) and index.html, a gallery that opens offline in a browser. With --images-cache
    the models read their input from the cache; the figures still draw on the image files.

    \b
    Examples:
      chx explain --bundle model.chx --files a.png b.png --views PA,LATERAL --study-id s1 -o s1-explained
      chx explain --bundle model.chx --manifest m.parquet --images imgs/ --split test --limit 20 -o ex
      chx explain --checkpoint runs/b/best.pt --files x.png -o x-explained
    """
    from chx.pipeline.explain import explain as run
    from chx.pipeline.explain import load_explainer, select_studies
    from chx.pipeline.predict import check_manifest_file, collect_inputs

    files = _values_then_extras("--files", o.files, more_files)
    _refuse_existing(o.out, o.overwrite, "explain")
    check_manifest_file(o.manifest)
    images = _images_of(o.manifest, o.images)
    inputs = collect_inputs(o.studies_dir, files or None, o.manifest, images, study_id=o.study_id, views=o.views,
                            split=o.split, images_cache=cache.images_cache)
    inputs = select_studies(inputs, limit=o.limit)
    explainer = load_explainer(o.bundle, o.backbone, o.fusion, o.checkpoint, o.method, o.device,
                               images_cache=cache.images_cache)
    if o.checkpoint is None:      # the fusion models use views; a stage-1 model alone does not
        _warn_views(inputs, explainer.predictor)
    chosen = [c.strip() for c in o.classes.split(",") if c.strip()] if o.classes else None
    _report_explain(run(explainer, inputs, o.out, o.top_k, chosen, images=images if o.manifest else None), o.out)
