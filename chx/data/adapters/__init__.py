"""Dataset adapters: one module per public dataset (and ``table`` for any CSV/Parquet), each
turning its native label files into a manifest (:mod:`chx.data.manifest`).

Every adapter has the same entry point::

    prepare(sources: list[Path], classes: list[str] | None, images: Path | None = None,
            only_existing: bool = False, *, notes: list[str] | None = None,
            **options) -> pl.DataFrame

``classes`` is the target class list (None: the dataset's own classes); a target class the dataset
does not annotate is null, never 0. ``notes`` collects one line per thing the user should know
(rows dropped and why, views that became OTHER, images found under ``images``). ``options`` are
the adapter's own, declared in its module's ``OPTIONS`` (:class:`AdapterOption`), which is how
`chx prepare` offers them. The returned manifest is validated, with ``split`` null unless the
dataset ships an official split.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import polars as pl

from chx.data.adapters import (brax, chexpert, covid, cxr_lt, cxr_lt_2026, iu_xray, mimic_cxr, nih,
                               padchest, table, vindr)
from chx.data.adapters.common import AdapterOption
from chx.data.classes import FROM_DATA
from chx.errors import ChxError

__all__ = ["ADAPTERS", "Adapter", "AdapterOption", "get_adapter", "merged_options",
           "refuse_foreign_options"]


@dataclass(frozen=True)
class Adapter:
    """A registered adapter: its ``chx prepare`` name, entry point, one-line ``--help`` summary,
    default ``--classes`` (a named list, or "data" for the dataset's own classes) and the options
    it takes.

    Every adapter defaults to the dataset's own classes ("data"), so a default manifest has no
    class that no row can annotate; only the challenge tables default to their challenge's list
    (cxr-lt: the 26 CXR-LT 2023 classes; cxr-lt-2026: its 30) and mimic-cxr, CXR-LT's source, to
    the CXR-LT 2023 list so that its manifests combine with cxr-lt's (`chx prepare` warns about the
    classes no row annotates)."""

    name: str
    prepare: Callable[..., pl.DataFrame]
    summary: str
    default_classes: str = FROM_DATA
    options: tuple[AdapterOption, ...] = ()


def _adapter(module, summary: str, default_classes: str = FROM_DATA) -> Adapter:
    return Adapter(module.NAME, module.prepare, summary, default_classes, getattr(module, "OPTIONS", ()))


ADAPTERS: dict[str, Adapter] = {a.name: a for a in (
    _adapter(cxr_lt, "CXR-LT 2023/2024 challenge CSVs (MIMIC-CXR-JPG paths, one 0/1 column per class)",
             "cxr-lt-2023"),
    _adapter(nih, "NIH ChestX-ray14 Data_Entry_2017*.csv (14 findings + No Finding)"),
    _adapter(chexpert, "CheXpert train.csv / valid.csv (14 labels; --uncertain sets what -1 becomes)"),
    _adapter(vindr, "VinDr-CXR train.csv, one row per image x reader x box (--min-readers)"),
    _adapter(iu_xray, "IU X-ray indiana_reports.csv + indiana_projections.csv (MeSH report findings)"),
    _adapter(covid, "COVID-19 image data collection metadata.csv (diagnoses; own class list)"),
    _adapter(mimic_cxr, "MIMIC-CXR-JPG -chexpert/-negbio + -metadata (+ -split) CSVs (study labels)",
             "cxr-lt-2023"),
    _adapter(padchest, "PadChest PADCHEST_chest_x_ray_images_labels_160K*.csv (report labels)"),
    _adapter(cxr_lt_2026, "CXR-LT 2026 CSV (PadChest + NIH, 30 classes), optionally with their tables",
             "cxr-lt-2026"),
    _adapter(brax, "BRAX master_spreadsheet_update.csv (14 CheXpert labels; --uncertain)"),
    _adapter(table, "any CSV/Parquet: --path-col, --study-col, ... name its columns"),
)}


def get_adapter(name: str) -> Adapter:
    """The adapter called ``name``; :class:`ChxError` listing the known names otherwise."""
    try:
        return ADAPTERS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(ADAPTERS), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ChxError(f"unknown dataset {name!r}{hint}; known datasets: {', '.join(ADAPTERS)}") from None


def merged_options() -> list[tuple[AdapterOption, list[str]]]:
    """Every adapter option once, with the adapters that take it (registry order). Two adapters
    declaring one option name differently is a programming error (ValueError)."""
    merged: dict[str, tuple[AdapterOption, list[str]]] = {}
    for adapter in ADAPTERS.values():
        for opt in adapter.options:
            seen = merged.setdefault(opt.name, (opt, []))
            if seen[0] != opt:
                raise ValueError(f"adapters {seen[1]} and {adapter.name!r} declare {opt.flag} differently")
            seen[1].append(adapter.name)
    return list(merged.values())


def refuse_foreign_options(dataset: str, given: Iterable[str]) -> None:
    """ChxError (one line) for an option given to an adapter that does not take it, naming the
    adapters that do. ``given``: option names (Python keywords) set by the user."""
    owners = {opt.name: names for opt, names in merged_options()}
    takes = {opt.name for opt in get_adapter(dataset).options}
    for name in given:
        if name not in takes:
            flag = "--" + name.replace("_", "-")
            users = [f"`chx prepare {n}`" for n in owners.get(name, [])]
            where = ", ".join(users[:-1]) + f" and {users[-1]}" if len(users) > 1 else "".join(users)
            raise ChxError(f"{flag} applies only to {where or 'no dataset'}; `chx prepare {dataset}` "
                           f"does not take it")
