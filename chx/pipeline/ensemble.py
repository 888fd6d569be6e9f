"""`chx ensemble`: several models into one ensemble bundle (a folder) that predict and evaluate take
wherever they take a bundle.

Members: bundle files or hf folders of `chx export`, train-joint checkpoints, stage-1 checkpoints
(see :mod:`chx.engine.ensemble`), or the last K validation checkpoints of one run
(``from_run``; the run kept them with ``--keep-checkpoints``; a fusion run's checkpoints are
bundled with ``backbone``, the stage-1 checkpoint its store was extracted with). Every member is
copied into ``members/`` (the folder is self-contained), loaded once to check it, and its class
list checked against the first member's. The folder is written whole or not at all.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from chx.atomic import atomic_dir, json_text, output_lock
from chx.data.manifest import portable_path
from chx.engine.ensemble import (ENSEMBLE_FILE, MEMBERS_DIR, ensemble_doc, load_member, member_kind, member_sha256,
                                 parse_weights, require_member_classes, sealed_bundle)
from chx.engine.run_folder import RunFolder
from chx.errors import ChxError
from chx.models import load_checkpoint, save_checkpoint

def run_checkpoints(run: Path, last: int) -> list[Path]:
    """The last ``last`` validation checkpoints (ckpt-stepN.pt) of the run folder ``run``, oldest first."""
    run = Path(run)
    if not run.is_dir():
        raise ChxError(f"--from-run {run} is not a run folder")
    found = RunFolder(run).checkpoints()
    if not found:
        raise ChxError(f"--from-run {run} kept no validation checkpoints (ckpt-stepN.pt): train it with "
                       f"--keep-checkpoints K (K >= {last})")
    if len(found) < last:
        raise ChxError(f"--last {last}: {run} kept only {len(found)} validation checkpoint(s); lower --last or "
                       f"train with a larger --keep-checkpoints")
    return found[-last:]


def _name(path: Path, i: int) -> str:
    """A member's file name in members/: its position, then its name (letters, digits, . _ -)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{Path(path).parent.name}-{Path(path).name}").strip("._-")
    return f"{i + 1:02d}-{stem[-80:] or 'member'}"


def make_ensemble(members: list[Path], out: Path, weights: str | None = None, *, from_run: Path | None = None,
                  last: int | None = None, backbone: Path | None = None) -> dict:
    """Write the ensemble bundle ``out`` of ``members`` (or of the last ``last`` validation checkpoints
    of ``from_run``); returns ensemble.json's content. The overwrite rule is the caller's."""
    members = [Path(m) for m in members]
    fusion_run = False
    if from_run is not None:
        if members:
            raise ChxError("--from-run builds the ensemble of one run's checkpoints: give no MEMBER paths with it")
        members = run_checkpoints(from_run, last or 1)
        fusion_run = load_checkpoint(members[0]).get("kind") == "fusion"
        if fusion_run and backbone is None:
            raise ChxError(f"{from_run} is a fusion run: give --backbone, the stage-1 checkpoint its store was "
                           f"extracted with (each checkpoint is bundled with it)")
    elif last is not None or backbone is not None:
        raise ChxError("--last and --backbone go with --from-run RUN")
    if not members:
        raise ChxError("give the ensemble's members (bundles, hf folders, train-joint or stage-1 checkpoints), "
                       "or --from-run RUN --last K")
    seen = {}
    for m in members:
        key = m.resolve()
        if key in seen:
            raise ChxError(f"{m} is given twice (also as {seen[key]}); give each member once (use --weights to "
                           f"weigh one more)")
        seen[key] = m
    w = parse_weights(weights, len(members))

    kinds, classes = [], None
    for m in members:
        if fusion_run:
            kind, names = "bundle", list(load_checkpoint(m, kind="fusion")["class_names"])
        else:
            kind, names = member_kind(m)
        if classes is None:
            classes = names
        require_member_classes(names, classes, str(m), str(members[0]))
        kinds.append(kind)

    with output_lock(out, "ensemble"), atomic_dir(out, "ensemble") as tmp:
        (tmp / MEMBERS_DIR).mkdir()
        records = []
        for i, (m, kind, weight) in enumerate(zip(members, kinds, w)):
            dest = tmp / MEMBERS_DIR / _name(m, i)
            if fusion_run:
                dest = dest.with_suffix(".chx")
                save_checkpoint(sealed_bundle(backbone, m), dest)
            elif m.is_dir():
                shutil.copytree(m, dest)
            else:
                shutil.copyfile(m, dest)
            load_member(dest, kind, device="cpu")     # it loads: integrity, shapes, classes of its parts
            records.append({"name": portable_path(m, Path(out).parent, keep=2), "path": dest.relative_to(tmp).as_posix(),
                            "kind": kind, "weight": weight, "sha256": member_sha256(dest)})
        doc = ensemble_doc(classes, records)
        (tmp / ENSEMBLE_FILE).write_text(json_text(doc, indent=1) + "\n")
    return doc


def evaluate_ensemble(ensemble: Path, out: Path, *, manifest: Path | None, images: Path | None, split: str,
                      thresholds_from: str | None, groups: str, bootstrap: int, absent_classes: str,
                      batch_size: int, workers: int, overwrite: bool = False, views: str = "all",
                      device: str = "auto", images_cache: str | None = None) -> dict:
    """`chx evaluate --checkpoint ENSEMBLE`: every member and the ensemble on the same studies of
    ``split`` of a manifest (study labels: the study's images' labels, the maximum where they
    differ); the report is the ensemble's, with one row per member and the ensemble in
    ``result["members"]`` (summary.md, metrics.json), each member's with its bootstrap interval and
    the paired interval of the ensemble's mAP minus its (``ensemble_minus``: the same resampled
    studies, as `chx compare --ensemble`). Thresholds as evaluate tunes them.
    ``images_cache``: the members it serves read their images from it (see
    :meth:`~chx.engine.ensemble.EnsemblePredictor.use_images_cache`)."""
    from chx.engine.ensemble import EnsemblePredictor
    from chx.metrics import BOOTSTRAP_SEED, evaluate_scores, paired_bootstrap, tune_thresholds
    from chx.pipeline.report import check_report_folder, write_report

    if views != "all":
        raise ChxError("--views is not supported for an ensemble; evaluate its members with --views")
    check_report_folder(Path(out), overwrite)
    ens, df, images = EnsemblePredictor.on_manifest(ensemble, manifest, images, images_cache, split, device=device)
    classes = list(ens.class_names)
    available = set(df["split"].drop_nulls().to_list())

    def score(name: str):
        return ens.score_split(df, name, images, batch_size=batch_size, workers=workers)

    with output_lock(out, "report"):
        per, combined, labels, ids = score(split)
        if not ids:
            raise ChxError(f"split {split!r} is empty")
        thresholds, tuned_on = [None] * (len(per) + 1), None
        if thresholds_from and thresholds_from != split and thresholds_from in available:
            vper, vcomb, vlabels, _ = score(thresholds_from)
            thresholds = [tune_thresholds(s, vlabels) for s in (*vper, vcomb)]
            tuned_on = thresholds_from
        kw = {"groups": groups, "absent": absent_classes}
        result = evaluate_scores(combined, labels, classes, thresholds=thresholds[-1], bootstrap=bootstrap, **kw)
        rows = []
        for name, weight, s, t in zip(ens.names, ens.weights, per, thresholds):
            # the same resamples as the ensemble's (the same seed): each interval, and the paired one
            r = evaluate_scores(s, labels, classes, thresholds=t, bootstrap=bootstrap, **kw)
            pair = paired_bootstrap(combined, s, labels, bootstrap, BOOTSTRAP_SEED, absent=absent_classes)
            rows.append({"model": name, "weight": float(weight), **{k: r.get(k) for k in MEMBER_METRICS},
                         "ensemble_minus": {"mAP_diff": pair["diff"], "mAP_diff_ci": pair["ci"]}})
        rows.append({"model": "ensemble", "weight": 1.0, **{k: result.get(k) for k in MEMBER_METRICS}})
        result["members"] = rows
        result["meta"] = {"checkpoint": str(ensemble), "kind": "ensemble", "split": split, "views": views,
                          "thresholds_from": tuned_on or "0.5 (no tuning split)", "data": str(manifest)}
        result["unit"] = "studies"
        write_report(out, result, scores=combined, labels=labels, class_names=classes,
                     title=f"ensemble {ensemble} on {split}", ids=ids, id_name="study_id", overwrite=overwrite)
    return result


MEMBER_METRICS = ("mAP", "mAP_ci", "mAUC", "mF1", "n")     # chx.pipeline.report.summary_table's member rows
