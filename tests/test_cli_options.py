"""Options as data (issue 27): a field of a chx.options dataclass is the option's one declaration;
the CLI (chx.cli.options.options), config files, the resume rule and the model card read it."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import chx.options as O
from chx.cli.options import click_type, command_specs, option_specs, options
from chx.config import config_values
from chx.errors import ChxError
from chx.options import option, option_fields
from helpers import run_chx


@dataclass
class Toy:
    """A dataclass with one option of each form, and one internal field."""

    count: int = option(3, "How many.", min=1)
    ratio: float = option(0.5, "A fraction.", min=0, max=1, metavar="FRACTION")
    mode: str = option("a", "The mode.", choices=("a", "b"))
    fast: bool = option(True, "Go fast.")
    loud: bool = option(False, "Shout.", switch=False)
    files: tuple[Path, ...] = option(help="Files; repeat.", flag="--file", multiple=True, path="file")
    out: Path = option(Path("here"), "Where to write.", short="-o", path="dir")
    name: str | None = option(None, "A name.", required=True)
    internal: int = 7


@dataclass
class Other:
    level: int = option(1, "Another group's option.")


def _toy_command():
    got = {}

    @click.command()
    @options(toy=Toy, other=Other)
    @click.argument("rest", nargs=-1)
    def cmd(toy: Toy, other: Other, rest):
        got.update(toy=toy, other=other, rest=rest)
    return cmd, got


def test_a_dataclass_becomes_click_options_and_the_command_gets_objects():
    cmd, got = _toy_command()
    r = CliRunner().invoke(cmd, ["--name", "n", "--count", "5", "--mode", "b", "--no-fast", "--loud",
                                 "--file", "x.png", "--file", "y.png", "-o", "there", "--level", "4", "z"])
    assert r.exit_code == 0, r.output
    assert got["toy"] == Toy(count=5, ratio=0.5, mode="b", fast=False, loud=True,
                             files=(Path("x.png"), Path("y.png")), out=Path("there"), name="n")
    assert got["other"] == Other(level=4) and got["rest"] == ("z",) and got["toy"].internal == 7
    r = CliRunner().invoke(cmd, ["--name", "n"])
    assert r.exit_code == 0 and got["toy"] == Toy(name="n")


@pytest.mark.parametrize("args, message", [
    (["--name", "n", "--count", "0"], "0 is not in the range x>=1"),
    (["--name", "n", "--ratio", "1.5"], "1.5 is not in the range 0<=x<=1"),
    (["--name", "n", "--mode", "c"], "'c' is not one of 'a', 'b'"),
    ([], "Missing option '--name'"),
    (["--name", "n", "--internal", "3"], "No such option"),
])
def test_bounds_choices_required_and_internal_fields(args, message):
    r = CliRunner().invoke(_toy_command()[0], args)
    assert r.exit_code == 2 and message in r.output, r.output


def test_help_shows_every_declaration():
    text = CliRunner().invoke(_toy_command()[0], ["--help"], terminal_width=200).output
    for words in ("--count INTEGER RANGE", "How many.  [default: 3; x>=1]", "--ratio FRACTION", "[a|b]",
                  "--fast / --no-fast", "--loud ", "--file FILE", "-o, --out DIRECTORY", "[default: here]",
                  "A name.  [required]", "--level INTEGER"):
        assert words in text, words
    assert "internal" not in text


def test_a_field_declared_twice_in_one_command_is_refused():
    @dataclass
    class Clash:
        count: int = option(1, "Again.")
    with pytest.raises(TypeError, match="count is declared by both Toy and Clash"):
        options(a=Toy, b=Clash)


def test_config_specs_come_from_the_same_declaration(tmp_path):
    specs = {s.name: s for s in option_specs(Toy)}
    assert set(specs) == {f.name for f in option_fields(Toy)}
    assert (specs["fast"].flag, specs["fast"].off_flag, specs["fast"].is_flag) == ("--fast", "--no-fast", True)
    assert (specs["loud"].off_flag, specs["files"].flag, specs["files"].multiple) == (None, "--file", True)
    assert [specs[n].kind for n in ("count", "ratio", "mode", "fast", "files", "name")] == \
        ["int", "float", "choice", "bool", "path", "str"]
    path = tmp_path / "c.yaml"
    path.write_text("count: 4.0\nmode: b\nfile: [a.png]\n")
    assert config_values(path, "toy", list(specs.values())) == {"count": 4, "mode": "b", "files": ["a.png"]}
    for text, message in (("count: 0\n", "0 is not in the range x>=1"), ("mode: c\n", "'c' is not one of"),
                          ("internal: 3\n", "unknown key 'internal'")):
        path.write_text(text)
        with pytest.raises(ChxError, match=message):
            config_values(path, "toy", list(specs.values()))


def test_choices_spelled_in_options_equal_their_owners():
    """Owners that import torch keep the lists; chx.options spells them (no torch for --help)."""
    from chx import losses, metrics
    from chx.data.study_dataset import PRELOAD_MODES
    from chx.models.heads import HEADS
    from chx.store._codec import FEATURE_DTYPES as DTYPES   # not uint8: the image cache's

    assert O.HEADS == HEADS and O.LOSSES == losses.LOSSES and O.SOFT_TARGETS == losses.SOFT_TARGETS
    assert set(O.PRELOAD) == set(PRELOAD_MODES)
    assert O.BOOTSTRAP_RESAMPLES == metrics.BOOTSTRAP_RESAMPLES and O.GROUPS[0] == metrics.DEFAULT_GROUPS
    assert O.choices_of(O.EvaluateOptions, "absent_classes") == metrics.ABSENT_CLASSES
    assert tuple(click_type(next(f for f in option_fields(O.ExtractOptions) if f.name == "dtype")).choices) \
        == DTYPES


def test_the_resume_rule_is_read_from_the_declarations():
    from chx.engine.trainer import APPLIED_ON_RESUME, RESUMABLE_CHANGES

    assert RESUMABLE_CHANGES == O.resume_rule("free") and APPLIED_ON_RESUME == O.resume_rule("applied") == {"epochs"}
    assert {"workers", "device", "preload", "eval_batch_size", "max_steps"} <= RESUMABLE_CHANGES


def test_every_option_of_every_command_is_declared_in_chx_options():
    """No command declares an option in click alone (the adapters' options of prepare and --classes
    come from chx.data.adapters; --json of store info/verify is the output's form)."""
    from chx.cli import cli

    def walk(group, prefix=""):
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                yield from walk(cmd, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}", cmd

    from chx.data.adapters import merged_options
    allowed = {"prepare": {"classes"} | {opt.name for opt, _ in merged_options()},
               "store info": {"as_json"}, "store verify": {"as_json"}}
    for name, cmd in walk(cli):
        declared = {s.name for s in command_specs(cmd)}
        in_click = {p.name for p in cmd.params if isinstance(p, click.Option) and p.expose_value}
        assert in_click - declared <= allowed.get(name, set()), name
        assert declared <= in_click, name


@dataclass
class FusionPlus(O.FusionOptions):
    """FusionOptions with one more option: the field below is the only edit."""

    jitter: float = option(0.0, "Jitter of the projected tokens (a test's new option).", min=0)


@pytest.fixture
def extended_cli(monkeypatch):
    """The training commands built again with FusionOptions -> FusionPlus, as if the field were in
    chx/options/."""
    import chx.cli.train

    monkeypatch.setattr(O, "FusionOptions", FusionPlus)
    yield importlib.reload(chx.cli.train)
    monkeypatch.undo()
    importlib.reload(chx.cli.train)


def test_a_new_field_is_in_help_config_and_the_runs_config_json(capsys, tmp_path, extended_cli, covid_models):
    code, out, _ = run_chx(capsys, "train-fusion", "--help")
    assert code == 0 and "--jitter FLOAT RANGE" in out and "Jitter of the projected tokens" in out
    config = tmp_path / "f.yaml"
    config.write_text(f"store: {covid_models['store']}\njitter: 0.25\nencoder-layers: 0\nmax-steps: 1\n"
                      f"val-every: 1\nworkers: 0\ndevice: cpu\npreload: ram\n")
    run = tmp_path / "run"
    code, _, err = run_chx(capsys, "train-fusion", "--config", config, "-o", run)
    assert code == 0, err
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["options"]["jitter"] == 0.25
    again = tmp_path / "again"       # the run's config.json is a config file with the new option in it
    code, _, err = run_chx(capsys, "train-fusion", "--config", run / "config.json", "-o", again)
    assert code == 0, err
    assert json.loads((again / "config.json").read_text())["options"]["jitter"] == 0.25
    config.write_text("jitter: -1\n")
    code, _, err = run_chx(capsys, "train-fusion", "--config", config)
    assert code == 2 and "'jitter' (--jitter): -1.0 is not in the range x>=0" in err and len(err.splitlines()) == 1
