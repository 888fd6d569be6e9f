"""Config files for `--config FILE`: option values from YAML or JSON, checked against the command.

A config file is a mapping of option names to values, written as on the command line without the
dashes (``batch-size: 16`` or ``batch_size: 16``; a repeatable option takes a list)::

    # backbone.yaml
    manifest: [covid.parquet]
    images: [covid-cxr/images]
    model: convnext_atto
    size: 256
    pretrained: false
    epochs: 3

A run folder's ``config.json`` is a config file too: its ``train`` and ``options`` sections hold
every option of the run, so ``chx train-backbone --config runs/b/config.json -o runs/b2`` repeats
that run exactly; its other keys are records of the run (classes, model configuration, step counts)
and are not options. Relative paths in a file are read from the working directory, as on the
command line. Options given on the command line override the file (the CLI makes the file's values
click's defaults).

The command's options arrive as :class:`OptionSpec` rows (the CLI builds them from its click
parameters; this module knows no click), which also render a run's options back into the command
line that made it (:func:`command_line`, for model cards).
"""

from __future__ import annotations

import difflib
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from chx.errors import ChxError

# The sections of a run folder's config.json that hold options (chx.engine.trainer writes them).
RUN_SECTIONS = ("train", "options")
# The command that trains each kind of run.
RUN_COMMANDS = {"backbone": "train-backbone", "fusion": "train-fusion", "joint": "train-joint"}


@dataclass(frozen=True)
class OptionSpec:
    """One option of a command: its parameter ``name``, its long ``flag`` (``--batch-size``), the
    ``off_flag`` of a boolean pair (``--no-pretrained``), whether it is a flag without a value or
    takes several values (repeated), and its default."""

    name: str
    flag: str
    off_flag: str | None = None
    is_flag: bool = False
    multiple: bool = False
    default: object = None

    def keys(self) -> set[str]:
        """The names a config file may use for this option: the parameter's and the flag's."""
        return {self.name, _key(self.flag)}


def _key(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


def read_file(path: str | Path) -> dict:
    """The mapping in a YAML (.yaml/.yml) or JSON file; anything else is one clear line."""
    path = Path(path)
    if not path.is_file():
        raise ChxError(f"--config {path} does not exist; give a YAML or JSON file of options")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ChxError(f"--config {path}: not valid JSON at line {e.lineno}, column {e.colno} "
                           f"({e.msg})") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ChxError(f"--config {path}: not valid YAML{where} ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ChxError(f"--config {path} holds a {type(data).__name__}, not a mapping of option names to "
                       f"values (e.g. 'epochs: 3')")
    return data


def is_run_config(data: dict) -> bool:
    """Whether a mapping is a run folder's config.json (written by the trainer)."""
    return isinstance(data.get("kind"), str) and all(isinstance(data.get(s), dict) for s in RUN_SECTIONS)


def config_values(path: str | Path, command: str, specs: list[OptionSpec]) -> dict:
    """Parameter name -> value for ``command`` from the file ``path``.

    A key that names no option of the command is one line naming the key and the file; so is a run
    folder's config.json of another kind of run than ``command`` trains."""
    data = read_file(path)
    if is_run_config(data):
        kind = data["kind"]
        if RUN_COMMANDS.get(kind) != command:
            fix = f"pass it to chx {RUN_COMMANDS[kind]}" if kind in RUN_COMMANDS else "pass a file of options"
            raise ChxError(f"--config {path} is the config.json of a {kind} run; chx {command} takes other "
                           f"options: {fix}")
        data = {k: v for s in RUN_SECTIONS for k, v in data[s].items()}
    by_key = {k: spec for spec in specs for k in spec.keys()}
    values = {}
    for key, value in data.items():
        spec = by_key.get(_key(str(key)))
        if spec is None:
            close = difflib.get_close_matches(_key(str(key)), sorted(by_key), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ChxError(f"--config {path}: unknown key {key!r}: chx {command} has no such option{hint}; "
                           f"see `chx {command} --help`")
        if spec.name in values:
            raise ChxError(f"--config {path}: option {spec.flag} is given twice (as {key!r} and another "
                           f"spelling); keep one")
        values[spec.name] = value
    return values


def command_line(command: str, values: dict, specs: list[OptionSpec]) -> str:
    """The `chx` command line that sets ``values`` (parameter name -> value), options in the
    command's order; options at their default are left out."""
    words = ["chx", command]
    for spec in specs:
        if spec.name not in values:
            continue
        value = values[spec.name]
        if value == spec.default or value is None:
            continue
        if spec.is_flag:
            if value:
                words.append(spec.flag)
            elif spec.off_flag:
                words.append(spec.off_flag)
            continue
        for v in (value if spec.multiple and isinstance(value, (list, tuple)) else [value]):
            words += [spec.flag, str(v)]
    return shlex.join(words)
