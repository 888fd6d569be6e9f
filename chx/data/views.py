"""The one place that knows views: canonical names, frontal/lateral groups, type ids, the
deterministic order, and the map from native view strings (dataset tables, DICOM ViewPosition).

Every stage uses this module: ``chx prepare`` (adapters), the manifest validator, the feature
store, the fusion model's view types, the study dataset and ``chx predict`` / ``chx explain``
(DICOM headers, file names: :func:`file_name_view`), so a view string means the same thing in
training and in serving.

Canonical views: PA, AP, LATERAL, LL, OTHER. Native strings are compared upper-cased, with ``_``
and ``-`` read as spaces and runs of spaces collapsed; anything not in :data:`NATIVE_VIEWS` is
OTHER: blank, '?', oblique (LAO, RAO, LLO, RLO), decubitus (LLD, RLD, AP LLD, LT DECUB),
SWIMMERS, and AP AXIAL (an angled lordotic view, not a standard frontal).
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

VIEWS: tuple[str, ...] = ("PA", "AP", "LATERAL", "LL", "OTHER")
FRONTAL_VIEWS: tuple[str, ...] = ("PA", "AP")
LATERAL_VIEWS: tuple[str, ...] = ("LATERAL", "LL")

# View types: what the fusion model's view embedding and experts see.
VIEW_TYPE_NAMES: tuple[str, ...] = ("frontal", "lateral", "other")
N_VIEW_TYPES = len(VIEW_TYPE_NAMES)
# Type ids (ints, the model's inputs; not to be confused with the view names LATERAL and OTHER).
FRONTAL_TYPE, LATERAL_TYPE, OTHER_TYPE = 0, 1, 2

# Deterministic order of a study's views at evaluation and prediction: PA, AP, LATERAL, LL, OTHER.
VIEW_RANK: dict[str, int] = {v: i for i, v in enumerate(VIEWS)}

# Native view string (normalised by :func:`view_key`) -> canonical view.
NATIVE_VIEWS: dict[str, str] = {
    # frontal, posteroanterior
    "PA": "PA", "POSTEROANTERIOR": "PA", "PA ERECT": "PA",
    # frontal, anteroposterior (portable, supine, erect; PadChest's AP_horizontal is a supine AP)
    "AP": "AP", "ANTEROPOSTERIOR": "AP", "AP SUPINE": "AP", "AP ERECT": "AP", "AP UPRIGHT": "AP",
    "AP HORIZONTAL": "AP", "AP PORTABLE": "AP",
    # lateral (DICOM ViewPosition: LL = left lateral, RL = right lateral; L/LAT in PadChest, IU, covid)
    "L": "LATERAL", "LAT": "LATERAL", "LATERAL": "LATERAL", "XTABLE LATERAL": "LATERAL",
    "RL": "LATERAL", "RIGHT LATERAL": "LATERAL",
    "LL": "LL", "LEFT LATERAL": "LL",
}

_SPACES = re.compile(r"[\s_\-]+")


def view_key(native) -> str:
    """A native view string as :data:`NATIVE_VIEWS` spells it: upper case, ``_``/``-`` as spaces,
    runs of spaces collapsed, stripped; None -> ''."""
    if native is None:
        return ""
    return _SPACES.sub(" ", str(native)).strip().upper()


def canonical_view(native) -> str:
    """A native view string (a table's column, a DICOM ViewPosition) -> PA, AP, LATERAL, LL or OTHER."""
    return NATIVE_VIEWS.get(view_key(native), "OTHER")


# File-name rule (`chx predict` / `chx explain` on plain image files): whole words of the file's
# stem (runs of letters between non-letters, any case) that name a view. FRONTAL (PA or AP, not
# said which) reads as PA: the same view type (frontal) and the frontal-first order. Single letters
# (L) and RL are not read: too common in names for other reasons.
FILE_NAME_VIEWS: dict[str, str] = {
    **{token: canonical_view(token) for token in ("PA", "AP", "LATERAL", "LAT", "LL", "POSTEROANTERIOR",
                                                  "ANTEROPOSTERIOR")},
    "FRONTAL": "PA",
}
_LETTER_RUNS = re.compile(r"[A-Za-z]+")


def file_name_view(name) -> str | None:
    """The view a file's name states, or None: the words of its stem (letter runs between
    non-letters, case-insensitive) looked up in :data:`FILE_NAME_VIEWS`; words naming two different
    views (``pa_and_lat``) state none. ``view3_lateral.jpg`` -> LATERAL, ``s1-PA.png`` -> PA,
    ``view1_frontal.jpg`` -> PA, ``000001-12.png`` / ``chestPA.png`` / ``capture.png`` -> None."""
    from pathlib import PurePath

    stem = PurePath(str(name)).stem
    found = {FILE_NAME_VIEWS[w.upper()] for w in _LETTER_RUNS.findall(stem) if w.upper() in FILE_NAME_VIEWS}
    return found.pop() if len(found) == 1 else None


def canonical_view_expr(expr):
    """:func:`canonical_view` on a polars string column (whole column at once)."""
    import polars as pl

    key = (expr.cast(pl.Utf8).str.replace_all(r"[\s_\-]+", " ").str.strip_chars().str.to_uppercase())
    return key.replace_strict(NATIVE_VIEWS, default="OTHER", return_dtype=pl.Utf8).fill_null("OTHER")


def view_type(view: str) -> int:
    """Canonical view -> type id: 0 frontal (PA, AP), 1 lateral (LATERAL, LL), 2 other."""
    if view in FRONTAL_VIEWS:
        return FRONTAL_TYPE
    if view in LATERAL_VIEWS:
        return LATERAL_TYPE
    return OTHER_TYPE


def view_types(views: Iterable[str]) -> list[int]:
    return [view_type(v) for v in views]


def deterministic_view_order(views: Sequence[str], image_ids: Sequence[str]) -> list[int]:
    """Indices of a study's views: PA, AP, LATERAL, LL, OTHER; ties by image id."""
    return sorted(range(len(views)), key=lambda i: (VIEW_RANK.get(views[i], len(VIEWS)), str(image_ids[i])))
