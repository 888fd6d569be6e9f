"""Patient-level train/val/test splits that keep rare classes in every split.

All images of a subject (patient) go to one split, so follow-ups never leak between training and
validation (the reference code split by image). Subjects are assigned by iterative stratification
(Sechidis et al. 2011) at the subject level: the rarest class is placed first, each of its subjects
going to the split that most lacks that class relative to its target share, so a class with at
least as many positive subjects as splits appears in each split. Deterministic for a given seed.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from chx.data.manifest import class_columns
from chx.errors import ChxError


def assign_splits(df: pl.DataFrame, val_fraction: float = 0.1, test_fraction: float = 0.0,
                  seed: int = 0) -> pl.DataFrame:
    """Return ``df`` with its ``split`` column set to train/val/test by subject.

    Fractions are of subjects, before stratification shifts them by a few subjects.
    """
    for name, value in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ChxError(f"{name} {value} is out of range; use a fraction in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise ChxError(f"--val-fraction {val_fraction} + --test-fraction {test_fraction} leaves no "
                       f"training data; keep their sum below 1")
    names = ["train", "val", "test"]
    shares = np.array([1.0 - val_fraction - test_fraction, val_fraction, test_fraction])

    classes = class_columns(df)
    # One row per subject: positive for a class when any of its images is (soft labels >= 0.5).
    per_subject = (df.select(["subject_id", *classes])
                   .group_by("subject_id")
                   .agg([(pl.col(c) >= 0.5).any().fill_null(False).alias(c) for c in classes])
                   .sort("subject_id"))
    subjects = per_subject["subject_id"].to_numpy()
    n_subj = len(subjects)
    pos = per_subject.select(classes).to_numpy().astype(bool) if classes else np.zeros((n_subj, 0), bool)

    rng = np.random.default_rng(seed)
    order = rng.permutation(n_subj)  # random tie-breaking, fixed by the seed
    pos = pos[order]
    subjects = subjects[order]

    want_subjects = shares * n_subj                    # subjects each split still wants
    want_class = shares[:, None] * pos.sum(0)[None]    # [3, K] positives each split still wants
    assigned = np.full(n_subj, -1)
    remaining = pos.copy()
    active = shares > 0

    # Rarest class first: place its unassigned subjects where that class is most lacking.
    for _ in range(pos.shape[1]):
        counts = remaining[assigned < 0].sum(0)
        if counts.max(initial=0) == 0:
            break
        counts = np.where(counts == 0, np.iinfo(np.int64).max, counts)
        k = int(np.argmin(counts))
        for i in np.flatnonzero(remaining[:, k] & (assigned < 0)):
            need = np.where(active, want_class[:, k], -np.inf)
            best = np.flatnonzero(need == need.max())
            if len(best) > 1:  # tie: the split that wants the most subjects
                best = best[np.argmax(want_subjects[best])]
            else:
                best = best[0]
            assigned[i] = best
            want_class[best] -= pos[i]
            want_subjects[best] -= 1
        remaining[:, k] = False

    # Subjects without positives fill the remaining quotas.
    for i in np.flatnonzero(assigned < 0):
        need = np.where(active, want_subjects, -np.inf)
        best = int(np.argmax(need))
        assigned[i] = best
        want_subjects[best] -= 1

    mapping = pl.DataFrame({"subject_id": subjects,
                            "__split": [names[a] for a in assigned]})
    out = (df.drop("split")
           .join(mapping, on="subject_id", how="left", maintain_order="left")
           .rename({"__split": "split"}))
    return out.select(df.columns)
