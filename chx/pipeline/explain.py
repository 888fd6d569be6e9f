"""`chx explain` (and `chx predict --explain`): which view and which region drove each finding.

For every study: one PNG (rows: the top-k findings by probability, or the chosen classes; columns:
the study's views; each cell the view's own image with the finding's map overlaid on the file's
pixels, captioned with the probability and, for fusion, that view's share of the attention), then
``explain.json`` (per study and finding: the probability, per view its share and peak in image
pixels) and a static ``index.html`` gallery that works offline. The maps come from
:mod:`chx.engine.attribution`; the output folder is written atomically (whole, or not at all).
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image, ImageDraw, ImageFont

from chx.atomic import atomic_dir, json_text, output_lock
from chx.data.manifest import portable_path
from chx.engine.attribution import Explanation, FusionExplainer, ImageExplainer
from chx.engine.ensemble import is_ensemble, read_ensemble
from chx.engine.predictor import Predictor, use_images_cache
from chx.errors import ChxError

__all__ = ["load_explainer", "fusion_explainer", "select_studies", "explain", "render_figure"]

# Figure layout, in figure pixels. A cell's long side is the image's, kept between these bounds,
# so small images stay legible and large ones (3000 px DICOMs) stay a reasonable file.
CELL_MIN, CELL_MAX = 160, 384
LABEL_W, HEADER_H, CAPTION_H, PAD = 170, 40, 20, 6
HEAT_ALPHA = 0.6        # opacity of the colour at a row's highest value (0 at its lowest)


def load_explainer(bundle, backbone, fusion, checkpoint, method: str, device: str = "auto",
                   images_cache: str | None = None):
    """The explainer of the model(s) given: a stage-1 ``checkpoint`` alone (``method`` attention or
    grad-cam), or the fusion pair (a bundle, or ``backbone`` + ``fusion``; attention only).
    ``images_cache``: the model's input comes from that image cache (the figures from the files)."""
    explainer = _load_explainer(bundle, backbone, fusion, checkpoint, method, device)
    use_images_cache(getattr(explainer, "predictor", explainer), images_cache, images=None)
    return explainer


def _load_explainer(bundle, backbone, fusion, checkpoint, method: str, device: str):
    if checkpoint is not None:
        if bundle or backbone or fusion:
            raise ChxError("--checkpoint (a stage-1 model on its own) does not go with --bundle, --backbone "
                           "or --fusion: give one model")
        return ImageExplainer.load(checkpoint, device=device, method=method)
    if is_ensemble(bundle):
        names = ", ".join(m["path"] for m in read_ensemble(bundle)["members"])
        raise ChxError(f"{bundle} is an ensemble bundle, whose members attend differently; explain them one by one "
                       f"(--bundle {bundle}/members/NAME for a bundle, --checkpoint for a stage-1 member): {names}")
    if method != "attention":
        raise ChxError(f"--method {method} needs --checkpoint (a stage-1 model); fusion maps are its "
                       f"attention: drop --method or give --checkpoint")
    return fusion_explainer(Predictor.load(bundle, backbone, fusion, device=device))


def fusion_explainer(predictor: Predictor) -> FusionExplainer:
    """The explainer of a loaded fusion predictor (``chx predict --explain``: the models it predicted with)."""
    return FusionExplainer(predictor)


def select_studies(inputs: pl.DataFrame, limit: int | None = None) -> pl.DataFrame:
    """``inputs`` (rows of ``collect_inputs``, which selects a manifest's split) restricted to the
    first ``limit`` studies (in input order)."""
    if limit is not None:
        keep = inputs["study_id"].unique(maintain_order=True).head(limit)
        inputs = inputs.filter(pl.col("study_id").is_in(keep.implode()))
    return inputs


def class_indices(class_names: list[str], classes: list[str] | None) -> list[int] | None:
    """Positions of the chosen ``classes`` (None: none chosen); an unknown name is one line."""
    if not classes:
        return None
    unknown = [c for c in classes if c not in class_names]
    if unknown:
        raise ChxError(f"--classes: the model has no class {unknown[0]!r}; its classes: "
                       f"{', '.join(class_names)}")
    return [class_names.index(c) for c in classes]


def explain(explainer, inputs: pl.DataFrame, out: Path, top_k: int = 4,
            classes: list[str] | None = None, *, option: str = "-o", images: Path | None = None) -> dict:
    """Explain every study of ``inputs`` (rows of ``collect_inputs``) into the folder ``out``:
    ``<study>.png``, ``explain.json`` and ``index.html``. Returns explain.json's content. ``out`` is
    locked while it is written and replaces only an explanation folder chx wrote (``option``: the
    option that named it, for messages). explain.json names each view's file relative to ``images``
    (a manifest's images root), else to the folder holding ``out``, else to the inputs' common
    folder: never an absolute path."""
    from tqdm.auto import tqdm

    if top_k < 1:
        raise ChxError(f"--top-k {top_k}: must be >= 1")
    chosen = class_indices(explainer.class_names, classes)
    studies, used = [], set()
    common = os.path.commonpath([str(Path(f).resolve().parent) for f in inputs["file"]]) if inputs.height else None
    with output_lock(out, "explain", option=option), atomic_dir(out, "explain", option=option) as tmp:
        for (study,), group in tqdm(inputs.group_by("study_id", maintain_order=True), desc="explain",
                                    unit="study", leave=False, disable=None):
            expl = explainer.explain_study(study, [Path(f) for f in group["file"]], group["view"].to_list(),
                                           group["image_id"].to_list())
            rows = chosen or [int(k) for k in np.argsort(-expl.probs, kind="stable")[:top_k]]
            name = _figure_name(str(study), used)
            render_figure(expl, rows).save(tmp / name, compress_level=1)
            record = study_record(expl, rows, name)
            for view in record["views"]:
                view["file"] = portable_path(view["file"], images, Path(out).parent, common)
            studies.append(record)
        doc = {"model": explainer.model, "method": explainer.method,
               "classes": list(explainer.class_names), "studies": studies}
        (tmp / "explain.json").write_text(json_text(doc, indent=1))   # valid JSON: NaN -> null
        (tmp / "index.html").write_text(index_html(doc))
    return doc


def _figure_name(study: str, used: set[str]) -> str:
    """A file name for a study's figure: its id with anything but letters, digits, '.', '_', '-'
    replaced, unique within the folder."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", study).strip("._")[:100] or "study"
    name, n = f"{stem}.png", 1
    while name in used:
        n += 1
        name = f"{stem}-{n}.png"
    used.add(name)
    return name


def _point(x: float, y: float) -> dict:
    return {"x": round(x, 1), "y": round(y, 1)}


def study_record(expl: Explanation, shown: list[int], figure: str) -> dict:
    """explain.json's entry of one study: its views, then every finding by probability with its
    study-level peak and per view the peak (and the attention share, or the image's probability)."""
    shares = expl.shares() if expl.has_shares else None
    findings = []
    for k in np.argsort(-expl.probs, kind="stable"):
        k = int(k)
        view, x, y = expl.study_peak(k)
        per_view = []
        for n, v in enumerate(expl.views):
            entry = {"image_id": v.image_id, "peak": _point(*expl.peak(n, k))}
            if shares is not None:
                entry["share"] = round(float(shares[n, k]), 4)
            if v.probs is not None:
                entry["probability"] = round(float(v.probs[k]), 4)
            per_view.append(entry)
        findings.append({"class": expl.class_names[k], "probability": round(float(expl.probs[k]), 4),
                         "shown": k in shown,
                         "peak": {"image_id": expl.views[view].image_id, **_point(x, y)},
                         "views": per_view})
    return {"study_id": expl.study_id, "figure": figure,
            "views": [{"image_id": v.image_id, "view": v.view, "file": v.file, "width": v.width,
                       "height": v.height} for v in expl.views],
            "findings": findings}


# ----------------------------------------------------------------------------------------- figure

def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:   # Pillow < 10.1: the fixed-size bitmap font
        return ImageFont.load_default()


# The 'jet' colour map as a table: 256 levels of [0, 1] -> RGB bytes.
JET = (255 * np.clip(1.5 - np.abs(4 * np.linspace(0, 1, 256)[:, None] - np.array([3.0, 2.0, 1.0])), 0, 1)
       ).round().astype(np.uint8)


def _display_size(height: int, width: int) -> tuple[int, int]:
    long = max(height, width)
    scale = min(max(long, CELL_MIN), CELL_MAX) / long
    return max(1, round(height * scale)), max(1, round(width * scale))


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines = [""]
    for word in text.split():
        trial = f"{lines[-1]} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not lines[-1]:
            lines[-1] = trial
        else:
            lines.append(word)
    return [_fit(draw, line, font, width) for line in lines]


def _overlay(gray: Image.Image, heat: np.ndarray) -> Image.Image:
    """A grayscale image (RGB) with ``heat`` [H, W] in [0, 1] blended in colour (opacity
    ``HEAT_ALPHA`` x heat)."""
    level = (heat * 255).astype(np.uint8)
    alpha = Image.fromarray((level * HEAT_ALPHA).astype(np.uint8))
    return Image.composite(Image.fromarray(JET[level]), gray, alpha)


def render_figure(expl: Explanation, rows: list[int]) -> Image.Image:
    """The study's figure: one row per class index in ``rows``, one column per view.

    A row's colour scale is shared by its views (clear at the row's lowest value, red at its
    highest), so the view that drew more of the finding's attention looks hotter; a white ring
    marks each view's peak."""
    font, small = _font(13), _font(11)
    sizes = [_display_size(v.height, v.width) for v in expl.views]
    col_w = [max(w, 150) for _, w in sizes]
    row_h = max(h for h, _ in sizes) + CAPTION_H
    fig_w = LABEL_W + sum(col_w) + PAD * (len(col_w) + 1)
    fig = Image.new("RGB", (fig_w, HEADER_H + len(rows) * (row_h + PAD) + PAD), "white")
    draw = ImageDraw.Draw(fig)
    what = {"attention": "attention", "grad-cam": "Grad-CAM"}[expl.method]
    draw.text((PAD, PAD), _fit(draw, expl.study_id, font, LABEL_W - PAD), fill="black", font=font)
    draw.text((PAD, PAD + 17), f"{expl.model} {what}", fill="gray", font=small)
    shares = expl.shares() if expl.has_shares else None
    xs = np.cumsum([LABEL_W + PAD] + [w + PAD for w in col_w[:-1]])
    for n, v in enumerate(expl.views):
        draw.text((xs[n], PAD), v.view, fill="black", font=font)
        draw.text((xs[n], PAD + 17), _fit(draw, v.image_id, small, col_w[n]), fill="gray", font=small)
    grays = [Image.fromarray((v.image * 255).round().astype(np.uint8)).resize((w, h), Image.BILINEAR)
             .convert("RGB") for v, (h, w) in zip(expl.views, sizes)]
    maps = [expl.heatmaps(n, rows, sizes[n]) for n in range(len(expl.views))]     # [R, h, w] per view
    for r, k in enumerate(rows):
        top = HEADER_H + r * (row_h + PAD)
        label = _wrap(draw, expl.class_names[k], font, LABEL_W - 2 * PAD)
        for i, line in enumerate(label):
            draw.text((PAD, top + 16 * i), line, fill="black", font=font)
        draw.text((PAD, top + 16 * len(label) + 2), f"p = {expl.probs[k]:.2f}", fill="black", font=font)
        heats = [m[r] for m in maps]
        lo, hi = min(float(h.min()) for h in heats), max(float(h.max()) for h in heats)
        best = expl.study_peak(k)[0]
        for n, v in enumerate(expl.views):
            heat = (heats[n] - lo) / (hi - lo) if hi > lo else np.zeros_like(heats[n])
            fig.paste(_overlay(grays[n], heat), (int(xs[n]), top))
            px, py = expl.peak(n, k)
            cx, cy = px * sizes[n][1] / v.width + xs[n], py * sizes[n][0] / v.height + top
            draw.ellipse((cx - 6, cy - 6, cx + 6, cy + 6), outline="white", width=2)
            if shares is not None:
                caption = f"p {expl.probs[k]:.2f} | share {shares[n, k]:.0%}" + (" | peak" if n == best else "")
            else:
                caption = f"p {v.probs[k]:.2f} (this image)"
            draw.text((xs[n], top + sizes[n][0] + 3), _fit(draw, caption, small, col_w[n]), fill="black",
                      font=small)
    return fig


# ----------------------------------------------------------------------------------------- gallery

def index_html(doc: dict) -> str:
    """A static gallery of every study's figure (no server, no network: relative links only). An
    image that fails to load is flagged in red with the missing file's name."""
    what = {"attention": "attention", "grad-cam": "Grad-CAM"}[doc["method"]]
    items, links = [], []
    for n, s in enumerate(doc["studies"]):
        sid, fig = html.escape(s["study_id"]), html.escape(s["figure"])
        top = ", ".join(f"{html.escape(f['class'])} {f['probability']:.2f}" for f in s["findings"] if f["shown"])
        views = ", ".join(html.escape(v["view"]) for v in s["views"])
        links.append(f'<a href="#s{n}">{sid}</a>')
        items.append(
            f'<section id="s{n}"><h2>{sid}</h2><p>{views} &middot; {top}</p>\n'
            f'<a href="{fig}"><img src="{fig}" alt="{sid}" '
            f'onload="this.dataset.loaded=\'yes\'" '
            f'onerror="this.dataset.loaded=\'no\';this.alt=\'missing file: {fig}\'"></a></section>')
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>chx explain: {len(doc['studies'])} studies</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1400px}"
        "nav a{margin-right:.8em}img{max-width:100%;border:1px solid #ccc}"
        "img[data-loaded=no]{border:3px solid red;min-height:2em}</style></head><body>",
        f"<h1>chx explain: {len(doc['studies'])} studies</h1>",
        f"<p>{html.escape(doc['model'])} model, {what} maps. Rows: findings by probability; columns: "
        "views; the colour scale is shared along a row; a white ring marks each view's peak. "
        'Numbers: <a href="explain.json">explain.json</a>.</p>',
        "<nav>" + " ".join(links) + "</nav>", *items, "</body></html>", ""])
