"""A deterministic synthetic multi-view chest X-ray dataset (``chx make-demo-data``).

Radiograph-like grayscale images: a frontal (PA/AP) and a lateral view per study; some studies have
only one view, a few have three. Findings have a long-tailed prevalence with some co-occurrence,
and each leaves a visual sign that is visible in BOTH views, ONLY in the frontal view or ONLY in the
lateral view. A model that sees one view cannot reach what a model that fuses the views can: that
is what the demo shows.

The 4-view variant (``max_views=4``) asks how many views to fuse: studies of 1-4 views (PA, AP,
LATERAL and a second lateral, LL; see :data:`FOUR_VIEW_SETS`), where a frontal-only sign shows in
ONE of the study's frontal views and a lateral-only sign in ONE of its lateral views (chosen at
random), while both-view signs show in every view. Fusing only the first N views in the
deterministic order (PA, AP, LATERAL, LL) then misses signs that fusing all of them sees.

Everything derives from ``(seed, study number)``, so the same arguments give the same files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from chx.data.manifest import build_manifest, validate, write_manifest
from chx.data.splits import assign_splits
from chx.data.views import FRONTAL_VIEWS, LATERAL_VIEWS
from chx.errors import ChxError


@dataclass(frozen=True)
class Finding:
    name: str
    prevalence: float
    visible_in: str          # "both", "frontal" or "lateral"


FINDINGS: tuple[Finding, ...] = (
    Finding("Cardiomegaly", 0.30, "both"),
    Finding("Pleural Effusion", 0.20, "frontal"),
    Finding("Posterior Mass", 0.15, "lateral"),
    Finding("Lung Opacity", 0.10, "both"),
    Finding("Nodule", 0.07, "frontal"),
    Finding("Vertebral Fracture", 0.05, "lateral"),
    Finding("Pneumothorax", 0.03, "frontal"),
    Finding("Hiatal Hernia", 0.02, "lateral"),
)
CLASS_NAMES: tuple[str, ...] = tuple(f.name for f in FINDINGS) + ("No Finding",)

# The 4-view variant's studies: (probability, views), views in chx.data.views' names (PA, AP,
# LATERAL, LL). Mean 3.1 views per study.
_PA, _AP = FRONTAL_VIEWS
_LAT, _LL = LATERAL_VIEWS
FOUR_VIEW_SETS: tuple[tuple[float, tuple[str, ...]], ...] = (
    (0.40, (_PA, _AP, _LAT, _LL)),
    (0.20, (_PA, _LAT, _LL)),
    (0.15, (_PA, _AP, _LAT)),
    (0.15, (_PA, _LAT)),
    (0.05, (_AP, _LL)),
    (0.05, (_PA,)),
)


def visibility() -> dict[str, str]:
    """Class -> the views its sign is visible in (for the demo's per-visibility report)."""
    return {f.name: f.visible_in for f in FINDINGS}


def _grid(size: int):
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return y, x


def _blob(y, x, cy, cx, ry, rx, soft=0.08):
    d = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2
    return 1.0 / (1.0 + np.exp(np.minimum((d - 1.0) / soft, 60.0)))


def _frontal(rng, size, labels, signs) -> np.ndarray:
    y, x = _grid(size)
    img = 0.15 + 0.55 * _blob(y, x, 0.55, 0.5, 0.5, 0.42)                       # body
    for cx in (0.32, 0.68):                                                      # lungs
        img -= 0.35 * _blob(y, x, 0.47, cx + rng.normal(0, 0.01), 0.3, 0.14)
    img += 0.25 * _blob(y, x, 0.55, 0.5, 0.5, 0.035)                             # spine
    img += 0.04 * np.sin(y * 2 * math.pi * 9 + rng.uniform(0, 6)) * _blob(y, x, 0.47, 0.5, 0.32, 0.36)
    heart_r = 0.16 if labels["Cardiomegaly"] else 0.105                         # both views
    img += 0.3 * _sign(signs, "Cardiomegaly", labels, y, x, 0.62, 0.54, heart_r * 0.8, heart_r)
    if labels["Lung Opacity"]:                                                    # both views
        cx = rng.choice([0.3, 0.7])
        img += 0.22 * _sign(signs, "Lung Opacity", labels, y, x, rng.uniform(0.35, 0.55), cx, 0.08, 0.07, soft=0.3)
    if labels["Pleural Effusion"]:                                                # frontal only
        side = rng.choice([0.3, 0.7])
        img += 0.28 * _sign(signs, "Pleural Effusion", labels, y, x, 0.74, side, 0.06, 0.13, soft=0.2)
    if labels["Nodule"]:                                                          # frontal only
        cy = rng.uniform(0.3, 0.6)
        cx = rng.choice([0.28, 0.72])
        img += 0.35 * _sign(signs, "Nodule", labels, y, x, cy, cx, 0.025, 0.025)
    if labels["Pneumothorax"]:                                                    # frontal only
        cx = rng.choice([0.24, 0.76])
        img -= 0.18 * _sign(signs, "Pneumothorax", labels, y, x, 0.3, cx, 0.12, 0.05)
    return img


def _lateral(rng, size, labels, signs) -> np.ndarray:
    y, x = _grid(size)
    img = 0.15 + 0.55 * _blob(y, x, 0.55, 0.5, 0.5, 0.36)                       # body
    img -= 0.3 * _blob(y, x, 0.45, 0.5 + rng.normal(0, 0.01), 0.3, 0.22)          # lungs overlapped
    img += 0.3 * _blob(y, x, 0.55, 0.8, 0.45, 0.05)                              # spine (posterior)
    heart_r = 0.17 if labels["Cardiomegaly"] else 0.11                           # both views
    img += 0.3 * _sign(signs, "Cardiomegaly", labels, y, x, 0.62, 0.36, heart_r * 0.9, heart_r)
    if labels["Lung Opacity"]:                                                    # both views
        img += 0.22 * _sign(signs, "Lung Opacity", labels, y, x, rng.uniform(0.35, 0.55), 0.5, 0.08, 0.08, soft=0.3)
    if labels["Posterior Mass"]:                                                  # lateral only
        img += 0.3 * _sign(signs, "Posterior Mass", labels, y, x, rng.uniform(0.4, 0.6), 0.66, 0.05, 0.04)
    if labels["Vertebral Fracture"]:                                              # lateral only
        cy = rng.uniform(0.4, 0.75)
        img -= 0.3 * _sign(signs, "Vertebral Fracture", labels, y, x, cy, 0.8, 0.012, 0.06)
    if labels["Hiatal Hernia"]:                                                   # lateral only
        img -= 0.25 * _sign(signs, "Hiatal Hernia", labels, y, x, 0.78, 0.55, 0.04, 0.05)
    return img


def _sign(signs: dict, name: str, labels, y, x, cy, cx, ry, rx, soft=0.08) -> np.ndarray:
    """Draw a blob; when it is the visible sign of a positive finding, record its box (the blob's
    half-intensity ellipse, fractions of the image: cy, cx, ry, rx) under the finding's name."""
    if labels[name]:
        signs[name] = (cy, cx, ry, rx)
    return _blob(y, x, cy, cx, ry, rx, soft)


def _finish(rng, img: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Exposure, noise and a random shift (rows, cols; wrapping) -> (uint8 pixels, the shift)."""
    img = img * rng.uniform(0.85, 1.15) + rng.normal(0, 0.03)                    # exposure
    img = img + rng.normal(0, 0.025, size=img.shape)                              # noise
    shift = rng.integers(-size // 20, size // 20 + 1, size=2)
    img = np.roll(img, tuple(shift), axis=(0, 1))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), (int(shift[0]), int(shift[1]))


def _box_pixels(sign: tuple[float, float, float, float], shift: tuple[int, int], size: int) -> dict:
    """A recorded sign -> its box in the written image's pixels (x0, y0 inclusive; x1, y1 exclusive),
    after the image's shift, clipped to the image."""
    cy, cx, ry, rx = sign
    y0, y1 = (cy - ry) * size + shift[0], (cy + ry) * size + shift[0]
    x0, x1 = (cx - rx) * size + shift[1], (cx + rx) * size + shift[1]
    clip = lambda v: float(min(max(v, 0.0), size))  # noqa: E731
    return {"x0": clip(x0), "y0": clip(y0), "x1": clip(x1), "y1": clip(y1)}


def read_signs(path: str | Path) -> pl.DataFrame:
    """The demo's sign boxes (``signs.parquet`` beside its manifest): one row per image and positive
    finding whose sign that image shows; columns image_id, finding, x0, y0, x1, y1 (pixels of the
    image file, x1/y1 exclusive). A positive finding has no row in a view that does not show it
    (a lateral-only sign on a frontal image; in the 4-view variant also a frontal-only sign on the
    study's frontal views but the one that shows it, and likewise for lateral-only signs)."""
    return pl.read_parquet(path)


def _study_labels(rng) -> dict[str, int]:
    labels = {f.name: int(rng.random() < f.prevalence) for f in FINDINGS}
    # Co-occurrence: effusion and opacity are more frequent with cardiomegaly.
    if labels["Cardiomegaly"] and rng.random() < 0.25:
        labels["Pleural Effusion"] = 1
    if labels["Pleural Effusion"] and rng.random() < 0.2:
        labels["Lung Opacity"] = 1
    labels["No Finding"] = int(not any(labels.values()))
    return labels


def _standard_views(rng) -> list[str]:
    """The standard demo's views of a study: mostly PA + lateral, some one view, a few three."""
    r = rng.random()
    if r < 0.75:
        return ["PA", "LATERAL"]
    if r < 0.87:
        return [rng.choice(["PA", "AP"])]
    if r < 0.95:
        return ["LATERAL"]
    return ["AP", "PA", "LATERAL"]


def _four_views(rng) -> list[str]:
    """A 4-view variant study's views, drawn from :data:`FOUR_VIEW_SETS`."""
    p = np.array([w for w, _ in FOUR_VIEW_SETS])
    return list(FOUR_VIEW_SETS[rng.choice(len(FOUR_VIEW_SETS), p=p / p.sum())][1])


def _shown_per_view(rng, labels: dict[str, int], views: list[str]) -> list[dict[str, int]]:
    """The 4-view variant: per view, the labels whose sign that view shows. A frontal-only
    (lateral-only) finding shows in one of the study's frontal (lateral) views, at random; a
    both-view finding in every view."""
    kinds = ["lateral" if view in LATERAL_VIEWS else "frontal" for view in views]
    shown = [dict(labels) for _ in views]
    for f in FINDINGS:
        if f.visible_in == "both" or not labels[f.name]:
            continue
        carriers = [j for j, kind in enumerate(kinds) if kind == f.visible_in]
        keep = carriers[rng.integers(len(carriers))] if carriers else None
        for j in carriers:
            shown[j][f.name] = int(j == keep)
    return shown


def make_demo_data(out: str | Path, studies: int = 1000, seed: int = 0, size: int = 160,
                   val_fraction: float = 0.15, test_fraction: float = 0.15, max_views: int = 3) -> Path:
    """Write ``out/images/*.png``, ``out/manifest.parquet`` and ``out/signs.parquet`` (where each
    image shows each positive finding's sign, see :func:`read_signs`); return the manifest path.

    ``max_views``: 3, the standard demo; 4, the 4-view variant (see the module docstring)."""
    if max_views not in (3, 4):
        raise ChxError(f"demo data: max_views {max_views}: use 3 (the standard demo) or 4 (its 4-view variant)")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows, boxes = [], []
    for s in range(studies):
        rng = np.random.default_rng([seed, s])
        labels = _study_labels(rng)
        if max_views == 3:
            views = _standard_views(rng)
            shown = [labels] * len(views)
        else:
            views = _four_views(rng)
            shown = _shown_per_view(rng, labels, views)
        subject = f"subj{s // 2 if s % 7 == 0 else s:05d}"   # a few subjects with two studies
        study = f"study{s:05d}"
        for j, view in enumerate(views):
            draw = _lateral if view in LATERAL_VIEWS else _frontal
            signs: dict[str, tuple[float, float, float, float]] = {}
            pixels, shift = _finish(rng, draw(rng, size, shown[j], signs), size)
            name = f"{study}_{j}_{view.lower()}.png"
            boxes += [{"image_id": f"{study}_{j}", "finding": finding, **_box_pixels(sign, shift, size)}
                      for finding, sign in signs.items()]
            Image.fromarray(pixels, mode="L").save(out / "images" / name, optimize=False, compress_level=1)
            rows.append({"image_id": f"{study}_{j}", "study_id": study, "subject_id": subject,
                         "view": view, "path": name, **{c: float(labels[c]) for c in CLASS_NAMES}})
    df = pl.DataFrame(rows)
    ids = df.select(["image_id", "study_id", "subject_id", "view", "path"])
    manifest = build_manifest(ids, df.select(list(CLASS_NAMES)))
    manifest = assign_splits(manifest, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    manifest = validate(manifest, source="demo manifest")
    schema = {"image_id": pl.Utf8, "finding": pl.Utf8, **{k: pl.Float64 for k in ("x0", "y0", "x1", "y1")}}
    pl.DataFrame(boxes, schema=schema).write_parquet(out / "signs.parquet")
    return write_manifest(manifest, out / "manifest.parquet")
