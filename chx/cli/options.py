"""Click options built from the option dataclasses of :mod:`chx.options` (their one declaration).

``@options(opts=BackboneOptions, train=TrainConfig)`` adds one click option per :func:`chx.options.option`
field of each class (in declaration order) and hands the command finished objects: the command is
``def train_backbone(opts: BackboneOptions, train: TrainConfig)``. The same declarations give the
:class:`chx.config.OptionSpec` rows that config files are checked against (:func:`option_specs`) and
that the model card renders back into command lines.
"""

from __future__ import annotations

import functools
from dataclasses import MISSING, Field
from pathlib import Path

import click

from chx.config import OptionSpec
from chx.options import option_fields, option_meta

_ATTR = "__chx_options__"


def _base_type(f: Field) -> str:
    """The field's value type: bool, int, float, str or Path (of one value, for a repeatable one)."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    t = t.replace(" | None", "").replace("None | ", "").strip()
    if t.startswith("tuple[") or t.startswith("list["):
        t = t[t.index("[") + 1:].split(",")[0].rstrip("]").strip()
    if t not in ("bool", "int", "float", "str", "Path"):
        raise TypeError(f"option {f.name}: type {f.type!r} has no command-line form")
    return t


def flag_of(f: Field) -> str:
    """The long option of a field: ``--field-name`` unless declared otherwise."""
    return option_meta(f)["flag"] or "--" + f.name.replace("_", "-")


def click_type(f: Field) -> click.ParamType:
    """The click type of an option field: its choices, bounds or path rules."""
    m, base = option_meta(f), _base_type(f)
    if m["choices"] is not None:
        return click.Choice(list(m["choices"]))
    if m["path"] is not None or base == "Path":
        kind = m["path"] or "any"
        return click.Path(exists=m["exists"], file_okay=kind != "dir", dir_okay=kind != "file",
                          path_type=Path if base == "Path" else None)
    if base in ("int", "float"):
        if m["min"] is None and m["max"] is None:
            return click.INT if base == "int" else click.FLOAT
        return (click.IntRange if base == "int" else click.FloatRange)(min=m["min"], max=m["max"])
    if base == "bool":
        return click.BOOL
    return click.STRING


def _default(f: Field):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def click_option(f: Field):
    """The click option (a decorator) of one option field."""
    m = option_meta(f)
    long = flag_of(f)
    kw = dict(show_default=m["show_default"], help=m["help"] or None, multiple=m["multiple"],
              required=m["required"], metavar=m["metavar"])
    if not m["required"]:      # click takes a given default (even None) as a value of a required option
        kw["default"] = _default(f)
    if _base_type(f) == "bool" and not m["multiple"]:
        if m["switch"]:
            long = f"{long}/--no-{long[2:]}"
        else:
            kw["is_flag"] = True
    else:
        kw["type"] = click_type(f)
    return click.option(*([m["short"]] if m["short"] else []), long, f.name, **kw)


def _kind(f: Field) -> str:
    m, base = option_meta(f), _base_type(f)
    if m["choices"] is not None:
        return "choice"
    if m["path"] is not None or base == "Path":
        return "path"
    return base


def option_specs(*classes) -> list[OptionSpec]:
    """The :class:`chx.config.OptionSpec` rows of the option fields of ``classes`` (what a config
    file may set, checked as the command line would: the same click type converts each value)."""
    rows = []
    for cls in classes:
        for f in option_fields(cls):
            m = option_meta(f)
            is_flag = _base_type(f) == "bool" and not m["multiple"]
            off = f"--no-{flag_of(f)[2:]}" if is_flag and m["switch"] else None
            rows.append(OptionSpec(f.name, flag_of(f), off, is_flag, m["multiple"], _default(f), _kind(f),
                                   lambda v, t=click_type(f): t.convert(v, None, None)))
    return rows


def options(**groups):
    """Decorator: the click options of every option field of the given dataclasses (parameter name ->
    class, in this order), and the command receives one finished object per class under its
    parameter name. Other parameters (click arguments, other options) pass through unchanged."""
    names = {}
    for param, cls in groups.items():
        for f in option_fields(cls):
            if f.name in names:
                raise TypeError(f"option {f.name} is declared by both {names[f.name].__name__} and "
                                f"{cls.__name__}")
            names[f.name] = cls

    def decorate(func):
        @functools.wraps(func)
        def command(*args, **kw):
            built = {param: cls(**{f.name: kw.pop(f.name) for f in option_fields(cls)})
                     for param, cls in groups.items()}
            return func(*args, **kw, **built)

        setattr(command, _ATTR, (*getattr(func, _ATTR, ()), *groups.values()))
        for cls in reversed(list(groups.values())):
            for f in reversed(option_fields(cls)):
                command = click_option(f)(command)
        return command
    return decorate


def command_specs(command: click.Command) -> list[OptionSpec]:
    """The option rows of a command built with :func:`options` (none for other commands)."""
    return option_specs(*getattr(command.callback, _ATTR, ()))
