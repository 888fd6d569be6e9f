"""FLOP budget of a fusion training epoch: from the store vs. recomputing the frozen backbone.

    .venv/bin/python benchmarks/flops_fusion.py [--views 2]

Counts (torch.utils.flop_counter, on the meta device: no weights, no data, seconds to run) the
FLOPs of one study's fusion training step (forward + backward) and of the frozen backbone's
forward over its views, at the demo's configuration and at the paper's. If both paths ran at the
same hardware efficiency, the store's speed-up would be

    (views x backbone forward + fusion step) / fusion step

which is the compute bound of issue 4's ">= 20x" target; decoding and augmenting the images on
the recompute path (not counted here) only add to the recompute side.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

CONFIGS = {  # name: (backbone, input size)
    "demo (convnext_atto, 128 px)": ("convnext_atto", 128),
    "demo-large (convnext_atto, 192 px)": ("convnext_atto", 192),
    "paper (convnext_small, 1024 px)": ("convnext_small", 1024),
}


def count(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def budget(model_name: str, size: int, views: int, num_classes: int = 26) -> dict:
    from chx.models.backbone import ImageClassifier
    from chx.models.fusion import FusionModel

    with torch.device("meta"):
        net = ImageClassifier(model_name, num_classes=num_classes)
        x = torch.empty(views, 1, size, size)
        with torch.no_grad():
            feats = net.forward_features(x)
        backbone = count(lambda: net.forward_features(x)) // views   # per image
        fusion = FusionModel(net.feature_dim, num_classes)
        f = feats.unsqueeze(0)
        mask = torch.ones(1, views, dtype=torch.bool)
        step = count(lambda: fusion(f, mask).float().sum().backward())  # one study, fwd + bwd
    return {"backbone_fwd_gflop_per_image": backbone / 1e9, "fusion_step_gflop_per_study": step / 1e9,
            "feature_shape": tuple(feats.shape[1:]),
            "bound": (views * backbone + step) / step}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, default=2, help="views per study (the demo's typical study has 2)")
    a = ap.parse_args(argv)
    rows = []
    print(f"FLOPs per study of {a.views} views (forward of the frozen backbone; fusion forward + backward):")
    for name, (model, size) in CONFIGS.items():
        b = budget(model, size, a.views)
        print(f"  {name:<36} backbone {b['backbone_fwd_gflop_per_image']:8.2f} GFLOP/image, features "
              f"{b['feature_shape']}, fusion step {b['fusion_step_gflop_per_study']:7.2f} GFLOP/study "
              f"-> compute bound on the store's speed-up {b['bound']:.1f}x")
        rows.append({"benchmark": f"fusion store vs recompute, FLOP bound: {name}", "value": f"{b['bound']:.1f}x",
                     "detail": f"backbone {b['backbone_fwd_gflop_per_image']:.2f} GFLOP/image x {a.views}, "
                               f"fusion step {b['fusion_step_gflop_per_study']:.2f} GFLOP/study",
                     "target": ">= 20x"})
    return rows


if __name__ == "__main__":
    main()
