"""The evaluation report: metrics.json, per_class.csv, summary.md and plots; side-by-side runs.

``result`` is :func:`chx.metrics.evaluate_scores`'s record. A report folder holds

    metrics.json      the record, JSON-safe (NaN -> null)
    per_class.csv     class, group, train_count, support, n, ap, auc, f1, threshold
    summary.md        macro table, per-class table (by training frequency), skipped classes, plots
    ap_per_class.png, pr_curves.png, reliability.png   (when scores and labels are given)

Every file is written to a temp name and renamed, so a folder never holds a half-written file.
:func:`compare_runs` reads several such folders back into one Markdown table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import numpy as np

from chx import plots   # imports matplotlib only when a plot is drawn
from chx.atomic import atomic_dir, atomic_path, check_output, json_safe  # noqa: F401 (json_safe: re-exported)
from chx.errors import ChxError
from chx.metrics import classes_by_frequency

MACRO_ROWS = (("mAP", "mAP"), ("mAUC", "mAUC"), ("mF1", "mF1"), ("mAP head", "mAP_head"),
              ("mAP medium", "mAP_medium"), ("mAP tail", "mAP_tail"), ("ECE", "ece"), ("n", "n"))
CSV_COLUMNS = ("class", "group", "train_count", "support", "n", "ap", "auc", "f1", "threshold")


def md_cell(text) -> str:
    """``text`` safe in a Markdown table cell and in HTML: ``|`` escaped, ``<``, ``>``, ``&`` as
    entities, line breaks as spaces (class names and paths come from users' files)."""
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("|", "\\|").replace("\r", " ").replace("\n", " "))


def _write_text(path: Path, text: str) -> Path:
    """Write ``text`` atomically over ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt(x, digits: int = 3) -> str:
    """A table cell: "n/a" for None/NaN, integers as they are, other numbers with ``digits`` decimals."""
    if _missing(x):
        return "n/a"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    return f"{x:.{digits}f}"


def _fmt_metric(key: str, x, result: dict | None = None) -> str:
    """A macro cell; ``n`` says what it counts (studies for fusion, images for a backbone)."""
    if key == "n" and result is not None and result.get("unit") and not _missing(x):
        return f"{fmt(x)} {result['unit']}"
    return fmt(x, 4 if key == "ece" else 3)


def fmt_ci(ci, digits: int = 3) -> str:
    """An interval cell: "[low, high]", or "n/a" (no interval: bootstrap off, or nothing scored)."""
    if (not isinstance(ci, (list, tuple)) or len(ci) != 2 or any(_missing(x) for x in ci)
            or not all(isinstance(x, (int, float, np.number)) and not isinstance(x, bool) for x in ci)):
        return "n/a"
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def uncertainty_note(result: dict) -> str:
    """One line: how the intervals were computed and the row's marks (see chx.metrics.uncertainty)."""
    b = result.get("bootstrap") or {}
    unit = result.get("unit") or "rows"
    how = (f"95 % intervals: bootstrap over the {fmt(result.get('n'))} {unit} ({b['resamples']} resamples, "
           f"seed {b.get('seed', 0)}, percentile)" if b.get("resamples") else "no intervals (--bootstrap 0)")
    base = (f"baseline = the class-prior mAP (an uninformative ranking: mean prevalence of the classes "
            f"scored) {fmt(result.get('mAP_baseline'))}")
    marks = result.get("flags") or []
    return f"{how}; {base}; marks: {', '.join(marks) if marks else 'none'}."


def summary_table(result: dict) -> str:
    """Markdown: the macro table (mAP, mAUC, mF1, mAP head/medium/tail, ECE, n; with a 95 % CI
    column, the class-prior baseline and the marks when the record has them), then one row per
    class ordered by training frequency (most frequent first)."""
    if "mAP_ci" in result:
        lines = ["| metric | value | 95 % CI |", "|---|---:|---:|"]
        lines += [f"| {label} | {_fmt_metric(key, result.get(key), result)} | "
                  f"{fmt_ci(result.get(key + '_ci')) if key.startswith('mAP') else ''} |"
                  for label, key in MACRO_ROWS]
        lines += [f"| mAP baseline (class prior) | {fmt(result.get('mAP_baseline'))} | |", "",
                  uncertainty_note(result)]
    else:
        lines = ["| metric | value |", "|---|---:|"]
        lines += [f"| {label} | {_fmt_metric(key, result.get(key), result)} |" for label, key in MACRO_ROWS]
    if result.get("members"):      # an ensemble: every member and the ensemble on the same rows
        lines += ["", "| model | weight | mAP | 95 % CI | ensemble − model [95 % CI] | mAUC | mF1 | n |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for m in result["members"]:
            d = m.get("ensemble_minus")
            diff = f"{d['mAP_diff']:+.3f} {fmt_ci(d.get('mAP_diff_ci'))}" if d else ""
            lines.append(f"| {md_cell(m['model'])} | {fmt(m.get('weight'))} | {fmt(m.get('mAP'))} | "
                         f"{fmt_ci(m.get('mAP_ci'))} | {diff} | {fmt(m.get('mAUC'))} | {fmt(m.get('mF1'))} | "
                         f"{fmt(m.get('n'))} |")
    lines += ["", "| class | group | train | support | n | AP | AUROC | F1 | threshold |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in classes_by_frequency(result):
        r = result["per_class"][c]
        lines.append(f"| {md_cell(c)} | {r.get('group') or 'n/a'} | {fmt(r.get('train_count'))} | "
                     f"{fmt(r.get('support'))} | {fmt(r.get('n'))} | {fmt(r.get('ap'))} | "
                     f"{fmt(r.get('auc'))} | {fmt(r.get('f1'))} | {fmt(r.get('threshold'))} |")
    return "\n".join(lines) + "\n"


def _per_class_csv(result: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for c, r in result["per_class"].items():
        row = [c] + [r.get(col) for col in CSV_COLUMNS[1:]]
        w.writerow(["" if _missing(v) else v for v in row])
    return buf.getvalue()


REPORT_FILES = ("metrics.json", "per_class.csv", "summary.md", "predictions.csv", "ap_per_class.png",
                "pr_curves.png", "reliability.png")


def is_report_folder(path: Path) -> bool:
    """A report folder chx evaluate wrote before it marked its outputs (it holds metrics.json and
    nothing but report files); newer ones carry the marker of :func:`chx.atomic.check_output`."""
    names = {p.name for p in path.iterdir()}
    return "metrics.json" in names and names <= set(REPORT_FILES)


def check_report_folder(out: Path, overwrite: bool) -> None:
    """The overwrite rule for a report folder -o (see :func:`chx.atomic.check_output`)."""
    check_output(out, "report", overwrite, legacy=is_report_folder)


def write_report(out_dir: str | os.PathLike, result: dict, *, scores: np.ndarray | None = None,
                 labels: np.ndarray | None = None, class_names: list[str] | None = None,
                 title: str = "", ids: list[str] | None = None, id_name: str = "id",
                 overwrite: bool = True) -> dict[str, Path]:
    """Write the report folder ``out_dir`` as a whole; return {"metrics", "per_class", "summary"[,
    "predictions", "ap_per_class", "pr_curves", "reliability"]: path}.

    The PR curves and reliability diagram need ``scores`` and ``labels`` ([N, K], NaN = not
    annotated, columns in ``class_names`` order; default: the result's class order), so all three
    plots are written only when both are given; with ``ids`` (one per row of ``scores``) also
    predictions.csv (``id_name``, then one probability column per class).

    The files are written into a temp folder beside ``out_dir``, which then replaces it: an
    interrupted evaluation leaves the previous report whole, never new metrics beside old plots.
    An existing ``out_dir`` is replaced only when it is empty or a report folder chx wrote (and
    ``overwrite``); anything else is refused (:func:`check_report_folder`)."""
    out = Path(out_dir)
    check_report_folder(out, overwrite)
    with atomic_dir(out, "report", legacy=is_report_folder) as tmp:
        paths = _write_report_files(tmp, result, scores, labels, class_names, title, ids, id_name)
    return {k: out / p.name for k, p in paths.items()}


def _write_report_files(out: Path, result, scores, labels, class_names, title, ids, id_name) -> dict[str, Path]:
    class_names = list(class_names if class_names is not None else result.get("class_names") or result["per_class"])
    paths = {
        "metrics": _write_text(out / "metrics.json", json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n"),
        "per_class": _write_text(out / "per_class.csv", _per_class_csv(result)),
    }
    if scores is not None and labels is not None:
        paths["ap_per_class"] = plots.plot_ap_per_class(result, out / "ap_per_class.png")
        paths["pr_curves"] = plots.plot_pr_curves(scores, labels, class_names, result, out / "pr_curves.png")
        paths["reliability"] = plots.plot_reliability(scores, labels, out / "reliability.png")

    md = [f"# {md_cell(title)}", ""] if title else []
    if isinstance(result.get("meta"), dict) and result["meta"]:   # what was evaluated, if the caller says
        md += [f"- {k}: {md_cell(v)}" for k, v in result["meta"].items()] + [""]
    md += [summary_table(result)]
    skipped = result.get("skipped") or []
    md += ["## Skipped classes", "",
           ("No AP/AUROC (no positive or no negative among annotated rows): " + ", ".join(map(md_cell, skipped)))
           if skipped else "None: every class has a positive and a negative among its annotated rows.", ""]
    plot_titles = {"ap_per_class": "AP per class", "pr_curves": "Precision-recall, best and worst classes",
                   "reliability": "Reliability"}
    if "reliability" in paths:
        md += ["## Plots", ""] + [f"![{t}]({paths[k].name})" for k, t in plot_titles.items()] + [""]
    if ids is not None and scores is not None:
        paths["predictions"] = _write_text(out / "predictions.csv", _predictions_csv(ids, id_name, scores, class_names))
    paths["summary"] = _write_text(out / "summary.md", "\n".join(md))
    return paths


def _predictions_csv(ids, id_name: str, scores: np.ndarray, class_names: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([id_name, *class_names])
    for i, row in zip(ids, np.asarray(scores, dtype=np.float64)):
        w.writerow([i, *(f"{x:.6g}" for x in row)])
    return buf.getvalue()


def _read_run(run_dir: Path) -> dict:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise ChxError(f"{run_dir} has no metrics.json; run `chx evaluate ... --out {run_dir}` first")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ChxError(f"{path} is not a readable metrics file ({e}); rerun `chx evaluate ... --out {run_dir}`") \
            from None
    if not isinstance(result, dict) or not isinstance(result.get("per_class"), dict):
        raise ChxError(f"{path} has no per_class metrics; rerun `chx evaluate ... --out {run_dir}`")
    number = lambda x: x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))  # noqa: E731
    for label, key in (*MACRO_ROWS, ("mAP baseline", "mAP_baseline")):
        if not number(result.get(key)):
            raise ChxError(f"{path}: {key!r} is {result.get(key)!r}, not a number; the file was edited or "
                           f"damaged: rerun `chx evaluate ... --out {run_dir}`")
    for c, v in result["per_class"].items():
        if not isinstance(v, dict) or not all(number(v.get(k)) for k in ("ap", "auc", "f1", "train_count")):
            raise ChxError(f"{path}: the metrics of class {c!r} are not numbers; the file was edited or "
                           f"damaged: rerun `chx evaluate ... --out {run_dir}`")
    return result


def _run_names(run_dirs: list[Path]) -> list[str]:
    """Folder names; a name shared by several runs is prefixed with its parent folder."""
    names = [Path(d).resolve().name for d in run_dirs]
    return [f"{Path(d).resolve().parent.name}/{n}" if names.count(n) > 1 else n for d, n in zip(run_dirs, names)]


def compare_runs(run_dirs: list[Path]) -> str:
    """Markdown: the macro metrics side by side (one column per run, named by its folder), then AP
    per class (rows by the first run's training frequency). Every run must share one class list."""
    if not run_dirs:
        raise ChxError("compare needs at least one run folder written by `chx evaluate ... --out DIR`")
    results = [_read_run(Path(d)) for d in run_dirs]
    names = _run_names([Path(d) for d in run_dirs])
    classes = set(results[0]["per_class"])
    for d, r in zip(run_dirs[1:], results[1:]):
        if set(r["per_class"]) != classes:
            only_first = sorted(classes - set(r["per_class"]))
            only_this = sorted(set(r["per_class"]) - classes)
            raise ChxError(f"{d} was evaluated on other classes than {run_dirs[0]} (only in {run_dirs[0]}: "
                           f"{', '.join(only_first) or 'none'}; only in {d}: {', '.join(only_this) or 'none'}); "
                           f"compare runs evaluated on the same class list")
    header = "| metric | " + " | ".join(map(md_cell, names)) + " |"
    rule = "|---|" + "---:|" * len(names)
    lines = [header, rule]
    lines += [f"| {label} | " + " | ".join(_fmt_metric(key, r.get(key), r) for r in results) + " |"
              for label, key in MACRO_ROWS]
    lines += uncertainty_rows(results)
    units = {r.get("unit") for r in results}
    if len(units) > 1:
        lines += ["", "Note: these reports score different units (" + ", ".join(
            f"{n}: {r.get('unit') or 'unknown'}" for n, r in zip(names, results))
            + "): a fusion model is scored per study, a backbone per image."]
    lines += ["", "| class | group | " + " | ".join(f"AP {md_cell(n)}" for n in names) + " |",
              "|---|---|" + "---:|" * len(names)]
    for c in classes_by_frequency(results[0]):
        group = results[0]["per_class"][c].get("group") or "n/a"
        lines.append(f"| {md_cell(c)} | {md_cell(group)} | " + " | ".join(fmt(r["per_class"][c].get("ap"))
                                                                          for r in results) + " |")
    return "\n".join(lines) + "\n"


def uncertainty_rows(results: list[dict]) -> list[str]:
    """Rows of :func:`compare_runs`'s macro table: each run's mAP interval, class-prior baseline and
    marks (reports written before the intervals existed show n/a)."""
    return [
        "| mAP 95 % CI | " + " | ".join(fmt_ci(r.get("mAP_ci")) for r in results) + " |",
        "| mAP baseline (class prior) | " + " | ".join(fmt(r.get("mAP_baseline")) for r in results) + " |",
        "| marks | " + " | ".join((", ".join(map(md_cell, r.get("flags") or [])) or "none")
                                 if "flags" in r else "n/a" for r in results) + " |"]

