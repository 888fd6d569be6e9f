"""Study probabilities of a joint model from images: validation of `chx train-joint` and
`chx evaluate` of its checkpoint.

The computation is the bundle's (:class:`chx.engine.predictor.Predictor`): THE feature maps
(:func:`chx.engine.inference.feature_maps`: pooling, float16) of the study's views, then the fusion
model with the fusion stage's flip TTA (:func:`chx.engine.inference.fusion_probs`), so what
training validates is what `chx predict` of the exported bundle gives.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from chx.data.study_images import collate_study_images
from chx.engine.inference import feature_maps, fusion_probs
from chx.models.joint import JointModel, to_slots
from chx.workers import batches, worker_init


@torch.no_grad()
def predict_study_images(model: JointModel, dataset: Dataset, *, batch_size: int = 16, workers: int = 2,
                         device: torch.device | str = "cpu", tta: bool = True,
                         desc: str = "predict") -> np.ndarray:
    """Probabilities [S, K] of a :class:`~chx.data.study_images.StudyImageDataset` in its order
    (eval mode: deterministic views); ``tta``: the mean with the flipped images' (maps of the
    horizontally flipped views, as a store made with ``--flip`` holds them)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    # own generator: a loader without one draws its seed from the global RNG, and validation must
    # not move it (a resumed run restores the RNG as it was before the validation)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_study_images, pin_memory=device.type == "cuda",
                        worker_init_fn=worker_init, generator=torch.Generator().manual_seed(0))
    out = []
    with batches(loader) as it:   # the workers end on any exit
        for batch in tqdm(it, desc=desc, unit="batch", leave=False, disable=None):
            x = batch["images"].to(device, non_blocking=True)
            mask, types = batch["view_mask"].to(device), batch["view_types"].to(device)

            def slots(flip: bool) -> torch.Tensor:
                return to_slots(feature_maps(model.image, x, model.pool, flip=flip).float(), mask)
            out.append(fusion_probs(model.fusion, slots(False), mask, types,
                                    slots(True) if tta else None).cpu())
    model.train(was_training)
    k = model.fusion.config["num_classes"]
    return torch.cat(out).numpy() if out else np.zeros((0, k), np.float32)
