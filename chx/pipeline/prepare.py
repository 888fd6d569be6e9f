"""`chx prepare`: a dataset's native label files -> one manifest (optionally split by patient)."""

from __future__ import annotations

from pathlib import Path

from chx.data.adapters import get_adapter
from chx.data.classes import resolve_classes
from chx.data.manifest import summarize, validate, write_manifest
from chx.data.splits import assign_splits


def prepare(dataset: str, sources: list[Path], out: Path, *, classes: str | None = None,
            images: Path | None = None, only_existing: bool = False,
            val_fraction: float = 0.0, test_fraction: float = 0.0, seed: int = 0,
            options: dict | None = None) -> dict:
    """Build, validate and atomically write the manifest; return its summary counts."""
    adapter = get_adapter(dataset)
    target = resolve_classes(classes, default=adapter.default_classes)
    df = adapter.prepare(list(sources), target, images=images, only_existing=only_existing,
                         **(options or {}))
    if val_fraction > 0 or test_fraction > 0:
        df = assign_splits(df, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    df = validate(df, source=f"prepared {dataset} manifest")
    write_manifest(df, out)
    return summarize(df)
