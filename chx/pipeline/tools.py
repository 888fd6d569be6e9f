"""The commands beside the stages: `chx store info` / `chx store verify`, `chx import-reference`,
`chx make-demo-data` (and the demo's visibility groups). The CLI reaches data, models and store
only through chx.pipeline; these are the thin entries for the commands that run no stage.

Imports are inside the functions, so `chx store info` loads no torch and `chx --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

from chx.errors import ChxError


def store_info(path: str) -> dict:
    """The figures of the feature store at ``path`` (:meth:`chx.store.FeatureStore.info`)."""
    from chx.store import open_store

    with open_store(path) as s:
        return s.info()


def verify_store(path: str):
    """Every shard of the store at ``path`` read and checked (:meth:`chx.store.FeatureStore.verify`)."""
    from chx.store import open_store

    with open_store(path) as s:
        return s.verify()


def import_reference(ckpt: Path, kind: str, classes: str, backbone_name: str, out: Path) -> dict:
    """Convert a CheXFusion reference checkpoint into a chx checkpoint at ``out``; returns
    ``{"classes": n, "dropped": {what: why}}``."""
    from chx.data.classes import resolve_classes
    from chx.models import save_checkpoint
    from chx.models.reference import convert_reference_checkpoint

    names = resolve_classes(classes, default="cxr-lt-2023")
    if not names:
        raise ChxError("--classes: give the reference model's class list (a named list, names, or a file)")
    converted = convert_reference_checkpoint(ckpt, kind, names, backbone_name=backbone_name)
    save_checkpoint(converted, out)
    return {"classes": len(names), "dropped": converted.get("imported_from", {}).get("dropped") or {}}


def make_demo_data(out: Path, *, studies: int, seed: int, size: int, views: int) -> Path:
    """Write the synthetic multi-view dataset into ``out``; returns its manifest."""
    from chx.data.demo import make_demo_data as write

    return write(out, studies=studies, seed=seed, size=size, max_views=views)


def demo_visibility() -> dict[str, str]:
    """Finding -> where the synthetic data draws its sign (both, frontal, lateral)."""
    from chx.data.demo import visibility

    return visibility()

