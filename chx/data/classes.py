"""Class lists and class-name harmonisation.

Class lists are data: the manifest's columns are the truth. The lists here are only the defaults a
user can name on the command line (``--classes cxr-lt-2023``).
"""

from __future__ import annotations

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

NAMED_CLASS_LISTS: dict[str, tuple[str, ...]] = {"cxr-lt-2023": CXR_LT_2023}

# Sentinel for "take the class list from the dataset itself".
FROM_DATA = "data"


def class_key(name: str) -> str:
    """Normalised form used to match class names across datasets (case, '_' and spaces)."""
    return " ".join(name.replace("_", " ").split()).casefold()


def resolve_classes(spec: str | None, default: str = "cxr-lt-2023") -> list[str] | None:
    """Turn a ``--classes`` value into a class list.

    ``spec`` is a named list (``cxr-lt-2023``), ``data`` (returns None: the adapter takes the
    dataset's own classes), a comma-separated list, or a path to a text file with one class per line.
    """
    spec = default if spec is None else spec
    if spec == FROM_DATA:
        return None
    if spec in NAMED_CLASS_LISTS:
        return list(NAMED_CLASS_LISTS[spec])
    path = Path(spec)
    if path.suffix in {".txt", ".csv"} or path.is_file():
        if not path.is_file():
            raise ChxError(f"--classes: file {spec} does not exist; give a file with one class per line, "
                           f"a comma-separated list, 'data' or one of {sorted(NAMED_CLASS_LISTS)}")
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
