"""`chx prepare`: a dataset's native label files -> one manifest (optionally split by patient)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from chx.data.adapters import ADAPTERS, get_adapter, merged_options, refuse_foreign_options
from chx.data.classes import NAMED_CLASS_LISTS, frequency_groups, resolve_classes
from chx.data.manifest import images_root, summarize, validate, write_manifest
from chx.data.splits import assign_splits
from chx.data.views import VIEWS
from chx.errors import ChxError


def prepare(dataset: str, sources: list[Path], out: Path, *, classes: str | None = None,
            images: Path | None = None, only_existing: bool = False,
            val_fraction: float = 0.0, test_fraction: float = 0.0, seed: int = 0,
            options: dict | None = None) -> dict:
    """Build, validate and atomically write the manifest; return its summary counts.

    The summary is :func:`chx.data.manifest.summarize`'s, plus ``views`` (images per canonical
    view, in :data:`~chx.data.views.VIEWS` order), ``groups`` (head / medium / tail classes by
    prevalence among the training images, those of split train or unassigned:
    :func:`~chx.data.classes.frequency_groups`) and ``notes`` (lines for the user: rows dropped and
    why, views that became OTHER, images found under ``images``, a source split replaced) and
    ``unannotated`` (the classes no row annotates: always null, so no model can learn them).
    A Parquet manifest records ``images`` as its images root (:func:`chx.data.manifest.images_root`).
    """
    adapter = get_adapter(dataset)
    target = resolve_classes(classes, default=adapter.default_classes)
    notes: list[str] = []
    df = adapter.prepare(list(sources), target, images=images, only_existing=only_existing,
                         notes=notes, **(options or {}))
    if val_fraction > 0 or test_fraction > 0:
        if df["split"].is_not_null().any():
            notes.append("split: --val-fraction/--test-fraction replace the split the source files gave")
        df = assign_splits(df, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    df = validate(df, source=f"prepared {dataset} manifest")
    write_manifest(df, out, images_root=images)
    summary = summarize(df)
    summary["unannotated"] = [c for c, n in summary["annotated"].items() if n == 0]
    counts = dict(df["view"].value_counts().iter_rows())
    summary["views"] = {v: counts[v] for v in VIEWS if v in counts}
    train = summarize(df.filter(pl.col("split").is_null() | (pl.col("split") == "train")))
    summary["groups"] = frequency_groups(train["positives"], train["annotated"])
    summary["notes"] = notes
    return summary


# What the command line shows of the adapters (chx.data.adapters declares them; the CLI lists them).

def adapter_listing() -> str:
    """One line per adapter: its name and summary (for `chx prepare --help`)."""
    return "\n".join(f"      {name:<12} {a.summary}" for name, a in ADAPTERS.items())


def adapter_options() -> list:
    """Every adapter option once, with the adapters that take it (:func:`merged_options`)."""
    return merged_options()


def classes_help() -> str:
    """The help of `chx prepare --classes`: the named lists and each adapter's default."""
    others = {}
    for name, a in ADAPTERS.items():
        if a.default_classes != "data":
            others.setdefault(a.default_classes, []).append(name)
    defaults = "".join(f"; {d} for {', '.join(names)}" for d, names in others.items())
    return (f"Target class list: a named list ({', '.join(NAMED_CLASS_LISTS)}), 'data' (the dataset's own "
            f"classes), a comma-separated list, or a file with one class per line.  "
            f"[default: data{defaults}]")


def check_adapter(dataset: str, given: list[str]):
    """The adapter ``dataset`` (one line when unknown), refusing options the user gave that it does
    not take (``given``: their names)."""
    adapter = get_adapter(dataset)
    refuse_foreign_options(dataset, given)
    return adapter


def images_of(manifest, images, *, required: bool = True):
    """``images`` (--images) when given, else the images root ``manifest`` records (`chx prepare
    --images`; one line when it records none or it no longer exists). ``required=False``: None when
    it records none or it no longer exists (``--images-cache`` reads no file: a manifest and its
    cache copied to a machine without the images)."""
    if manifest is None or images:
        return images
    if not required:
        try:
            return images_root(manifest)
        except ChxError:
            return images
    return images_root(manifest)
