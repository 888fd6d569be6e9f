"""Explanations: which view and which region of a study drove each finding, and how well they point.

The ML-Decoder head has one query per class. Its cross-attention over the tokens of ALL views of a
study (fusion) is a per-finding, per-view map for free: a view's *share* of a finding is the sum of
that finding's attention over the view's tokens (the shares of a study sum to 1). On the stage-1
model the same weights are a map over one image's feature map; :func:`grad_cam` is the field's
usual saliency baseline (Selvaraju et al. 2017) on the same model.

Geometry. A token grid [gh, gw] is taken to tile the preprocessed square (``Preprocess.size`` S)
evenly. A map is sampled bilinearly at each output pixel's position in that square, which is the
same as upsampling it to S x S, cropping the letterbox padding and resizing the rest to the file's
own size, in one step. The fusion projection's stride-2 conv centres token j on feature column 2j,
half a feature cell from the even tiling: less than the one-token tolerance of the pointing game.
Points are (x, y) in the image file's pixels (x right, y down; a pixel's centre at +0.5).

Probabilities are those of ``chx predict`` (flip TTA included when the bundle has it); the maps
are of the images as given (the unflipped pass).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from chx.data.image_cache import open_image_cache
from chx.data.images import read_image
from chx.data.transforms import Preprocess
from chx.data.views import FRONTAL_TYPE, LATERAL_TYPE, deterministic_view_order, view_type
from chx.engine.distributed import resolve_device
from chx.engine.inference import feature_maps, load_backbone
from chx.engine.predictor import Predictor, load_images, study_views
from chx.errors import ChxError

METHODS = ("attention", "grad-cam")


# ----------------------------------------------------------------------------------------- geometry

def placement(height: int, width: int, pre: Preprocess) -> tuple[int, int, int, int]:
    """Where :func:`chx.data.images.load_image` puts a ``height`` x ``width`` image in its S x S
    square: (top, left, new_h, new_w) in square pixels (letterbox: centred, aspect kept; squash:
    the whole square)."""
    s = pre.size
    if pre.mode == "squash":
        return 0, 0, s, s
    scale = s / max(height, width)
    new_h = min(s, max(1, round(height * scale)))
    new_w = min(s, max(1, round(width * scale)))
    return (s - new_h) // 2, (s - new_w) // 2, new_h, new_w


def token_size(grid: tuple[int, int], height: int, width: int, pre: Preprocess) -> tuple[float, float]:
    """(width, height) of one token of a [gh, gw] grid in the image file's pixels."""
    gh, gw = grid
    _, _, new_h, new_w = placement(height, width, pre)
    return pre.size / gw * width / new_w, pre.size / gh * height / new_h


def token_centre(index: int, grid: tuple[int, int], height: int, width: int,
                 pre: Preprocess) -> tuple[float, float]:
    """(x, y) in the image file's pixels of the centre of token ``index`` (row-major in a [gh, gw]
    grid), clipped into the image (a token over the letterbox padding points at the nearest edge)."""
    gh, gw = grid
    top, left, new_h, new_w = placement(height, width, pre)
    i, j = divmod(int(index), gw)
    x = ((j + 0.5) * pre.size / gw - left) * width / new_w
    y = ((i + 0.5) * pre.size / gh - top) * height / new_h
    return float(np.clip(x, 0.0, width - 0.5)), float(np.clip(y, 0.0, height - 0.5))


def map_to_image(maps: np.ndarray, height: int, width: int, pre: Preprocess,
                 out_size: tuple[int, int] | None = None) -> np.ndarray:
    """Token maps [M, gh, gw] -> [M, H, W] on the image file's pixels (``out_size`` (H, W): the
    same region at another resolution, e.g. a figure's; default the file's (height, width)).

    Bilinear; each output pixel samples the grid where its centre lies in the preprocessed square."""
    out_h, out_w = out_size or (height, width)
    top, left, new_h, new_w = placement(height, width, pre)
    s = pre.size
    # output pixel centre -> square pixels -> grid_sample's [-1, 1] (align_corners=False: the grid
    # cells tile [-1, 1] evenly, as the tokens tile the square)
    xs = (left + (torch.arange(out_w, dtype=torch.float32) + 0.5) * new_w / out_w) * 2 / s - 1
    ys = (top + (torch.arange(out_h, dtype=torch.float32) + 0.5) * new_h / out_h) * 2 / s - 1
    where = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]       # [1, H, W, 2]
    grid = torch.as_tensor(np.asarray(maps, dtype=np.float32))[None]                # [1, M, gh, gw]
    out = F.grid_sample(grid, where, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0].numpy()


# ----------------------------------------------------------------------------------------- results

@dataclass
class ViewMap:
    """One image of an explained study.

    ``grid`` [K, gh, gw]: each class's weight per token (attention mass; Grad-CAM value); ``image``
    [height, width] the file's pixels in [0, 1] (for figures); ``probs`` [K] this image's own
    probabilities (stage 1; None for fusion, whose probabilities are the study's)."""

    image_id: str
    view: str
    file: str
    image: np.ndarray
    grid: np.ndarray
    probs: np.ndarray | None = None

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


@dataclass
class Explanation:
    """The maps of one study: ``probs`` [K] (fusion: the study's; stage 1: the max over its images,
    used to rank findings), one :class:`ViewMap` per view in the models' deterministic order.

    ``method``: "attention" or "grad-cam"; ``model``: "fusion" or "stage-1". For fusion attention the
    views' grids together sum to 1 per class (:meth:`shares`); stage-1 maps are per image."""

    study_id: str
    class_names: list[str]
    probs: np.ndarray
    views: list[ViewMap]
    pre: Preprocess
    model: str
    method: str = "attention"
    grid_shape: tuple[int, int] = field(init=False)

    def __post_init__(self):
        self.grid_shape = tuple(self.views[0].grid.shape[1:])

    @property
    def has_shares(self) -> bool:
        """Whether the views' maps split one budget per class (fusion attention)."""
        return self.model == "fusion" and self.method == "attention"

    def shares(self) -> np.ndarray:
        """[V, K]: each view's share of each class's attention (columns sum to 1 for fusion)."""
        return np.stack([v.grid.reshape(v.grid.shape[0], -1).sum(1) for v in self.views])

    def peak(self, view: int, k: int) -> tuple[float, float]:
        """(x, y) in view ``view``'s file pixels: the centre of its highest token for class ``k``."""
        v = self.views[view]
        return token_centre(int(np.argmax(v.grid[k])), self.grid_shape, v.height, v.width, self.pre)

    def study_peak(self, k: int) -> tuple[int, float, float]:
        """(view index, x, y): the highest token of class ``k`` over all views of the study."""
        best = int(np.argmax([v.grid[k].max() for v in self.views]))
        return (best, *self.peak(best, k))

    def token_size(self, view: int) -> tuple[float, float]:
        """(width, height) of one token in view ``view``'s file pixels."""
        v = self.views[view]
        return token_size(self.grid_shape, v.height, v.width, self.pre)

    def heatmaps(self, view: int, classes: list[int], out_size: tuple[int, int] | None = None) -> np.ndarray:
        """The maps of ``classes`` on view ``view``'s pixels [len(classes), H, W] (see :func:`map_to_image`)."""
        v = self.views[view]
        return map_to_image(v.grid[classes], v.height, v.width, self.pre, out_size)


# ----------------------------------------------------------------------------------------- explainers

class FusionExplainer:
    """The fusion model's attention over all views of a study, with ``chx predict``'s probabilities.

    Views are chosen and ordered as :meth:`Predictor.predict_study` does (at most the model's
    ``max_views``); images beyond them are not used by the model and are not shown."""

    model = "fusion"
    method = "attention"

    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    @property
    def class_names(self) -> list[str]:
        return self.predictor.class_names

    @torch.no_grad()
    def explain_study(self, study_id: str, paths: list[Path], views: list[str],
                      image_ids: list[str]) -> Explanation:
        p = self.predictor
        order, types = study_views(views, image_ids, p.fusion.max_views)
        x = p.images([paths[i] for i in order], [image_ids[i] for i in order])    # [V, 1, S, S]
        types = torch.tensor([types], device=p.device)
        mask = torch.ones(1, len(order), dtype=torch.bool, device=p.device)
        maps = feature_maps(p.backbone, x, p.pool, amp=p.amp).float()[None]                  # [1, V, C, h, w]
        logits, attention = p.fusion(maps, mask, types, return_attention=True)   # [1, K], [1, K, V*h'*w']
        probs = torch.sigmoid(logits.float())
        if p.flip_tta:
            flipped = feature_maps(p.backbone, x, p.pool, flip=True, amp=p.amp).float()[None]
            probs = 0.5 * (probs + torch.sigmoid(p.fusion(flipped, mask, types).float()))
        gh, gw = p.fusion.token_grid(*maps.shape[-2:])
        k = len(p.class_names)
        grids = attention[0].float().reshape(k, len(order), gh, gw).permute(1, 0, 2, 3).cpu().numpy()
        return Explanation(
            str(study_id), list(p.class_names), probs[0].cpu().numpy(),
            [ViewMap(str(image_ids[i]), views[i], str(paths[i]), read_image(paths[i]), grids[n])
             for n, i in enumerate(order)], p.pre, self.model, self.method)


@torch.enable_grad()
def grad_cam(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of a stage-1 model on its last-stage map, every class: images [B, 1, S, S] ->
    (logits [B, K], maps [B, K, h, w]). Class k's map is ReLU(sum_c a_kc A_c), a_kc the spatial mean
    of d logit_k / d A_c. Gradients flow through the head only (the map is the leaf), so the cost is
    one backbone forward and K small head backward passes. ``model`` should be in eval mode."""
    with torch.no_grad():
        fmap = model.forward_features(images).float()
    fmap.requires_grad_(True)
    logits = model.forward_head(fmap)
    cams = []
    for k in range(logits.shape[1]):
        # the samples of a batch are independent in eval mode: the gradient of the sum is each one's
        (grad,) = torch.autograd.grad(logits[:, k].sum(), fmap, retain_graph=k < logits.shape[1] - 1)
        cams.append(torch.relu((grad.mean((2, 3), keepdim=True) * fmap).sum(1)))
    return logits.detach(), torch.stack(cams, 1).detach()


class ImageExplainer:
    """Stage-1 maps of each image on its own: the head's attention over the image's feature map
    (``method="attention"``) or :func:`grad_cam`. Each image gets its own probabilities (flip TTA
    when the checkpoint validated with it, as ``chx evaluate`` does); a study's findings are ranked
    by the max over its images."""

    model = "stage-1"

    def __init__(self, model: nn.Module, pre: Preprocess, class_names: list[str],
                 device: torch.device, tta: bool = True, method: str = "attention"):
        if method not in METHODS:
            raise ChxError(f"explanation method {method!r} is not one of {', '.join(METHODS)}")
        self.net, self.pre, self.class_names = model.eval(), pre, list(class_names)
        self.device, self.tta, self.method = device, tta, method
        self.cache = None

    def use_images_cache(self, path: str | None) -> list[str]:
        """The model's input from the image cache ``path`` by image id (figures still show the files)."""
        self.cache = open_image_cache(path, self.pre)
        return []

    @classmethod
    def load(cls, checkpoint: Path, device: str = "auto", method: str = "attention") -> "ImageExplainer":
        model, ckpt = load_backbone(checkpoint)
        dev = resolve_device(device)
        return cls(model.to(dev), Preprocess.from_dict(ckpt["preprocess"]), ckpt["class_names"], dev,
                   bool(ckpt.get("tta", True)), method)

    def _logits_and_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.method == "grad-cam":
            return grad_cam(self.net, x)
        with torch.no_grad():
            fmap = self.net.forward_features(x)                                   # [B, C, h, w]
            logits, attention = self.net.forward_head(fmap, return_attention=True)  # [B, K], [B, K, h*w]
        return logits, attention.reshape(*attention.shape[:2], *fmap.shape[-2:])

    def explain_study(self, study_id: str, paths: list[Path], views: list[str],
                      image_ids: list[str]) -> Explanation:
        order = deterministic_view_order(views, image_ids)
        x = load_images(self.pre, [paths[i] for i in order], self.cache,
                        [image_ids[i] for i in order]).to(self.device)                  # [V, 1, S, S]
        logits, maps = self._logits_and_maps(x)
        probs = torch.sigmoid(logits.float())
        if self.tta:
            with torch.no_grad():
                probs = 0.5 * (probs + torch.sigmoid(self.net(torch.flip(x, dims=[-1])).float()))
        probs, maps = probs.cpu().numpy(), maps.float().cpu().numpy()
        return Explanation(
            str(study_id), self.class_names, probs.max(0),
            [ViewMap(str(image_ids[i]), views[i], str(paths[i]), read_image(paths[i]), maps[n], probs[n])
             for n, i in enumerate(order)], self.pre, self.model, self.method)


# ----------------------------------------------------------------------------------------- measurement

def _inside(point: tuple[float, float], box: tuple[float, float, float, float],
            pad: tuple[float, float]) -> bool:
    x, y = point
    x0, y0, x1, y1 = box
    return x0 - pad[0] <= x <= x1 + pad[0] and y0 - pad[1] <= y <= y1 + pad[1]


def _padded_area(box: tuple[float, float, float, float], pad: tuple[float, float], width: int,
                 height: int) -> float:
    """Area of ``box`` grown by ``pad`` on every side, within the image (the chance of a uniformly
    random point of the image to fall in it, times the image's area)."""
    x0, y0, x1, y1 = box
    w = min(x1 + pad[0], width) - max(x0 - pad[0], 0.0)
    h = min(y1 + pad[1], height) - max(y0 - pad[1], 0.0)
    return max(w, 0.0) * max(h, 0.0)


def score_explanation(expl: Explanation, positives: list[str],
                      boxes: dict[tuple[str, str], tuple[float, float, float, float]]) -> list[dict]:
    """One record per positive finding of a study: view shares by view type and the pointing game.

    ``boxes``: (image_id, finding) -> (x0, y0, x1, y1) file pixels of the drawn sign. Pointing (only
    where the finding's sign shows in one of the study's views, else None): ``hit``: the study's
    peak (over all views) lies in a view that shows the sign, inside its box grown by one token on
    every side; ``chance``: that grown area over the study's total image area (``box_chance``: the
    box as drawn, without the tolerance); ``view_hits`` /
    ``view_chances``: the same for the peak within each view that shows the sign."""
    shares = expl.shares()
    types = [view_type(v.view) for v in expl.views]
    records = []
    for name in positives:
        k = expl.class_names.index(name)
        by_type = {t: float(sum(shares[n, k] for n in range(len(types)) if types[n] == code))
                   for t, code in (("frontal", FRONTAL_TYPE), ("lateral", LATERAL_TYPE))}
        rec = {"study_id": expl.study_id, "finding": name, "share": by_type,
               "both_types": FRONTAL_TYPE in types and LATERAL_TYPE in types,
               "hit": None, "chance": None, "box_chance": None, "view_hits": [], "view_chances": []}
        shown = [n for n, v in enumerate(expl.views) if (v.image_id, name) in boxes]
        if shown:
            pads = [expl.token_size(n) for n in range(len(expl.views))]
            best, x, y = expl.study_peak(k)
            box = boxes.get((expl.views[best].image_id, name))
            rec["hit"] = box is not None and _inside((x, y), box, pads[best])
            total = sum(v.width * v.height for v in expl.views)
            for key, grow in (("chance", True), ("box_chance", False)):
                rec[key] = sum(_padded_area(boxes[expl.views[n].image_id, name], pads[n] if grow else (0, 0),
                                            expl.views[n].width, expl.views[n].height) for n in shown) / total
            for n in shown:
                v, box = expl.views[n], boxes[expl.views[n].image_id, name]
                rec["view_hits"].append(_inside(expl.peak(n, k), box, pads[n]))
                rec["view_chances"].append(_padded_area(box, pads[n], v.width, v.height) / (v.width * v.height))
        records.append(rec)
    return records


def summarise_scores(records: list[dict], visibility: dict[str, str]) -> dict:
    """Aggregate :func:`score_explanation` records.

    ``attribution``: for the findings visible only in the lateral (frontal) view, over the positive
    studies that have both a frontal and a lateral view, the mean attention share on each view type.
    ``attribution_per_finding``: the same shares per finding (every finding, over its positive
    studies with both view types). ``pointing``: the study-peak hit rate and its chance rates (box grown by the tolerance, and as
    drawn) over the positive (study, finding) pairs with a drawn sign; ``pointing_in_view`` the same
    per (study, finding, view showing it), chance with the tolerance."""
    attribution = {}
    for only in ("lateral", "frontal"):
        rows = [r for r in records if r["both_types"] and visibility.get(r["finding"]) == only]
        attribution[f"{only}-only findings"] = {
            "studies": len(rows),
            "lateral share": float(np.mean([r["share"]["lateral"] for r in rows])) if rows else float("nan"),
            "frontal share": float(np.mean([r["share"]["frontal"] for r in rows])) if rows else float("nan")}
    by_finding = {}
    for r in records:
        if r["both_types"]:
            by_finding.setdefault(r["finding"], []).append(r["share"])
    per_finding = {f: {"studies": len(s), "lateral share": float(np.mean([x["lateral"] for x in s])),
                       "frontal share": float(np.mean([x["frontal"] for x in s]))}
                   for f, s in by_finding.items()}
    pairs = [r for r in records if r["hit"] is not None]
    hits = [h for r in pairs for h in r["view_hits"]]
    chances = [c for r in pairs for c in r["view_chances"]]

    def rate(values):
        return float(np.mean(values)) if values else float("nan")

    return {"attribution": attribution, "attribution_per_finding": per_finding,
            "pointing": {"pairs": len(pairs), "hit rate": rate([r["hit"] for r in pairs]),
                         "chance": rate([r["chance"] for r in pairs]),
                         "box chance": rate([r["box_chance"] for r in pairs])},
            "pointing_in_view": {"pairs": len(hits), "hit rate": rate(hits), "chance": rate(chances)}}


def sign_boxes(signs: pl.DataFrame) -> dict[tuple[str, str], tuple[float, float, float, float]]:
    """The demo's ``signs.parquet`` rows as (image_id, finding) -> (x0, y0, x1, y1)."""
    return {(r["image_id"], r["finding"]): (r["x0"], r["y0"], r["x1"], r["y1"])
            for r in signs.iter_rows(named=True)}


def measure_explanations(explainer, manifest: pl.DataFrame, images: Path, signs: pl.DataFrame,
                         visibility: dict[str, str], progress: bool = False) -> dict:
    """View attribution and pointing game of ``explainer`` (a :class:`FusionExplainer` or
    :class:`ImageExplainer`) on every study of ``manifest`` (the rows of one split, with labels),
    against the drawn signs (:func:`chx.data.demo.read_signs`); see :func:`summarise_scores`."""
    from tqdm.auto import tqdm

    boxes = sign_boxes(signs)
    classes = [c for c in explainer.class_names if c in visibility]
    records = []
    groups = manifest.group_by("study_id", maintain_order=True)
    for (study,), g in tqdm(groups, desc="explain", unit="study", leave=False, disable=not progress):
        positives = [c for c in classes if g[c][0] == 1]
        if not positives:
            continue
        expl = explainer.explain_study(study, [Path(images) / p for p in g["path"]], g["view"].to_list(),
                                       g["image_id"].to_list())
        records += score_explanation(expl, positives, boxes)
    return summarise_scores(records, visibility)
