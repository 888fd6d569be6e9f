"""How an option is declared (:func:`option`, read back by :func:`option_meta` / :func:`option_fields`),
the choice lists the options share, and the declarations several commands share (a dataclass field
cannot be shared, so they are functions). Plain data: no torch, no click."""

from __future__ import annotations

from dataclasses import MISSING, Field, field, fields
from pathlib import Path


def option(default=MISSING, help: str = "", *, flag: str | None = None, short: str | None = None,
           switch: bool = True, choices: tuple[str, ...] | None = None, min: float | None = None,
           max: float | None = None, path: str | None = None, exists: bool = False,
           multiple: bool = False, required: bool = False, metavar: str | None = None,
           show_default: bool = True, on_resume: str | None = None) -> Field:
    """A dataclass field that is a command-line option (all plain data, in the field's metadata).

    ``flag``: the long option when it is not ``--field-name``; ``short``: e.g. ``-o``; ``switch``:
    a bool is ``--x/--no-x`` (True) or a bare ``--x`` flag (False); ``choices``, ``min``/``max``
    (inclusive bounds): what a value may be; ``path``: ``file``, ``dir`` or ``any`` for a path
    option (with ``exists``: it must exist); ``multiple``: repeatable (a tuple); ``on_resume``
    (train-*): ``free`` may change on --resume, ``applied`` changes with a warning."""
    meta = {"help": help, "flag": flag, "short": short, "switch": switch,
            "choices": tuple(choices) if choices is not None else None, "min": min, "max": max,
            "path": path, "exists": exists, "multiple": multiple, "required": required,
            "metavar": metavar, "show_default": show_default, "on_resume": on_resume}
    if multiple and default is MISSING:
        default = ()
    return field(default=default, metadata={"chx_option": meta})


def option_meta(f: Field) -> dict | None:
    """The :func:`option` declaration of a dataclass field; None for an internal field."""
    return f.metadata.get("chx_option")


def option_fields(cls) -> list[Field]:
    """The fields of ``cls`` that are command-line options, in declaration order."""
    return [f for f in fields(cls) if option_meta(f) is not None]


def choices_of(cls, name: str) -> tuple[str, ...] | None:
    """The declared choices of option ``name`` of ``cls``."""
    return next(option_meta(f)["choices"] for f in option_fields(cls) if f.name == name)


DEFAULT_BACKBONE = "convnext_small.fb_in22k_ft_in1k"   # the paper's stage-1 backbone
# Choice lists whose owners import torch (chx.models.heads, chx.losses, chx.data.study_dataset,
# chx.data.transforms): spelled here so `--help` needs no torch; tests/test_cli_options.py keeps
# them equal to the owners'.
HEADS = ("ml-decoder", "csra", "linear")
LOSSES = ("wasl", "asl", "db", "bce")
PRELOAD = ("auto", "ram", "gpu", "off")    # and the hidden alias "on" (older runs' config.json)
RESIZE_MODES = ("letterbox", "squash")
SOFT_TARGETS = ("expected", "reference")
SOFT_TARGETS_HELP = ("The loss on soft (pseudo) labels: expected (linear in the label: the expected loss of a "
                     "hard label drawn with that probability) or reference (the CheXFusion code's formula, "
                     "which sharpens pseudo labels). Equal on 0/1 labels.")
SHUFFLE_HELP = "Random view order in training (order must carry no information)."
RECORDED_ROOT = "  [default: the root `chx prepare --images` recorded in the manifest]"
AUGMENT_ON = ("auto", "workers", "device")    # chx.data.batch_augment.augment_on_device


def _augment_on() -> Field:   # train-backbone (a function, so that train-joint can take it too)
    return option("auto", "Where the stage-1 training augmentation runs: workers (image by image in the "
                          "DataLoader workers, on the CPU) or device (batched on the training device; the "
                          "workers only read and resize; for machines with few cores per GPU); the same distributions. "
                          "auto: workers (on a GPU the batched augmentation runs in series with the step; "
                          "measured 29 % slower on an H200 with 16 cores).", choices=AUGMENT_ON, on_resume="free")


def _images(of: str = "the manifest") -> Field:
    return option(None, f"Images root of {of}.{RECORDED_ROOT}", path="dir", exists=True)


def _overwrite(help: str) -> Field:
    return option(False, help, switch=False)


def _out(default, help: str, path: str = "any", required: bool = False) -> Field:
    return option(default, help, short="-o", path=path, required=required)


def _run_folder(default: str) -> Field:
    return _out(Path(default), "Run folder: config.json, metrics.jsonl, last.pt, best.pt.", path="dir")


def _batch_size(default: int = 16, help: str = "Batch size.") -> Field:
    return option(default, help, min=1)


def _workers(default: int = 2, help: str = "DataLoader workers.") -> Field:
    return option(default, help, min=0)


def _device() -> Field:
    return option("auto", "auto, cpu or cuda.")


def _required(help: str, kind: type = Path) -> Field:
    return option(None, help, required=True, path="any" if kind is Path else None)


GROUPS = ("prevalence", "thirds", "cxr-lt")    # chx.metrics.group_indices; DEFAULT_GROUPS first
BOOTSTRAP_RESAMPLES = 1000                      # chx.metrics.BOOTSTRAP_RESAMPLES (a test keeps them equal)


def _groups() -> Field:
    return option(GROUPS[0], "Head/medium/tail classes: prevalence: head > 10 %, tail < 1 % training "
                             "prevalence (CXR-LT 2024's rule, any class list; the rule chx prepare reports and "
                             "training validation uses); thirds: thirds of the training-frequency rank; "
                             "cxr-lt: CXR-LT 2023's 8/10/8 of its 26 classes.", choices=GROUPS)


def _bootstrap() -> Field:
    return option(BOOTSTRAP_RESAMPLES, "Resamples of the evaluated studies (images for a backbone) for the "
                                       "95 % mAP intervals (fixed seed; paired for differences); 0: no "
                                       "intervals.", min=0)
