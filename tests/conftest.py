"""Shared fixtures.

Real test data lives in ../shared/data relative to the project root. A user's fresh clone has no
../shared: tests that need it skip with a reason, except under CI=true, where its absence fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_configure(config):
    """Under pytest-xdist (`-n 2`) each worker runs torch on one thread, and so do the chx
    processes the tests start: two workers with two threads each on two cores would fight."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)

from helpers import shared_path


@pytest.fixture
def shared_data() -> Path:
    return shared_path()


@pytest.fixture(scope="session")
def nih_manifest(tmp_path_factory) -> Path:
    """The 1,000 real NIH 64 px images prepared onto the 26 CXR-LT classes, split by patient."""
    images = shared_path("nih-64px", "images")
    table = shared_path("metadata", "nih_data_entry_2017_v2020.csv.gz")
    out = tmp_path_factory.mktemp("nih") / "nih.parquet"
    from chx.pipeline.prepare import prepare

    prepare("nih", [table], out, classes="cxr-lt-2023", images=images, only_existing=True,
            val_fraction=0.2, seed=0)
    return out


@pytest.fixture(scope="session")
def covid_manifest(tmp_path_factory) -> Path:
    """The 391 distinct real covid-cxr images, own class list, split by patient."""
    images = shared_path("covid-cxr", "images")
    table = shared_path("covid-cxr", "metadata.csv")
    out = tmp_path_factory.mktemp("covid") / "covid.parquet"
    from chx.pipeline.prepare import prepare

    prepare("covid", [table], out, images=images, val_fraction=0.25, seed=0)
    return out


@pytest.fixture(scope="session")
def covid_backbone(tmp_path_factory, covid_manifest) -> Path:
    """A tiny stage-1 checkpoint (test_convnext, 64 px, 2 steps) trained on the covid images."""
    from chx.options import BackboneOptions, TrainConfig
    from chx.pipeline.train_backbone import train_backbone

    out = tmp_path_factory.mktemp("covid-backbone")
    opts = BackboneOptions(model="test_convnext", size=64, pretrained=False)
    cfg = TrainConfig(epochs=1, max_steps=2, batch_size=8, workers=0, device="cpu")
    train_backbone([covid_manifest], [shared_path("covid-cxr", "images")], out, opts, cfg)
    return out / "best.pt"


@pytest.fixture(scope="session")
def covid_models(tmp_path_factory, covid_backbone, covid_manifest):
    """A store (with flipped maps) extracted by `covid_backbone`, and a tiny fusion model on it."""
    from chx.pipeline.extract import extract_features
    from chx.options import FusionOptions, TrainConfig
    from chx.pipeline.train_fusion import train_fusion

    tmp = tmp_path_factory.mktemp("covid-models")
    store = str(tmp / "f.zarr")
    extract_features(covid_backbone, covid_manifest, shared_path("covid-cxr", "images"), store, workers=0,
                     flip=True, echo=lambda *a: None)
    train_fusion(store, tmp / "fusion", FusionOptions(dim=32, heads=4, ffn_dim=64),
                 TrainConfig(epochs=1, workers=0, device="cpu"))
    return {"store": store, "fusion": tmp / "fusion" / "best.pt", "tmp": tmp}


@pytest.fixture(scope="session")
def covid_reference_store(tmp_path_factory, covid_backbone, covid_manifest) -> Path:
    """An uninterrupted extraction of the covid images by `covid_backbone` in shards of 8 images:
    what the interrupted, sharded and disk-full extractions must equal."""
    from chx.pipeline.extract import extract_features

    store = tmp_path_factory.mktemp("covid-ref") / "ref.zarr"
    extract_features(covid_backbone, covid_manifest, shared_path("covid-cxr", "images"), str(store), workers=0,
                     batch_size=8, shard_images=8, echo=lambda *a: None)
    return store

