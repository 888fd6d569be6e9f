"""Each command's inputs and outputs (files, folders, --overwrite) and the options of the commands that
run no training: prepare, evaluate, compare, export, ensemble, predict, explain, cache-images, ..."""

from __future__ import annotations

from dataclasses import Field, dataclass
from pathlib import Path

from chx.options._declare import (DEFAULT_BACKBONE, RECORDED_ROOT, RESIZE_MODES, option, _batch_size,
                                  _bootstrap, _device, _groups, _images, _out, _overwrite, _required,
                                  _run_folder, _workers)
from chx.options.stages import DemoConfig, _shard


@dataclass
class PrepareOptions:
    """Options of `chx prepare` (besides --classes and the adapters' own: chx.data.adapters)."""

    out: Path | None = _out(None, "Manifest to write (.parquet, or .csv).  [default: DATASET.parquet]",
                            path="file")
    images: Path | None = option(None, "Images root: find each image under it and store its path relative to "
                                       "it; says how many were found, and fails when none is.",
                                 path="dir", exists=True)
    only_existing: bool = option(False, "With --images: drop rows whose image file is not under the root.",
                                 switch=False)
    val_fraction: float = option(0.0, "Fraction of patients for validation (split by patient, rare classes "
                                      "kept in each split).")
    test_fraction: float = option(0.0, "Fraction of patients for test.")
    seed: int = option(0, "Seed of the split.")
    overwrite: bool = _overwrite("Replace an existing -o manifest (checkpoints and stores made from it record "
                                 "its hash).")


@dataclass
class RunControl:
    """How a train-* command treats its run folder."""

    resume: bool = option(False, "Continue the run in --out from its last.pt, exactly: `--resume -o RUN` reads "
                                 "the run's options from RUN/config.json (options given must be the run's).",
                          switch=False)
    overwrite: bool = _overwrite("Start again in an --out that already holds a run.")


@dataclass
class TrainBackboneInputs:
    """The data and run folder of `chx train-backbone`."""

    manifests: tuple[Path, ...] = option(help="Manifest(s); repeat to train on their union (e.g. with a "
                                              "pseudo-labelled one). Rows with split 'train' or no split "
                                              "train; split 'val' validates.",
                                         flag="--manifest", multiple=True, required=True, path="any")
    images: tuple[Path, ...] = option(help="Images root; once for all manifests or once per --manifest.  "
                                           "[default: the root `chx prepare --images` recorded in each "
                                           "manifest]", multiple=True, path="any")
    out: Path = _run_folder("runs/backbone")


@dataclass
class TrainFusionInputs:
    """The store and run folder of `chx train-fusion`."""

    store: str = option(None, "Complete feature store from extract-features.", required=True)
    out: Path = _run_folder("runs/fusion")


@dataclass
class TrainJointInputs:
    """The data, starting models and run folder of `chx train-joint`."""

    manifest: Path = _required("Manifest of the images; split 'train' (or none) trains, 'val' validates (per "
                               "study).")
    images: Path | None = option(None, f"Images root of the manifest.{RECORDED_ROOT}", path="any")
    backbone: Path = _required("Stage-1 checkpoint (best.pt of train-backbone) to start the backbone from; its "
                               "preprocessing is used.")
    fusion: Path | None = option(None, "Fusion checkpoint trained on that backbone's store to start the fusion "
                                       "model from (its architecture, view slots and the store's pooling).  "
                                       "[default: a fresh fusion model with train-fusion's defaults, on "
                                       "unpooled maps]", path="any")
    out: Path = _run_folder("runs/joint")


@dataclass
class PseudoLabelOptions:
    """Options of `chx pseudo-label`."""

    checkpoint: Path = _required("Stage-1 checkpoint (best.pt of train-backbone).")
    manifest: Path = _required("Manifest to fill, prepared onto the checkpoint's classes (e.g. NIH onto "
                               "CXR-LT's 26).")
    images: Path | None = _images("that manifest")
    out: Path = _out(None, "Manifest to write, with null labels replaced by probabilities.", path="file",
                     required=True)
    tta: bool = option(True, "Mean of the image and its hflip.")
    batch_size: int = _batch_size()
    workers: int = _workers()
    device: str = _device()


@dataclass
class EvaluateOptions:
    """Options of `chx evaluate`."""

    checkpoint: Path | None = option(None, "A backbone, fusion or joint (train-joint) checkpoint (best.pt).",
                                     path="any")
    store: str | None = option(None, "Feature store (for a fusion checkpoint).")
    manifest: Path | None = option(None, "Manifest (for a backbone or joint checkpoint), with --images.",
                                   path="any")
    images: Path | None = _images("--manifest")
    split: str = option("test", "Split to evaluate.")
    thresholds_from: str = option("val", "Split on which per-class F1 thresholds are tuned (max F1); 'none' "
                                         "= 0.5.")
    groups: str = _groups()
    bootstrap: int = _bootstrap()
    views: str = option("all", "Fusion and joint checkpoints: keep only these views of each study (robustness "
                               "to a missing view).", choices=("all", "frontal", "lateral"))
    out: Path | None = _out(None, "Report folder: metrics.json, per_class.csv, summary.md, plots.  [default: "
                                  "eval-SPLIT]", path="dir")
    compare_runs: tuple[Path, ...] = option(help="Instead: print one side-by-side table of report folders: "
                                                 "--compare eval-f eval-b.", flag="--compare", multiple=True,
                                            path="any")
    overwrite: bool = _overwrite("Replace an existing report folder -o.")
    absent_classes: str = option("skip", "Classes without a positive in the split: left out of the macro means "
                                         "(skip), or counted as AP 0 (zero: what the reference code's "
                                         "torchmetrics mAP does; for comparison).", choices=("skip", "zero"))
    batch_size: int = _batch_size()
    workers: int = _workers()


@dataclass
class CompareOptions:
    """Options of `chx compare`."""

    backbone: Path | None = option(None, "Stage-1 checkpoint (with --fusion and --store).", path="any")
    fusion: Path | None = option(None, "Fusion checkpoint trained on that backbone's store.", path="any")
    ensemble: Path | None = option(None, "Instead of --backbone, --fusion and --store: an ensemble bundle (`chx "
                                         "ensemble`); each member is compared with the ensemble.", path="any")
    manifest: Path = _required("Manifest of the images.")
    images: Path | None = _images()
    store: str | None = option(None, "The feature store the fusion model was trained on (with --backbone and "
                                     "--fusion).")
    split: str = option("val", "Split to compare on.")
    groups: str = _groups()
    bootstrap: int = _bootstrap()
    out: Path | None = _out(None, "Also write the table (Markdown) and the full results (same name, .json) "
                                  "here.", path="file")
    overwrite: bool = _overwrite("Replace an existing -o table (and its .json) that chx compare wrote.")
    batch_size: int = _batch_size()
    workers: int = _workers()


EXPORT_FORMATS = ("bundle", "hf", "onnx")


@dataclass
class ExportOptions:
    """Options of `chx export`."""

    backbone: Path | None = option(None, "Stage-1 checkpoint.", path="any")
    fusion: Path | None = option(None, "Fusion checkpoint trained on that backbone's features.", path="any")
    joint: Path | None = option(None, "Instead of --backbone and --fusion: a train-joint checkpoint (it holds "
                                      "both).", path="any")
    ensemble: Path | None = option(None, "Instead of --backbone/--fusion or --joint: an ensemble bundle (`chx "
                                         "ensemble`) to write as an ensemble folder of --format hf or onnx "
                                         "members (same names and weights). Stage-1 members have neither "
                                         "format.", path="any")
    fmt: str = option("bundle", "bundle: one file; hf: a Hugging Face folder (model.safetensors, config.json "
                                "and a generated model card README.md); onnx: backbone.onnx and fusion.onnx "
                                "(dynamic batch and views, checked against torch) with config.json, for "
                                "--runtime onnxruntime (needs pip install 'chx[onnx]').", flag="--format",
                      choices=EXPORT_FORMATS)
    out: Path | None = _out(None, "File (bundle) or folder (hf, onnx; with --ensemble an ensemble folder) to "
                                  "write.  [default: model.chx, model-hf or model-onnx]")
    overwrite: bool = _overwrite("Replace an existing -o file or folder.")


@dataclass
class EnsembleOptions:
    """Options of `chx ensemble` (besides the MEMBER arguments)."""

    out: Path = _out(None, "Ensemble bundle folder to write (ensemble.json and a copy of every member).",
                     path="dir", required=True)
    weights: str | None = option(None, "One positive weight per member, in their order (normalised): --weights "
                                       "2,1,1.  [default: equal]", metavar="LIST")
    from_run: Path | None = option(None, "Instead of MEMBER paths: the last --last validation checkpoints of this "
                                         "run folder (trained with --keep-checkpoints).", path="dir")
    last: int | None = option(None, "With --from-run: how many of its last validation checkpoints.  [default: 1]",
                              min=1)
    backbone: Path | None = option(None, "With --from-run of a fusion run: the stage-1 checkpoint its store was "
                                         "extracted with.", path="any")
    overwrite: bool = _overwrite("Replace an existing -o ensemble folder.")


@dataclass
class ImportReferenceOptions:
    """Options of `chx import-reference` (besides the checkpoint argument)."""

    kind: str = option(None, "backbone: the reference's stage-1 model; fusion: its FusionBackbone.",
                       choices=("backbone", "fusion"), required=True)
    classes: str = option(None, "The class names the reference model was trained on, in its order: "
                                "'cxr-lt-2023', a comma-separated list or a file with one class per line.",
                          required=True, metavar="LIST")
    backbone_name: str = option(DEFAULT_BACKBONE, "timm name of its backbone (the paper's by default).",
                                flag="--backbone")
    out: Path = _out(None, "chx checkpoint to write.", path="file", required=True)
    overwrite: bool = _overwrite("Replace an existing -o file.")


@dataclass
class MakeDemoDataOptions:
    """Options of `chx make-demo-data` (besides the OUT argument)."""

    studies: int = option(1000, "Number of studies.", min=10)
    seed: int = option(0, "Seed (same seed, same files).")
    size: int = option(160, "Image size in pixels.", min=32)
    views: int = option(DemoConfig.views, "Most views per study: 3, the standard demo; 4, the 4-view variant "
                                          "(PA, AP, LATERAL, LL; a one-view-type sign shows in one of the "
                                          "study's views of that type).", min=3, max=4)


@dataclass
class DemoInputs:
    """Where `chx demo` writes and, optionally, the data it runs on instead of synthetic data."""

    out: Path = _out(Path("demo-out"), "Folder for the data, runs, store and table (a demo folder is replaced; "
                                       "any other non-empty folder is refused).", path="dir")
    manifest: Path | None = option(None, "Run on this manifest instead of synthetic data (splits "
                                         "train/val[/test]).", path="file", exists=True)
    images: Path | None = _images("--manifest")


# predict and explain: the models and the studies they read.

def _backbone() -> Field:
    return option(None, "Stage-1 checkpoint (instead of --bundle, with --fusion).", path="any")


def _fusion() -> Field:
    return option(None, "Fusion checkpoint.", path="any")


def _studies() -> Field:
    return option(None, "A folder holding one sub-folder of images (PNG, JPEG, DICOM) per study.",
                  flag="--studies", path="any")


def _files() -> Field:
    return option(help="Image files of ONE study: --files a.dcm b.dcm (or repeat the option).", multiple=True,
                  path="any")


def _views() -> Field:
    return option(None, "The views of the --files images, one per file in the same order: --views PA,LATERAL "
                        "(PA, AP, LATERAL, LL, OTHER, or auto: the DICOM ViewPosition, else a view word of the "
                        "file name). [default: auto]", metavar="LIST")


def _study_id() -> Field:
    return option("study", "Study id of the --files study.")


def _inputs_manifest() -> Field:
    return option(None, "A manifest (labels not needed) listing the images, their studies and views.", path="any")


@dataclass
class PredictOptions:
    """Options of `chx predict` (besides the --files words after the option)."""

    bundle: Path | None = option(None, "File or folder from `chx export` (--format bundle or hf; onnx with "
                                       "--runtime onnxruntime).", path="any")
    backbone: Path | None = _backbone()
    fusion: Path | None = _fusion()
    joint: Path | None = option(None, "A train-joint checkpoint (it holds both models; instead of --bundle).",
                                path="any")
    studies_dir: Path | None = _studies()
    files: tuple[Path, ...] = _files()
    views: str | None = _views()
    study_id: str = _study_id()
    manifest: Path | None = _inputs_manifest()
    images: Path | None = _images("--manifest")
    split: str | None = option(None, "Only the --manifest studies of this split (e.g. test).  [default: every "
                                     "split]")
    batch_size: int = _batch_size(help="Images per backbone step and studies per fusion step (studies are "
                                       "batched together).")
    workers: int = _workers(help="DataLoader workers decoding images.")
    out: Path = _out(Path("predictions.csv"), "Output file (.csv, .parquet or .json).", path="file")
    fmt: str | None = option(None, "csv/json/parquet: one row per study; cxr-lt: the CXR-LT 2023/2024 "
                                   "submission, one row per image (dicom_id = image_id) with its study's "
                                   "probabilities, joined by study id; cxr-lt-2026: the same keyed by ImageID (the "
                                   "image's file name), 30 classes.  [default: from the -o suffix: .json, "
                                   ".parquet, else csv]", flag="--format",
                             choices=("csv", "json", "parquet", "cxr-lt", "cxr-lt-2026"))
    device: str = _device()
    runtime: str = option("torch", "torch, or onnxruntime: the graphs of `chx export --format onnx` (--bundle "
                                   "DIR, or an ensemble of them: `chx export --ensemble`) on the CPU, the same "
                                   "preprocessing (needs pip install 'chx[onnx]').",
                          choices=("torch", "onnxruntime"))
    explain_out: Path | None = option(None, "Also write explanations into this folder, as `chx explain` does: one "
                                            "PNG per study (its top findings' attention on each view), "
                                            "explain.json and index.html.", flag="--explain", path="dir")
    overwrite: bool = _overwrite("Replace an existing -o file (and --explain folder).")


@dataclass
class ExplainOptions:
    """Options of `chx explain` (top_k also of `chx predict --explain`)."""

    bundle: Path | None = option(None, "File from `chx export`: maps of the fusion model's attention over all "
                                       "views.", path="any")
    backbone: Path | None = _backbone()
    fusion: Path | None = _fusion()
    checkpoint: Path | None = option(None, "A stage-1 checkpoint alone (instead of the fusion models): "
                                           "single-image maps, each image with its own probabilities.", path="any")
    studies_dir: Path | None = _studies()
    files: tuple[Path, ...] = _files()
    views: str | None = _views()
    study_id: str = _study_id()
    manifest: Path | None = _inputs_manifest()
    images: Path | None = _images("--manifest")
    split: str | None = option(None, "Only the --manifest images of this split (e.g. test).")
    limit: int | None = option(None, "Only the first N studies.", min=1)
    top_k: int = option(4, "Rows of each figure: the study's most probable findings.", min=1)
    classes: str | None = option(None, "Comma-separated class names to show (in this order) instead of the "
                                       "top-k.", metavar="LIST")
    method: str = option("attention", "attention: the ML-Decoder head's cross-attention (one map per finding); "
                                      "grad-cam: Grad-CAM on the last feature map (with --checkpoint only).",
                         choices=("attention", "grad-cam"))
    out: Path = _out(Path("explanations"), "Output folder: one PNG per study, explain.json, index.html.",
                     path="dir")
    device: str = _device()
    overwrite: bool = _overwrite("Replace an existing -o folder.")


@dataclass
class CacheImagesOptions:
    """Options of `chx cache-images`."""

    manifest: Path = _required("Manifest of the images to cache (readers look them up by image_id: a cache of "
                               "all rows serves every split).")
    images: Path | None = _images()
    out: str = _out(None, "Image cache: a folder (Zarr v3, default; or an fsspec URL) or a file ending .h5 "
                          "(HDF5, one writer).", required=True)
    size: int | None = option(None, "Side the images are resized to: the model's --size.  [default: the "
                                    "--checkpoint's]", min=1)
    resize: str | None = option(None, "The model's --resize.  [default: the --checkpoint's, else letterbox]",
                                choices=RESIZE_MODES)
    checkpoint: Path | None = option(None, "Take --size and --resize from this checkpoint's preprocessing.",
                                     path="any")
    batch_size: int = _batch_size(32, "Images per batch from the decoding workers.")
    workers: int = _workers(2, "DataLoader workers decoding images.")
    shard: str | None = _shard()
    shard_images: int | None = option(None, "Images per shard object.  [default: ~256 MiB, 64-512 images]", min=1)
    compress: bool = option(False, "Compress the images losslessly (Zarr: zstd; HDF5: lzf) in a new cache.",
                            switch=False)
    repair: bool = option(False, "Verify the cache (checksums, missing objects) and decode its damaged shards "
                                 "again.", switch=False)
    overwrite: bool = _overwrite("Replace a cache of another size, resize mode or manifest (only a store chx "
                                 "made: anything else at that path is refused, never deleted).")
