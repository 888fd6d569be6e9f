"""The seed spread of the README's result tables (issue 32, item 3): one run is one draw.

    nice .venv/bin/python benchmarks/results_spread.py [--seeds 0 1 2] [--only demo covid]
        [--threads 2] [--out benchmarks/results] [--work DIR]

- **demo**: `chx demo` with its defaults (1,000 synthetic studies at 128 px, convnext_atto from
  scratch, 4 + 30 epochs) for each seed (``--seed`` seeds the data, the splits and training, as the
  command does): every compare row's test-split mAP and mAUC, and the one-view mAP of each stage-1
  aggregation against fusion on the same studies.
- **covid**: the README's covid-cxr commands (prepare with split seed 0, the same for every run so
  only training varies; train-backbone convnext_atto 256 px 8 epochs; extract-features --flip;
  train-fusion 20 epochs; compare on the val split), with ``--seed`` of both trainings = the seed.

Each run is its own process with OMP_NUM_THREADS = ``--threads``, one at a time. Writes
OUT/results_spread.json (every run) and OUT/results_spread.md (per row: each seed, mean, sd, min,
max). Quality figures only: the machine may be loaded (run times are reported, not compared).
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
COVID = ROOT.parent / "shared" / "data" / "covid-cxr"
CHX = [sys.executable, "-m", "chx"]


def demo_run(seed: int, work: Path) -> dict:
    """`chx demo --seed SEED` with its defaults, in this process."""
    from chx.data.demo import visibility
    from chx.options import DemoConfig
    from chx.pipeline.demo import by_visibility, run_demo

    t0 = time.perf_counter()
    result = run_demo(work / "demo", DemoConfig(seed=seed), echo=lambda *a: None)
    rows = {name: {"mAP": r["mAP"], "mAUC": r["mAUC"], "studies": r["n_studies"]}
            for name, r in result["results"].items()}
    vis = by_visibility(result["results"], visibility())
    return {"rows": rows, "visibility": {m: {g: list(v) for g, v in row.items()} for m, row in vis.items()},
            "seconds": time.perf_counter() - t0}


def covid_run(seed: int, work: Path) -> dict:
    """The README's covid-cxr commands, training seed SEED (split seed 0)."""
    t0 = time.perf_counter()
    images = str(COVID / "images")
    manifest = str(work / "covid.parquet")
    steps = [
        ["prepare", "covid", str(COVID / "metadata.csv"), "--images", images, "--val-fraction", "0.25",
         "--seed", "0", "-o", manifest],
        ["train-backbone", "--manifest", manifest, "--model", "convnext_atto", "--size", "256",
         "--no-pretrained", "--epochs", "8", "--lr", "5e-4", "--batch-size", "16", "--val-every", "0.5",
         "--seed", str(seed), "-o", str(work / "b")],
        ["extract-features", "--checkpoint", str(work / "b" / "best.pt"), "--manifest", manifest,
         "--flip", "--store", str(work / "covid.zarr")],
        ["train-fusion", "--store", str(work / "covid.zarr"), "--epochs", "20", "--lr", "1e-4",
         "--val-every", "1", "--seed", str(seed), "-o", str(work / "f")],
        ["compare", "--backbone", str(work / "b" / "best.pt"), "--fusion", str(work / "f" / "best.pt"),
         "--manifest", manifest, "--store", str(work / "covid.zarr"), "--split", "val",
         "-o", str(work / "compare.md")],
    ]
    for step in steps:
        subprocess.run(CHX + step, check=True, cwd=work, stdout=subprocess.DEVNULL)
    results = json.loads((work / "compare.json").read_text())
    results = results.get("results", results)
    rows = {name: {"mAP": r["mAP"], "mAUC": r["mAUC"], "studies": r["n_studies"]}
            for name, r in results.items() if isinstance(r, dict) and "mAP" in r}
    best = [json.loads(line) for line in (work / "b" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in best if "val_mAP" in r or "mAP" in r]
    return {"rows": rows, "stage-1 best val mAP": max((r.get("val_mAP", r.get("mAP")) for r in val),
                                                       default=None),
            "seconds": time.perf_counter() - t0}


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def table(runs: list[dict], what: str) -> str:
    seeds = [r["seed"] for r in runs]
    lines = [f"| {what} row | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | sd | min | max |",
             "|---|" + "---:|" * (len(seeds) + 4)]
    for name in runs[0]["rows"]:
        for metric in ("mAP", "mAUC"):
            values = [r["rows"][name][metric] for r in runs if name in r["rows"]]
            if len(values) != len(runs):
                continue
            s = spread(values)
            lines.append(f"| {name} ({runs[0]['rows'][name]['studies']} studies), {metric} | "
                         + " | ".join(f"{v:.3f}" for v in values)
                         + f" | {s['mean']:.3f} | {s['sd']:.3f} | {s['min']:.3f} | {s['max']:.3f} |")
    if "visibility" in runs[0]:
        for method in runs[0]["visibility"]:
            for g in runs[0]["visibility"][method]:
                gaps = [r["visibility"][method][g][1] - r["visibility"][method][g][0] for r in runs]
                s = spread(gaps)
                lines.append(f"| fusion minus stage-1 {method}, {g} | " + " | ".join(f"{v:+.3f}" for v in gaps)
                             + f" | {s['mean']:+.3f} | {s['sd']:.3f} | {s['min']:+.3f} | {s['max']:+.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="+", default=["covid", "demo"], choices=["covid", "demo"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--one", nargs=3, metavar=("WHAT", "SEED", "WORK"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        what, seed, work = args.one[0], int(args.one[1]), Path(args.one[2])
        result = (demo_run if what == "demo" else covid_run)(seed, work)
        (work / "result.json").write_text(json.dumps(result, default=float))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="chx-spread-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    record = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "threads": args.threads, "command": " ".join(sys.argv), "runs": {}}
    out_json = args.out / "results_spread.json"
    if out_json.exists():
        record["runs"] = json.loads(out_json.read_text()).get("runs", {})
    for what in args.only:
        runs = []
        for seed in args.seeds:
            d = work / f"{what}-{seed}"
            d.mkdir(parents=True, exist_ok=True)
            print(f"{what} seed {seed} -> {d}", flush=True)
            subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--one", what, str(seed),
                            str(d)], check=True, env=env, cwd=ROOT)
            runs.append({"seed": seed, **json.loads((d / "result.json").read_text())})
        record["runs"][what] = runs
        args.out.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(record, indent=1))
    md = [f"# README result tables: spread over seeds\n\n{record['date']}, {record['machine']}, "
          f"OMP_NUM_THREADS={record['threads']}; `{record['command']}` (see the script's docstring).\n"]
    for what, runs in record["runs"].items():
        md += [f"## {what}\n", table(runs, what), "",
               "Run time (s): " + ", ".join(f"seed {r['seed']} {r['seconds']:.0f}" for r in runs), ""]
    (args.out / "results_spread.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
