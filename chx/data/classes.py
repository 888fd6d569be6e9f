"""Class lists, class-name harmonisation, and head/medium/tail groups by training frequency.

Class lists are data: the manifest's columns are the truth. The lists here are only the defaults a
user can name on the command line (``--classes cxr-lt-2023``).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path

from chx.errors import ChxError

# The 26 CXR-LT 2023 findings, in the challenge CSVs' column order (alphabetical).
CXR_LT_2023: tuple[str, ...] = (
    "Atelectasis",
    "Calcification of the Aorta",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Enlarged Cardiomediastinum",
    "Fibrosis",
    "Fracture",
    "Hernia",
    "Infiltration",
    "Lung Lesion",
    "Lung Opacity",
    "Mass",
    "No Finding",
    "Nodule",
    "Pleural Effusion",
    "Pleural Other",
    "Pleural Thickening",
    "Pneumomediastinum",
    "Pneumonia",
    "Pneumoperitoneum",
    "Pneumothorax",
    "Subcutaneous Emphysema",
    "Support Devices",
    "Tortuous Aorta",
)

# CXR-LT 2024 (Lin et al., MedIA 2025; PhysioNet "CXR-LT" v2.0.0). Task 1: the 40 labelled
# classes of the challenge CSVs (the 26 of 2023 with "Normal" for "No Finding", plus 14 new ones),
# alphabetical as in the CSVs. The five zero-shot classes of task 3 (Bulla, Cardiomyopathy, Hilum,
# Osteopenia, Scoliosis) have no training labels and are not listed. Names as spelt in the
# challenge CSV headers, "Round(ed) Atelectasis" included; checked against several participants'
# public code (no official file is shipped here: credentialed data).
CXR_LT_2024_TASK1: tuple[str, ...] = (
    "Adenopathy", "Atelectasis", "Azygos Lobe", "Calcification of the Aorta", "Cardiomegaly",
    "Clavicle Fracture", "Consolidation", "Edema", "Emphysema", "Enlarged Cardiomediastinum",
    "Fibrosis", "Fissure", "Fracture", "Granuloma", "Hernia", "Hydropneumothorax", "Infarction",
    "Infiltration", "Kyphosis", "Lobar Atelectasis", "Lung Lesion", "Lung Opacity", "Mass", "Nodule",
    "Normal", "Pleural Effusion", "Pleural Other", "Pleural Thickening", "Pneumomediastinum",
    "Pneumonia", "Pneumoperitoneum", "Pneumothorax", "Pulmonary Embolism", "Pulmonary Hypertension",
    "Rib Fracture", "Round(ed) Atelectasis", "Subcutaneous Emphysema", "Support Devices",
    "Tortuous Aorta", "Tuberculosis",
)
# CXR-LT 2024 task 2 (the manually annotated "gold standard" test subset): the 26 classes of 2023,
# with "Normal" in the place of "No Finding".
CXR_LT_2024_TASK2: tuple[str, ...] = tuple("Normal" if c == "No Finding" else c for c in CXR_LT_2023)
# CXR-LT 2026 task 1 (Dong et al., ISBI 2026; PadChest + NIH images): 30 classes, in the column order
# of the challenge's training CSV (CXRLT_2026_training.csv, roughly by frequency), with its mixed
# spelling (PadChest's own lower-case names, e.g. "pneumoperitoneo", beside CXR-LT names). Not
# verified against an official file: taken from participants' public code (the challenge data is
# not public); the adapter therefore matches columns by class key and names any it does not know.
CXR_LT_2026: tuple[str, ...] = (
    "Normal", "aortic elongation", "cardiomegaly", "pleural effusion", "Nodule", "atelectasis",
    "pleural thickening", "aortic atheromatosis", "Support Devices", "alveolar pattern", "fracture",
    "Hernia", "Emphysema", "azygos lobe", "Hydropneumothorax", "Kyphosis", "Mass", "Pneumothorax",
    "Subcutaneous Emphysema", "pneumoperitoneo", "vascular hilar enlargement",
    "vertebral degenerative changes", "hyperinflated lung", "interstitial pattern",
    "central venous catheter", "hypoexpansion", "bronchiectasis", "hemidiaphragm elevation",
    "sternotomy", "calcified densities",
)

NAMED_CLASS_LISTS: dict[str, tuple[str, ...]] = {
    "cxr-lt-2023": CXR_LT_2023,
    "cxr-lt-2024-task1": CXR_LT_2024_TASK1,
    "cxr-lt-2024-task2": CXR_LT_2024_TASK2,
    "cxr-lt-2026": CXR_LT_2026,
}

# Sentinel for "take the class list from the dataset itself".
FROM_DATA = "data"


def class_key(name: str) -> str:
    """Normalised form used to match class names across datasets (case, '_' and spaces)."""
    return " ".join(name.replace("_", " ").split()).casefold()


def resolve_classes(spec: str | None, default: str = "cxr-lt-2023") -> list[str] | None:
    """Turn a ``--classes`` value into a class list.

    ``spec`` is a named list (:data:`NAMED_CLASS_LISTS`), ``data`` (returns None: the adapter takes the
    dataset's own classes), a comma-separated list, or a path to a text file with one class per line.
    """
    spec = default if spec is None else spec
    if spec == FROM_DATA:
        return None
    if spec in NAMED_CLASS_LISTS:
        return list(NAMED_CLASS_LISTS[spec])
    close = difflib.get_close_matches(spec, list(NAMED_CLASS_LISTS), n=1, cutoff=0.8)
    if close and "," not in spec:
        raise ChxError(f"--classes: {spec!r} is not a named class list; did you mean {close[0]!r}? "
                       f"(named lists: {', '.join(NAMED_CLASS_LISTS)})")
    path = Path(spec)
    if path.suffix in {".txt", ".csv"} or path.is_file():
        if not path.is_file():
            raise ChxError(f"--classes: file {spec} does not exist; give a file with one class per line, "
                           f"a comma-separated list, 'data' or one of {', '.join(NAMED_CLASS_LISTS)}")
        names = [line.strip() for line in path.read_text().splitlines()]
    else:
        names = [part.strip() for part in spec.split(",")]
    names = [n for n in names if n]
    if not names:
        raise ChxError(f"--classes: {spec!r} names no class")
    keys = [class_key(n) for n in names]
    dup = next((n for n, k in zip(names, keys) if keys.count(k) > 1), None)
    if dup is not None:
        raise ChxError(f"--classes: class {dup!r} is listed twice")
    return names


# Head / medium / tail by training prevalence, the CXR-LT 2024 convention (head above 10 % of the
# training images, tail below 1 %), as participants' public code applies it; it fits any class list,
# where 2023's 8 / 10 / 8 split fits only its 26 classes.
HEAD_MIN_PREVALENCE = 0.10
TAIL_MAX_PREVALENCE = 0.01


def prevalence_group(p: float, head_min: float = HEAD_MIN_PREVALENCE,
                     tail_max: float = TAIL_MAX_PREVALENCE) -> str:
    """THE head / medium / tail rule of chx (prepare's summary, evaluate's and compare's default
    ``--groups prevalence``, training validation): head above ``head_min`` training prevalence,
    tail below ``tail_max``, medium in between (both bounds included)."""
    return "head" if p > head_min else "tail" if p < tail_max else "medium"


def frequency_groups(positives: Mapping[str, int], annotated: Mapping[str, int], *,
                     head_min: float = HEAD_MIN_PREVALENCE,
                     tail_max: float = TAIL_MAX_PREVALENCE) -> dict[str, list[str]]:
    """Head / medium / tail class names by training prevalence = positives / annotated images.

    ``positives`` and ``annotated``: per class, training images labelled 1 and labelled at all.
    Head: prevalence > ``head_min``; tail: < ``tail_max``; medium: the rest. A class with no
    annotated image has no prevalence and is in no group. Each group keeps the input order.
    """
    groups: dict[str, list[str]] = {"head": [], "medium": [], "tail": []}
    for name, n in annotated.items():
        if n:
            p = positives.get(name, 0) / n
            groups[prevalence_group(p, head_min, tail_max)].append(name)
    return groups
