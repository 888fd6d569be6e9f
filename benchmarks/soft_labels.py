"""How the two soft-label formulas of the weighted ASL fit a pseudo label (issue 14).

    .venv/bin/python benchmarks/soft_labels.py [--prior 0.05] [--labels 0.1 0.9]

For one class with the given prior, finds by a 1-D search over the logit the probability p that
minimises ``chx.losses.weighted_asl`` for a soft label y, under ``soft_targets="expected"`` and
``"reference"``, and prints a Markdown table. A loss that is minimised at p = y is calibrated; the
reference formula pulls low labels down and high labels up (it sharpens pseudo labels). Runs in
about a second on a CPU.
"""

from __future__ import annotations

import argparse

import torch

from chx.losses import SOFT_TARGETS, weighted_asl

LOGIT_RANGE = 14.0    # searched logits: [-14, 14], i.e. p in [8e-7, 1 - 8e-7]
COARSE_STEP = 0.01
FINE_STEP = 1e-4
# float32 sigmoid saturates near the range's ends and the loss turns flat there: a minimum this
# close to an end means "still falling at the end", i.e. p -> 0 or p -> 1
EDGE = 0.1


def loss_curve(logits: torch.Tensor, y: float, prior: float, soft_targets: str) -> torch.Tensor:
    """The loss of one element [N] at each logit [N] (label y, class prior ``prior``)."""
    return torch.stack([weighted_asl(z.view(1, 1), torch.tensor([[y]]), torch.tensor([prior]),
                                     soft_targets=soft_targets) for z in logits])


def best_probability(y: float, prior: float, soft_targets: str) -> tuple[float, bool]:
    """(p that minimises the loss, whether it lies at the edge of the searched range): a coarse
    grid over the logit, then a fine grid around its best point."""
    coarse = torch.arange(-LOGIT_RANGE, LOGIT_RANGE + COARSE_STEP / 2, COARSE_STEP, dtype=torch.float64)
    z0 = coarse[loss_curve(coarse.float(), y, prior, soft_targets).argmin()].item()
    fine = torch.arange(z0 - COARSE_STEP, z0 + COARSE_STEP + FINE_STEP / 2, FINE_STEP, dtype=torch.float64)
    fine = fine.clamp(-LOGIT_RANGE, LOGIT_RANGE)
    z = fine[loss_curve(fine.float(), y, prior, soft_targets).argmin()].item()
    return torch.sigmoid(torch.tensor(z)).item(), abs(z) >= LOGIT_RANGE - EDGE


def cell(p: float, at_edge: bool) -> str:
    if not at_edge:
        return f"{p:.3f}"
    return f"-> {round(p)} (search edge, p = {p:.6f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", type=float, default=0.05, help="class prior p_c")
    parser.add_argument("--labels", type=float, nargs="+", default=[0.1, 0.9], help="soft labels y")
    args = parser.parse_args()
    print(f"Probability p that minimises the weighted ASL for a soft label y (class prior "
          f"{args.prior}, gamma+ 1, gamma- 4, clip 0.05):\n")
    print("| soft label y | " + " | ".join(f"`{m}`" for m in SOFT_TARGETS) + " |")
    print("|---" * (len(SOFT_TARGETS) + 1) + "|")
    for y in args.labels:
        print(f"| {y:g} | " + " | ".join(cell(*best_probability(y, args.prior, m))
                                          for m in SOFT_TARGETS) + " |")


if __name__ == "__main__":
    main()
