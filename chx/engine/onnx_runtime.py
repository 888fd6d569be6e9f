"""The two ONNX graphs of a bundle (`chx export --format onnx`) and a predictor that runs them with
ONNX Runtime on the CPU (`chx predict --runtime onnxruntime`).

The graphs are the torch computation, exported by torch.onnx (see :func:`export_graphs`):

    backbone.onnx   images [B, 1, S, S] float32 (preprocessed)  ->  features [B, C, h, w] float16
                    = chx.engine.inference.feature_maps: the maps the feature store holds (pooling,
                    float16 rounding); B is dynamic.
    fusion.onnx     features [B, V, C, h, w] float16, view_mask [B, V] bool, view_types [B, V] int64
                    ->  probabilities [B, K] float32 (sigmoid of the fusion logits); B and V are
                    dynamic, V from 1 to the model's max views; False in view_mask = an empty slot.

:class:`OnnxPredictor` has :class:`~chx.engine.predictor.Predictor`'s interface and preprocessing:
the same image decoding, views and view order, and flip TTA (the image and its flip go through
the backbone as one batch, and through the fusion graph as a batch of two studies). Needs the
optional extra ``chx[onnx]``; without it, one line says what to install.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from chx.data.transforms import Preprocess
from chx.engine.inference import feature_maps, fusion_probs
from chx.engine.predictor import (INTEGRITY_KEY, check_integrity, folder_spec, load_images, parse_integrity,
                                  read_folder_config, study_views)
from chx.errors import ChxError

GRAPHS = {"backbone": "backbone.onnx", "fusion": "fusion.onnx"}
BACKBONE_INPUTS, BACKBONE_OUTPUTS = ["images"], ["features"]
FUSION_INPUTS, FUSION_OUTPUTS = ["features", "view_mask", "view_types"], ["probabilities"]
MAX_BATCH = 4096                       # the exported graphs' upper bound of the batch dimension
MISSING = "pip install 'chx[onnx]' (onnx, onnxscript, onnxruntime)"
GRAPH_KEY = "chx_graph"                # metadata_props: which graph of an export this is (backbone/fusion)


def require(module: str, what: str):
    """Import an optional ONNX package, or stop with one line saying what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ChxError(f"{what} needs the {module} package: {MISSING}") from None


class FeatureGraph(nn.Module):
    """What backbone.onnx computes: images [B, 1, S, S] -> the store's maps [B, C, h, w] float16."""

    def __init__(self, backbone: nn.Module, pool: int):
        super().__init__()
        self.backbone, self.pool = backbone, pool

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return feature_maps(self.backbone, images, self.pool)


class FusionGraph(nn.Module):
    """What fusion.onnx computes: a batch of studies' maps -> probabilities [B, K] float32."""

    def __init__(self, fusion: nn.Module):
        super().__init__()
        self.fusion = fusion

    def forward(self, features: torch.Tensor, view_mask: torch.Tensor, view_types: torch.Tensor) -> torch.Tensor:
        return fusion_probs(self.fusion, features.float(), view_mask, view_types)


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], *,
            dynamic_shapes: tuple | None = None, dynamic_axes: dict | None = None) -> None:
    """torch.onnx.export, quiet (its progress lines and the optimizer's notes are not the user's):
    with ``dynamic_axes`` the TorchScript exporter, else the torch.export-based one with
    ``dynamic_shapes``. A model it cannot export is one line."""
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    try:
        with (contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()),
              warnings.catch_warnings()):
            warnings.simplefilter("ignore")   # the TorchScript exporter's deprecation notice
            torch.onnx.export(module.eval(), args, str(path), dynamo=dynamic_axes is None, input_names=inputs,
                              output_names=outputs, dynamic_shapes=dynamic_shapes, dynamic_axes=dynamic_axes,
                              verbose=False, external_data=n_bytes > 2**31 - 2**27)   # below ONNX's 2 GiB
    except Exception as e:  # torch.export's and the exporters' many error types
        disk = _os_error(e)
        if disk is not None:    # a full disk is not the model's fault: the caller names its output
            raise disk from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ChxError(f"{path.stem}: the model cannot be exported to ONNX ({type(e).__name__}: {first}); "
                       f"export it with --format hf or bundle instead") from None


def _os_error(e: BaseException) -> OSError | None:
    """The OSError (disk full, permissions) that caused ``e``, if any, along its causes."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _add_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Add ``metadata`` to the ONNX file's metadata_props (its external data, if any, untouched)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def export_graphs(backbone: nn.Module, fusion: nn.Module, pool: int, size: int, folder: Path,
                  metadata: dict[str, str] | None = None) -> None:
    """Write backbone.onnx and fusion.onnx into ``folder`` (models on the CPU, eval mode), each with
    ``metadata`` (the export's integrity record) and its role (``chx_graph``) in metadata_props.

    The backbone (convolutions: only the batch varies) goes through the TorchScript exporter: its
    trace keeps the batch dynamic, takes ~2 s instead of ~10 s, and ONNX Runtime runs both
    exporters' graphs equally fast (convnext_atto, 256 px). The fusion graph needs the
    torch.export-based exporter: attention's reshapes traced by TorchScript fix the view count."""
    for module in ("onnx", "onnxscript"):
        require(module, "chx export --format onnx")
    backbone, fusion = backbone.cpu().eval(), fusion.cpu().eval()
    images = torch.zeros(2, 1, size, size)
    _export(FeatureGraph(backbone, pool), (images,), folder / GRAPHS["backbone"], BACKBONE_INPUTS,
            BACKBONE_OUTPUTS, dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
    with torch.no_grad():
        maps = feature_maps(backbone, images, pool)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    v = min(2, fusion.max_views)   # 2, not 1: torch.export fixes a dimension whose example is 1
    axes = {0: batch, 1: torch.export.Dim("views", min=1, max=fusion.max_views)} if v > 1 else {0: batch}
    example = (maps[:, None].expand(2, v, *maps.shape[1:]).contiguous(), torch.ones(2, v, dtype=torch.bool),
               torch.zeros(2, v, dtype=torch.long))
    _export(FusionGraph(fusion), example, folder / GRAPHS["fusion"], FUSION_INPUTS, FUSION_OUTPUTS,
            dynamic_shapes=(axes, axes, axes))
    for part, name in GRAPHS.items():
        _add_metadata(folder / name, {**(metadata or {}), GRAPH_KEY: part})


def session(path: Path, threads: int = 0):
    """An ONNX Runtime CPU session of ``path`` (``threads`` 0: ONNX Runtime's default)."""
    ort = require("onnxruntime", "--runtime onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own error types: a truncated or foreign file
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ChxError(f"{path} cannot be loaded by onnxruntime ({first}); export it again") from None


@dataclass
class OnnxPredictor:
    """Study probabilities from image files with the two ONNX graphs of an export folder."""

    backbone: object            # onnxruntime.InferenceSession of backbone.onnx
    fusion: object              # ... of fusion.onnx
    pre: Preprocess
    flip_tta: bool
    max_views: int
    class_names: list[str]
    fusion_config: dict | None = None   # config.json's fusion architecture (predict's unknown-views warning)

    @classmethod
    def load(cls, folder: Path, threads: int = 0) -> "OnnxPredictor":
        """The graphs of an ONNX export folder, checked: each graph is the one its name says and
        carries the export id of config.json (graphs of another export are refused), config.json
        matches the integrity record in the graphs, and the graphs' shapes fit config.json."""
        config = read_folder_config(folder)
        spec = folder_spec(config, Path(folder) / "config.json")
        missing = [name for name in GRAPHS.values() if not (Path(folder) / name).is_file()]
        if missing:
            raise ChxError(f"{folder} has no {', '.join(missing)}: export it with `chx export --format onnx`, "
                           f"or use --runtime torch")
        sessions = {part: session(Path(folder) / name, threads) for part, name in GRAPHS.items()}
        check_graphs(sessions, spec, config.get("integrity"), Path(folder))
        return cls(sessions["backbone"], sessions["fusion"], Preprocess.from_dict(config["preprocessing"]),
                   bool(config["features"]["flip_tta"]), int(config["architecture"]["fusion"]["max_views"]),
                   list(config["class_names"]), dict(config["architecture"]["fusion"]))

    def predict_studies(self, studies, batch_size: int = 16, workers: int = 2,
                        show_progress: bool = True) -> np.ndarray:
        """Probabilities [S, K] of ``studies`` ((paths, views, image ids) each), one study at a time
        (``batch_size`` and ``workers``: the torch predictor's interface; the graphs run per study)."""
        from tqdm.auto import tqdm

        rows = [self.predict_study(*s) for s in tqdm(studies, desc="predict", unit="study", leave=False,
                                                      disable=None if show_progress else True)]
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, len(self.class_names)), np.float32)

    def predict_study(self, paths: list[Path], views: list[str], image_ids: list[str]) -> np.ndarray:
        """Study probabilities [K] from its image files (views: PA/AP/LATERAL/LL/OTHER)."""
        order, types = study_views(views, image_ids, self.max_views)
        x = load_images(self.pre, [paths[i] for i in order]).numpy()              # [V, 1, S, S]
        if self.flip_tta:
            x = np.concatenate([x, np.ascontiguousarray(x[..., ::-1])])            # [2V, 1, S, S]
        maps = self.backbone.run(BACKBONE_OUTPUTS, {"images": x})[0]
        studies = maps.reshape(-1, len(order), *maps.shape[1:])                    # [1 or 2, V, C, h, w]
        b = studies.shape[0]
        probs = self.fusion.run(FUSION_OUTPUTS, {
            "features": studies, "view_mask": np.ones((b, len(order)), dtype=bool),
            "view_types": np.array([types] * b, dtype=np.int64)})[0]
        return probs.mean(axis=0)     # with flip TTA: the mean of the study's and its flip's


def _dims(value) -> list:
    """An ONNX Runtime shape: ints for fixed dimensions, None for dynamic ones."""
    return [d if isinstance(d, int) else None for d in (value or [])]


def check_graphs(sessions: dict, spec: dict, config_record, folder: Path) -> None:
    """The two graphs of an ONNX export against each other and its config.json (see
    :meth:`OnnxPredictor.load`); one line naming the graph when they do not fit."""
    records = {}
    for part, sess in sessions.items():
        meta = sess.get_modelmeta().custom_metadata_map or {}
        role = meta.get(GRAPH_KEY)
        where = GRAPHS[part]
        if role is not None and role != part:
            raise ChxError(f"{folder / where} is the {role} graph of an export, not a {part} graph; the "
                           f"folder's files were mixed: export the model again")
        records[part] = parse_integrity(meta.get(INTEGRITY_KEY), str(folder), where)
    _check_shapes(sessions, spec, folder)
    if all(r is None for r in records.values()):
        # an older export: a warning (a refusal when config.json has a record: files were mixed)
        check_integrity(spec, None, str(folder), "its graphs", config_record=config_record)
        return
    for part, record in records.items():
        where = GRAPHS[part]
        if record is None:
            raise ChxError(f"{folder / where} carries no integrity record but the other graph does: the "
                           f"folder's graphs come from different exports: export the model again")
        check_integrity(spec, record, str(folder), where, config_record=config_record)


def _check_shapes(sessions: dict, spec: dict, folder: Path) -> None:
    """Inputs and outputs of both graphs against config.json: image size, feature channels and map
    size (the same in both graphs), number of classes."""
    def io(part):
        s = sessions[part]
        return ([i.name for i in s.get_inputs()], [o.name for o in s.get_outputs()],
                [_dims(i.shape) for i in s.get_inputs()], [_dims(o.shape) for o in s.get_outputs()])

    def refuse(part, what):
        raise ChxError(f"{folder / GRAPHS[part]} {what}; the folder was edited or its files were mixed: "
                       f"export the model again")

    b_in, b_out, b_in_shape, b_out_shape = io("backbone")
    f_in, f_out, f_in_shape, f_out_shape = io("fusion")
    if (b_in, b_out) != (BACKBONE_INPUTS, BACKBONE_OUTPUTS):
        refuse("backbone", f"is not a backbone graph (inputs {b_in}, outputs {b_out}; expected "
                           f"{BACKBONE_INPUTS} -> {BACKBONE_OUTPUTS})")
    if (f_in, f_out) != (FUSION_INPUTS, FUSION_OUTPUTS):
        refuse("fusion", f"is not a fusion graph (inputs {f_in}, outputs {f_out}; expected "
                         f"{FUSION_INPUTS} -> {FUSION_OUTPUTS})")
    size, k = spec["preprocessing"]["size"], len(spec["class_names"])
    channels = spec["architecture"]["fusion"].get("in_dim")
    images, maps = b_in_shape[0], b_out_shape[0]
    if len(images) != 4 or any(d is not None and d != want for d, want in zip(images[1:], (1, size, size))):
        refuse("backbone", f"reads images of shape {images[1:]} but config.json's preprocessing gives "
                           f"[1, {size}, {size}]")
    if len(maps) != 4 or (maps[1] is not None and maps[1] != channels):
        refuse("backbone", f"gives features of shape {maps[1:]} but config.json's fusion model reads "
                           f"{channels} channels")
    fmaps = f_in_shape[0]
    if len(fmaps) != 5 or any(a is not None and b is not None and a != b for a, b in zip(fmaps[2:], maps[1:])):
        refuse("fusion", f"reads features of shape {fmaps[2:]} but backbone.onnx gives {maps[1:]}")
    probs = f_out_shape[0]
    if len(probs) != 2 or (probs[1] is not None and probs[1] != k):
        refuse("fusion", f"gives {probs[1:]} probabilities per study but config.json names {k} classes")
