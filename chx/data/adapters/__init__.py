"""Dataset adapters: one module per public dataset, each turning its native label files into a
manifest (:mod:`chx.data.manifest`).

Every adapter has the same entry point::

    prepare(sources: list[Path], classes: list[str] | None, images: Path | None = None,
            only_existing: bool = False, **options) -> pl.DataFrame

``classes`` is the target class list (None: the dataset's own classes); a target class the dataset
does not annotate is null, never 0. The returned manifest is validated, with ``split`` null.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import polars as pl

from chx.data.adapters import chexpert, covid, cxr_lt, iu_xray, nih, vindr
from chx.errors import ChxError


@dataclass(frozen=True)
class Adapter:
    """A registered adapter: its ``chx prepare`` name, entry point, one-line ``--help`` summary and
    default ``--classes`` ("cxr-lt-2023", or "data" for the dataset's own classes)."""

    name: str
    prepare: Callable[..., pl.DataFrame]
    summary: str
    default_classes: str = "cxr-lt-2023"


ADAPTERS: dict[str, Adapter] = {a.name: a for a in (
    Adapter("cxr-lt", cxr_lt.prepare,
            "CXR-LT 2023/2024 challenge CSVs (MIMIC-CXR-JPG paths, one 0/1 column per class)"),
    Adapter("nih", nih.prepare,
            "NIH ChestX-ray14 Data_Entry_2017*.csv (14 findings + No Finding)"),
    Adapter("chexpert", chexpert.prepare,
            "CheXpert train.csv / valid.csv (14 labels; --uncertain sets what -1 becomes)"),
    Adapter("vindr", vindr.prepare,
            "VinDr-CXR train.csv, one row per image x reader x box (--min-readers)"),
    Adapter("iu-xray", iu_xray.prepare,
            "IU X-ray indiana_reports.csv + indiana_projections.csv (MeSH report findings)"),
    Adapter("covid", covid.prepare,
            "COVID-19 image data collection metadata.csv (diagnoses; own class list)", "data"),
)}


def get_adapter(name: str) -> Adapter:
    """The adapter called ``name``; :class:`ChxError` listing the known names otherwise."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ChxError(f"unknown dataset {name!r}; known datasets: {', '.join(ADAPTERS)}") from None
