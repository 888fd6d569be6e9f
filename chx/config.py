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

A config file is untrusted input: it is read with limits (at most :data:`MAX_BYTES`, UTF-8, nesting
at most :data:`MAX_DEPTH` deep, no YAML aliases, no duplicate keys, no JSON ``NaN``/``Infinity``)
and each value is checked against its option's type (:attr:`OptionSpec.kind`) before click sees
it, so every mistake is one line naming the file and the key.
"""

from __future__ import annotations

import difflib
import json
import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from chx.errors import ChxError

# The sections of a run folder's config.json that hold options (chx.engine.trainer writes them).
RUN_SECTIONS = ("train", "options")
# The command that trains each kind of run.
RUN_COMMANDS = {"backbone": "train-backbone", "fusion": "train-fusion", "joint": "train-joint"}
# Limits of a config file (a run's config.json is a few kB): its size and how deep values may nest.
MAX_BYTES = 1 << 20
MAX_DEPTH = 32
# The value kinds an option can take (OptionSpec.kind); "any" is not checked here.
KINDS = ("bool", "int", "float", "str", "path", "choice", "any")


@dataclass(frozen=True)
class OptionSpec:
    """One option of a command: its parameter ``name``, its long ``flag`` (``--batch-size``), the
    ``off_flag`` of a boolean pair (``--no-pretrained``), whether it is a flag without a value or
    takes several values (repeated), and its default.

    ``kind`` (one of :data:`KINDS`) is the type a config file's value must have; ``check``, when
    given, converts one checked value as the command line would (ranges, choices) and raises with
    the reason when it is out of bounds."""

    name: str
    flag: str
    off_flag: str | None = None
    is_flag: bool = False
    multiple: bool = False
    default: object = None
    kind: str = "any"
    check: Callable[[object], object] | None = field(default=None, compare=False, repr=False)

    def keys(self) -> set[str]:
        """The names a config file may use for this option: the parameter's and the flag's."""
        return {self.name, _key(self.flag)}


def _key(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


def _read_text(path: Path) -> str:
    """The file's text: at most MAX_BYTES, UTF-8; anything else is one line."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise ChxError(f"--config {path} cannot be read ({e.strerror or e}); give a readable YAML or JSON "
                       f"file of options") from None
    if len(raw) > MAX_BYTES:
        raise ChxError(f"--config {path} is over {MAX_BYTES >> 20} MiB; a config file of options is a few kB: "
                       f"is it the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ChxError(f"--config {path} is not UTF-8 text (byte {e.start}); give a YAML or JSON file of "
                       f"options") from None
    if "\x00" in text:
        raise ChxError(f"--config {path} holds a NUL byte (a binary file?); give a YAML or JSON file of options")
    return text


def _duplicate(path: Path, key, where: str = "") -> ChxError:
    return ChxError(f"--config {path}: key {key!r} is given twice{where}; keep one")


def _load_json(path: Path, text: str):
    def pairs(items):
        out = {}
        for k, v in items:
            if k in out:
                raise _duplicate(path, k)
            out[k] = v
        return out

    def constant(name):
        raise ChxError(f"--config {path}: {name} is not a number an option takes; give a finite value")

    try:
        data = json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except json.JSONDecodeError as e:
        raise ChxError(f"--config {path}: not valid JSON at line {e.lineno}, column {e.colno} "
                       f"({e.msg})") from None
    except RecursionError:
        raise ChxError(f"--config {path}: values nest too deeply (over {MAX_DEPTH} levels); a config file "
                       f"maps option names to values") from None
    if _depth(data) > MAX_DEPTH:
        raise ChxError(f"--config {path}: values nest too deeply (over {MAX_DEPTH} levels); a config file "
                       f"maps option names to values")
    return data


def _depth(value, limit: int = MAX_DEPTH + 1) -> int:
    """How deep lists and mappings nest in ``value`` (stops counting past ``limit``)."""
    if limit <= 0 or not isinstance(value, (list, dict)):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in items), default=0)


def _yaml_loader(path: Path):
    """A SafeLoader that refuses aliases (`*name`: nested ones blow a few hundred bytes up to
    gigabytes), nesting deeper than MAX_DEPTH and duplicate keys."""
    import yaml

    class Loader(yaml.SafeLoader):
        _depth = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise ChxError(f"--config {path}: line {mark.line + 1}: YAML aliases (*name) are not allowed "
                               f"in config files; write the value out")
            self._depth += 1
            try:
                if self._depth > MAX_DEPTH:
                    mark = self.peek_event().start_mark
                    raise ChxError(f"--config {path}: line {mark.line + 1}: values nest too deeply (over "
                                   f"{MAX_DEPTH} levels); a config file maps option names to values")
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in getattr(node, "value", []):
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise _duplicate(path, key, f" (line {key_node.start_mark.line + 1})")
                    seen.add(key)
                except TypeError:   # an unhashable key: the base class says so
                    pass
            return super().construct_mapping(node, deep=deep)

    return Loader


def read_file(path: str | Path) -> dict:
    """The mapping in a YAML (.yaml/.yml) or JSON file; anything else is one clear line."""
    path = Path(path)
    if not path.is_file():
        raise ChxError(f"--config {path} does not exist; give a YAML or JSON file of options")
    text = _read_text(path)
    if path.suffix.lower() == ".json":
        data = _load_json(path, text)
    else:
        import yaml

        try:
            data = yaml.load(text, Loader=_yaml_loader(path))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ChxError(f"--config {path}: not valid YAML{where} ({getattr(e, 'problem', None) or e})") from None
        except RecursionError:
            raise ChxError(f"--config {path}: values nest too deeply; a config file maps option names to "
                           f"values") from None
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
        values[spec.name] = check_value(path, key, value, spec)
    return values


_KIND_WORDS = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "a string",
               "path": "a path (a string)", "choice": "one of its choices (a string)"}


def check_value(path, key, value, spec: OptionSpec):
    """``value`` of option ``spec`` (given as ``key`` in the file ``path``), checked strictly against
    the option's kind (and its ``check``): a whole number for an int (3.0 is 3, 2.7 is refused), a
    finite number for a float, a list for a repeatable option. Returns the value to use."""
    where = f"--config {path}: {key!r} ({spec.flag})"
    if value is None:
        return None             # unset: the option's default, as before
    if spec.multiple:
        if not isinstance(value, (list, tuple)):
            raise ChxError(f"{where} takes a list ({key}: [{value}]), not a {_type(value)}")
        return [_check_one(where, v, spec) for v in value]
    return _check_one(where, value, spec)


def _show(value) -> str:
    return repr(value[:40]) if isinstance(value, str) else json.dumps(value, default=str)[:40]


def _type(value) -> str:
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "list",
            dict: "mapping"}.get(type(value), type(value).__name__)


def _check_one(where: str, value, spec: OptionSpec):
    kind = spec.kind if spec.kind in KINDS else "any"
    if kind == "any":
        return value
    wrong = ChxError(f"{where} takes {_KIND_WORDS[kind]}, not the {_type(value)} {_show(value)}")
    if isinstance(value, (dict, list, tuple)):
        raise wrong
    if kind == "bool":
        if not isinstance(value, bool):
            raise wrong
    elif kind in ("int", "float"):
        if isinstance(value, bool):
            raise wrong
        if isinstance(value, str):
            try:
                value = int(value.strip()) if kind == "int" else float(value.strip())
            except ValueError:
                raise wrong from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ChxError(f"{where} is {value}; give a finite number")
        if kind == "int":
            if isinstance(value, float):
                if not value.is_integer():
                    raise ChxError(f"{where} takes a whole number, not {value}")
                value = int(value)
        if not isinstance(value, (int, float)):
            raise wrong
    else:   # str, path, choice: a string; a whole number is taken as its digits (`device: 0`)
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ChxError(f"{where} takes {_KIND_WORDS[kind]}, not the {_type(value)} {_show(value)}"
                           + ("; quote it" if isinstance(value, bool) else ""))
        value = str(value) if isinstance(value, int) else value
    if spec.check is not None:
        try:
            spec.check(value)
        except Exception as e:  # click's BadParameter and friends: the reason is their message
            message = getattr(e, "message", None) or str(e)
            raise ChxError(f"{where}: {message}") from None
    return value


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
