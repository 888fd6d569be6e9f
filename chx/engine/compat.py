"""Checks that two artifacts belong together: the one place that compares class lists and
backbone fingerprints, so every command says the same thing when they do not."""

from __future__ import annotations

from typing import Sequence

from chx.errors import ChxError
from chx.store import fingerprint_diff, open_store


def first_difference(a: Sequence[str], b: Sequence[str]) -> str:
    """Where two class lists first differ, for a message."""
    a, b = list(a), list(b)
    pos = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    x = repr(a[pos]) if pos < len(a) else "<end>"
    y = repr(b[pos]) if pos < len(b) else "<end>"
    return f"{len(a)} vs {len(b)} classes, first difference at position {pos + 1}: {x} vs {y}"


def require_same_classes(have: Sequence[str], want: Sequence[str], have_name: str, want_name: str,
                         fix: str = "prepare the manifest onto the checkpoint's classes "
                                    "(`chx prepare ... --classes`)") -> None:
    """ChxError when ``have`` (e.g. a manifest's classes) is not exactly ``want`` (a checkpoint's):
    "<want_name> was trained on other classes than <have_name> (...)"."""
    if list(have) != list(want):
        raise ChxError(f"{want_name} was trained on other classes than {have_name} "
                       f"({first_difference(want, have)}); {fix}")


def require_same_backbone(store_fingerprint: dict | None, backbone_sha256: str, store_name: str,
                          backbone_name: str) -> None:
    """ChxError when a store (or a fusion model trained on one) was made by another backbone."""
    made_by = (store_fingerprint or {}).get("checkpoint_sha256")
    if made_by is not None and made_by != backbone_sha256:
        raise ChxError(f"{store_name} was made with the features of another backbone than "
                       f"{backbone_name} (weights hash {made_by[:12]} vs {backbone_sha256[:12]}); use "
                       f"the backbone its store was extracted with, or extract a new store")


def check_fusion_store(ckpt: dict, checkpoint, store) -> list[str]:
    """A fusion checkpoint is scored only on a complete store made like the one it was trained on
    (same classes, same backbone and preprocessing: the fingerprint); returns the store's splits."""
    with open_store(store) as s:
        s.require_complete()    # scoring an incomplete store would read maps that are not there
        require_same_classes(s.class_names, ckpt["class_names"], f"store {store}", str(checkpoint),
                             fix="evaluate on the store the fusion model was trained on (or one "
                                 "extracted with the same classes)")
        trained_on = ckpt.get("store_fingerprint")
        if trained_on:
            diff = fingerprint_diff(trained_on, s.fingerprint)
            if diff:
                raise ChxError(f"store {store} was not made like the store {checkpoint} was trained on "
                               f"({'; '.join(diff)}); evaluate on features of the same backbone and "
                               f"options")
        return sorted(set(s.splits) - {""})
