"""Speed of explanations at the demo's configuration (convnext_atto at 128 px, fusion defaults,
images drawn at that size as `chx demo` does, no flip TTA), one run, interleaved, medians:

    .venv/bin/python benchmarks/bench_explain.py [--repeats 30]

1. Attention on request costs nothing when not asked: a training step (forward, backward, AdamW)
   of the stage-1 model (16 images) and of the fusion model (16 two-view studies), and
   ``Predictor.predict_study`` of a two-view study, with the head's current forward against the
   forward it had before attention could be requested (``need_weights=False``, reproduced below).
   Target: ratios within noise of 1.
2. Explaining one two-view study against predicting it: ``FusionExplainer.explain_study`` (the
   probabilities, the attention maps and both files read for the figure), and that plus the
   study's figure (4 findings) written as PNG: the whole per-study work of `chx explain`.
   Target (issue 16): <= 1.5x predict.

Weights are random (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_data, emit, median  # noqa: E402


def pre_change_forward(self, x, key_padding_mask=None, return_attention=False):
    """``MLDecoder.forward`` before attention on request (commit bfc895e^): weights never asked."""
    assert not return_attention
    tokens = self._tokens(x, key_padding_mask)
    q = self.queries.to(tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
    if self.query_norm is not None:
        q = self.query_norm(q + self.query_dropout(q))
    attended, _ = self.cross_attn(q, tokens, tokens, key_padding_mask=key_padding_mask, need_weights=False)
    q = self.norm1(q + self.dropout1(attended))
    q = self.norm2(q + self.dropout2(self.ffn(q)))
    return torch.einsum("bkd,kd->bk", q, self.group_weight.to(q.dtype)) + self.group_bias.to(q.dtype)


@contextlib.contextmanager
def head_forward(kind: str):
    """Run the ML-Decoder with its current forward ("current") or the pre-change one ("before")."""
    from chx.models.ml_decoder import MLDecoder

    current = MLDecoder.forward
    if kind == "before":
        MLDecoder.forward = pre_change_forward
    try:
        yield
    finally:
        MLDecoder.forward = current


def timed(fn, repeats: int, kinds=("current", "before")) -> dict[str, float]:
    """Median seconds of ``fn()`` under each head forward, the kinds interleaved run by run."""
    times = {k: [] for k in kinds}
    for kind in kinds:                      # warm-up
        with head_forward(kind):
            fn()
    for _ in range(repeats):
        for kind in kinds:
            with head_forward(kind):
                t0 = time.perf_counter()
                fn()
                times[kind].append(time.perf_counter() - t0)
    return {k: median(v) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--model", default="convnext_atto")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args(argv)

    import tempfile

    import polars as pl

    from chx.data.demo import CLASS_NAMES
    from chx.data.manifest import read_manifest
    from chx.data.transforms import Preprocess
    from chx.engine.attribution import FusionExplainer
    from chx.engine.predictor import Predictor
    from chx.models import create_model
    from chx.pipeline.explain import render_figure

    torch.manual_seed(0)
    k = len(CLASS_NAMES)
    work = a.work or Path(tempfile.mkdtemp(prefix="chx-bench-"))
    manifest = demo_data(work, 40, a.size)            # `chx demo` draws its images at its input size
    df = read_manifest(manifest)
    two = df.group_by("study_id", maintain_order=True).agg(pl.len().alias("n")).filter(pl.col("n") == 2)
    study = df.filter(pl.col("study_id") == two["study_id"][0])
    paths = [manifest.parent / "images" / p for p in study["path"]]
    views, ids = study["view"].to_list(), study["image_id"].to_list()

    backbone = create_model("backbone", backbone_name=a.model, num_classes=k)
    fusion = create_model("fusion", in_dim=backbone.feature_dim, num_classes=k)
    predictor = Predictor(backbone=backbone.eval(), fusion=fusion.eval(), pre=Preprocess(a.size), pool=1,
                          flip_tta=False, class_names=list(CLASS_NAMES), device=torch.device("cpu"))
    rows = []

    # 1. training steps and predict, current head forward vs the pre-change one
    def train_step(model, batch):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

        def step():
            model.train()
            F.binary_cross_entropy_with_logits(model(*batch), batch_target).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    batch_target = torch.rand(16, k)
    images = torch.randn(16, 1, a.size, a.size)
    side = a.size // backbone.feature_stride
    maps = torch.randn(16, 2, backbone.feature_dim, side, side)
    mask, types = torch.ones(16, 2, dtype=torch.bool), torch.tensor([[0, 1]] * 16)
    for name, fn in (("stage-1 training step (16 images)", train_step(backbone, (images,))),
                     ("fusion training step (16 two-view studies)", train_step(fusion, (maps, mask, types))),
                     ("predict one two-view study", lambda: predictor.predict_study(paths, views, ids))):
        backbone.eval()          # the training steps switch to train mode themselves
        fusion.eval()
        t = timed(fn, a.repeats)
        rows.append({"benchmark": name, "current_ms": 1e3 * t["current"], "before_ms": 1e3 * t["before"],
                     "ratio": t["current"] / t["before"], "target": "within noise of 1"})
    backbone.eval()
    fusion.eval()

    # 2. explain vs predict of the same study
    explainer = FusionExplainer(predictor)

    def explain_and_figure():
        expl = explainer.explain_study("s", paths, views, ids)
        render_figure(expl, list(range(4))).save(io.BytesIO(), format="png", compress_level=1)

    fns = {"predict": lambda: predictor.predict_study(paths, views, ids),
           "explain": lambda: explainer.explain_study("s", paths, views, ids),
           "explain + figure": explain_and_figure}
    times = {n: [] for n in fns}
    for fn in fns.values():
        fn()
    for _ in range(a.repeats):
        for n, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[n].append(time.perf_counter() - t0)
    t = {n: median(v) for n, v in times.items()}
    for n in ("explain", "explain + figure"):
        rows.append({"benchmark": f"{n} / predict, one two-view study", "current_ms": 1e3 * t[n],
                     "before_ms": 1e3 * t["predict"], "ratio": t[n] / t["predict"], "target": "<= 1.5"})

    print(f"\n{a.model} at {a.size} px, fusion defaults (D = {fusion.config['dim']}), {k} classes, "
          f"{torch.get_num_threads()} threads, medians of {a.repeats}")
    print("| benchmark | ms | reference ms | ratio | target |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['benchmark']} | {r['current_ms']:.1f} | {r['before_ms']:.1f} | {r['ratio']:.2f} | "
              f"{r['target']} |")
        emit(r)
    return rows


if __name__ == "__main__":
    main()
