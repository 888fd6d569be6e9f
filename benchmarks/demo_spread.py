"""The spread of the demo test's quality measures over seeds and thread counts (issue 25, item 2).

    flock /tmp/chx-cpu.lock .venv/bin/python benchmarks/demo_spread.py [--seeds 0 1 2] [--threads 1 2]
        [--out benchmarks/results] [--work DIR]

Runs exactly the configuration of `tests/test_demo.py::test_fusion_beats_every_per_study_aggregation_
on_findings_visible_in_one_view` (make_demo_data studies=1400, size=64, val 0.1, test 0.6;
DemoConfig convnext_atto, 4 backbone / 20 fusion epochs; measure_explanations on the first 300 test
studies) for each seed s (data seed = training seed = s; s = 0 is the test's own configuration) and
each OMP_NUM_THREADS value, each run in its own subprocess with the variable set and
torch.set_num_threads matching, one run at a time. Trained models follow another trajectory per
thread count (and per CPU), so the test's thresholds must hold over this spread, not one run.

Per run: the fusion-minus-stage-1 mAP gap on the one-view findings for each per-study aggregation
(mean, max, weighted, frontal, lateral); the attention shares (lateral / frontal) on lateral-only and
frontal-only findings; the pointing game's hit rate and chance; per finding the fusion AP on all
test studies, its class prior there (the AP of a constant score) and the attention shares (also
measured on every test study, under "all test": not what the test asserts, for choosing it). Then
min / mean / sd per quantity. Writes OUT/demo_spread.json (every run and the aggregates) and
OUT/demo_spread.md (the table). ~2-3 minutes per run on 2 free cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDIES, SIZE, BACKBONE_EPOCHS, FUSION_EPOCHS, EXPLAIN_STUDIES = 1400, 64, 4, 20, 300
METHODS = ("mean", "max", "weighted", "frontal", "lateral")
LEARNED_MARGIN = 0.08          # as in the test: fusion AP above the class prior by this = learned


def one_run(seed: int, threads: int, work: Path) -> dict:
    """The test's configuration with data seed = training seed = ``seed`` (in this process)."""
    import polars as pl
    import torch

    torch.set_num_threads(threads)
    from chx.data.demo import FINDINGS, make_demo_data, read_signs, visibility
    from chx.data.manifest import read_manifest
    from chx.engine.attribution import FusionExplainer, measure_explanations
    from chx.engine.predictor import Predictor
    from chx.pipeline.demo import DemoConfig, by_visibility, run_demo

    t0 = time.perf_counter()
    manifest = make_demo_data(work / "data", studies=STUDIES, seed=seed, size=SIZE,
                              val_fraction=0.1, test_fraction=0.6)
    cfg = DemoConfig(studies=STUDIES, size=SIZE, model="convnext_atto", backbone_epochs=BACKBONE_EPOCHS,
                     fusion_epochs=FUSION_EPOCHS, workers=0, seed=seed)
    result = run_demo(work / "run", cfg, manifest=manifest, images=work / "data" / "images",
                      echo=lambda *a: None)
    table = by_visibility(result["results"], visibility())
    fusion = result["results"]["fusion"]

    test = read_manifest(manifest).filter(pl.col("split") == "test")
    first = test["study_id"].unique(maintain_order=True).head(EXPLAIN_STUDIES)
    explainer = FusionExplainer(Predictor.load(backbone=work / "run" / "backbone" / "best.pt",
                                               fusion=work / "run" / "fusion" / "best.pt"))
    signs = read_signs(work / "data" / "signs.parquet")
    m = measure_explanations(explainer, test.filter(pl.col("study_id").is_in(first.implode())),
                             work / "data" / "images", signs, visibility())
    # the same on every test study (not what the test measures: for the choice of what to assert)
    everything = measure_explanations(explainer, test, work / "data" / "images", signs, visibility())
    findings = {}
    for f in FINDINGS:
        pc = fusion["per_class"][f.name]
        share = m["attribution_per_finding"].get(f.name, {})
        share_all = everything["attribution_per_finding"].get(f.name, {})
        findings[f.name] = {"visible": f.visible_in, "fusion AP": pc["ap"],
                            "prior": pc["support"] / fusion["n_studies"],
                            "stage-1 mean AP": result["results"]["stage-1 mean"]["per_class"][f.name]["ap"],
                            "share studies": share.get("studies", 0),
                            "lateral share": share.get("lateral share", float("nan")),
                            "frontal share": share.get("frontal share", float("nan")),
                            "all test: share studies": share_all.get("studies", 0),
                            "all test: lateral share": share_all.get("lateral share", float("nan")),
                            "all test: frontal share": share_all.get("frontal share", float("nan"))}
    return {"seed": seed, "threads": threads, "torch threads": torch.get_num_threads(),
            "gap": {k: table[k]["one view"][1] - table[k]["one view"][0] for k in METHODS},
            "one view": {k: list(table[k]["one view"]) for k in METHODS},
            "attribution": m["attribution"], "pointing": m["pointing"],
            "all test": {k: everything[k] for k in ("attribution", "pointing", "pointing_in_view")},
            "findings": findings, "seconds": time.perf_counter() - t0,
            "fusion mAP": fusion["mAP"], "n test studies": fusion["n_studies"]}


def learned(run: dict) -> dict[str, str]:
    """The one-view findings this run's fusion model demonstrably learned (as the test selects them):
    fusion AP on the test studies above the finding's prior there by LEARNED_MARGIN."""
    return {n: f["visible"] for n, f in run["findings"].items()
            if f["visible"] != "both" and f["fusion AP"] > f["prior"] + LEARNED_MARGIN}


def quantities(run: dict) -> dict[str, float]:
    """The flat quantities of one run that the table aggregates."""
    a = run["attribution"]
    q = {f"gap {k}": v for k, v in run["gap"].items()}
    q["min gap"] = min(run["gap"].values())
    for only, own in (("lateral", "lateral"), ("frontal", "frontal")):
        other = "frontal" if own == "lateral" else "lateral"
        row = a[f"{only}-only findings"]
        q[f"{only}-only: {own} share"] = row[f"{own} share"]
        q[f"{only}-only: {own} - {other} share"] = row[f"{own} share"] - row[f"{other} share"]
    # pooled over the studies of the learned one-view findings (what the test asserts)
    chosen = [run["findings"][n] for n in learned(run)]
    n = sum(f["share studies"] for f in chosen)
    q["learned one-view findings"] = len(chosen)
    others = [f for f in run["findings"].values() if f["visible"] != "both" and f not in chosen]
    q["learned: lowest AP - prior"] = min((f["fusion AP"] - f["prior"] for f in chosen), default=float("nan"))
    q["not learned: highest AP - prior"] = max((f["fusion AP"] - f["prior"] for f in others), default=float("nan"))
    q["learned: share on the view showing it"] = (
        sum(f["share studies"] * f[f"{f['visible']} share"] for f in chosen) / n if n else float("nan"))
    q["pointing hit rate"] = run["pointing"]["hit rate"]
    q["pointing hit - chance"] = run["pointing"]["hit rate"] - run["pointing"]["chance"]
    for name, f in run["findings"].items():
        if f["visible"] == "both":
            continue
        own, other = ("lateral", "frontal") if f["visible"] == "lateral" else ("frontal", "lateral")
        q[f"{name} ({f['visible']}): AP"] = f["fusion AP"]
        q[f"{name} ({f['visible']}): AP - prior"] = f["fusion AP"] - f["prior"]
        q[f"{name} ({f['visible']}): {own} - {other} share"] = f[f"{own} share"] - f[f"{other} share"]
    return q


def aggregate(runs: list[dict]) -> dict[str, dict[str, float]]:
    rows = [quantities(r) for r in runs]
    out = {}
    for k in rows[0]:
        values = [r[k] for r in rows]
        out[k] = {"min": min(values), "mean": statistics.fmean(values),
                  "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "max": max(values)}
    return out


def markdown(runs: list[dict], agg: dict, date: str, machine: str) -> str:
    lines = [f"# Demo test spread ({len(runs)} runs: seeds "
             f"{sorted({r['seed'] for r in runs})} x OMP_NUM_THREADS {sorted({r['threads'] for r in runs})})",
             "", f"{date}, {machine}; "
             f"configuration of test_demo.py (studies {STUDIES}, {SIZE} px, convnext_atto, "
             f"{BACKBONE_EPOCHS} + {FUSION_EPOCHS} epochs, explanations on {EXPLAIN_STUDIES} test studies).",
             "", "| quantity | " + " | ".join(f"s{r['seed']} t{r['threads']}" for r in runs)
             + " | min | mean | sd |", "|---|" + "---:|" * (len(runs) + 3)]
    rows = [quantities(r) for r in runs]
    for k, a in agg.items():
        lines.append(f"| {k} | " + " | ".join(f"{r[k]:.3f}" for r in rows)
                     + f" | {a['min']:.3f} | {a['mean']:.3f} | {a['sd']:.3f} |")
    lines += ["", "Run time (s): " + ", ".join(f"s{r['seed']} t{r['threads']} {r['seconds']:.0f}" for r in runs)]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--report", type=Path, default=None,
                   help="rewrite the aggregates and the table from the runs of this demo_spread.json")
    p.add_argument("--one", nargs=3, metavar=("SEED", "THREADS", "JSON"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        seed, threads, out = int(args.one[0]), int(args.one[1]), Path(args.one[2])
        with tempfile.TemporaryDirectory(dir=args.work) as work:
            run = one_run(seed, threads, Path(work))
        out.write_text(json.dumps(run, indent=1))
        return

    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        saved = json.loads(args.report.read_text())
        write(args.out, saved["runs"], saved["date"], saved["machine"])
        return
    partial = args.out / "demo_spread.partial.json"
    runs = json.loads(partial.read_text()) if partial.exists() else []
    done = {(r["seed"], r["threads"]) for r in runs}
    for threads in args.threads:             # one thread first: it suffers least on a busy machine
        for seed in args.seeds:
            if (seed, threads) in done:
                continue
            with tempfile.TemporaryDirectory(dir=args.work) as tmp:
                target = Path(tmp) / "run.json"
                # a passive wait at OpenMP barriers changes the speed on a shared machine, not the numbers
                env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                       "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
                print(f"seed {seed}, OMP_NUM_THREADS={threads} ...", flush=True)
                subprocess.run([sys.executable, __file__, "--one", str(seed), str(threads), str(target)]
                               + (["--work", str(args.work)] if args.work else []),
                               env=env, check=True, cwd=ROOT)
                run = json.loads(target.read_text())
            runs.append(run)
            partial.write_text(json.dumps(runs, indent=1))
            print(f"  {run['seconds']:.0f} s; " + ", ".join(f"{k} {v:.3f}" for k, v in quantities(run).items()),
                  flush=True)
    write(args.out, runs, time.strftime("%Y-%m-%d"), f"{platform.machine()}, {os.cpu_count()} CPUs")
    partial.unlink()


def write(out: Path, runs: list[dict], date: str, machine: str) -> None:
    agg = aggregate(runs)
    (out / "demo_spread.json").write_text(json.dumps(
        {"date": date, "machine": machine, "runs": runs, "aggregate": agg}, indent=1))
    table = markdown(runs, agg, date, machine)
    (out / "demo_spread.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
