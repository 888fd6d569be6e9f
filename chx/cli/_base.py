"""What every command module of the CLI shares: the group, the --config option, run folders'
--resume, the overwrite rule, the images root and the fit report."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from chx.cli.options import command_specs
from chx.errors import ChxError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Group(click.Group):
    """Keeps commands in the order they were added (the pipeline's order) in --help."""

    def list_commands(self, ctx):
        return list(self.commands)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(package_name="chx")
def cli():
    """chx: CheXFusion-style multi-view, long-tailed chest X-ray classification.

    Stages run one after the other, each restartable:
    prepare -> train-backbone -> extract-features -> train-fusion -> evaluate / predict.
    """


def _option_specs(command: click.Command) -> list:
    """The command's options as :class:`chx.config.OptionSpec` rows (what a config file may set), read
    from its option dataclasses in chx.options (:func:`chx.cli.options.command_specs`)."""
    return command_specs(command)


def _config_option(f):
    """``--config FILE``: the file's values become the command's defaults (click's default_map).
    The option is eager, so the file is read before any other option is: a value typed on the
    command line still wins, and a required option may come from the file."""
    def load(ctx, param, path):
        if path is not None:
            from chx.config import config_values

            values = config_values(path, ctx.command.name, _option_specs(ctx.command))
            ctx.default_map = {**(ctx.default_map or {}), **values}
        return path

    return click.option("--config", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        is_eager=True, expose_value=False, callback=load,
                        help="YAML or JSON file of this command's options (names as the long options, "
                             "without the dashes), or a run folder's config.json (the same run again); "
                             "options on the command line override the file.")(f)


def _out_argument(args: list[str]) -> str | None:
    """The value of -o/--out among raw command-line words (the last one given), or None."""
    out = None
    for i, word in enumerate(args):
        if word in ("-o", "--out") and i + 1 < len(args):
            out = args[i + 1]
        elif word.startswith("--out="):
            out = word.split("=", 1)[1]
        elif word.startswith("-o") and len(word) > 2 and not word.startswith("--"):
            out = word[2:]
    return out


class _RunCommand(click.Command):
    """A train-* command: ``--resume -o RUN`` without ``--config`` reads RUN/config.json first (as
    ``--config RUN/config.json --resume`` does), so the run's options need not be given again;
    options given on the command line override it, and the resume check refuses those that would
    change what the run computes. ``--max-steps`` is not taken from the run: without it the
    resumed run trains to the end of its schedule, as a full --resume command line does."""

    def parse_args(self, ctx, args):
        words = list(args)
        if "--resume" in words and not any(w == "--config" or w.startswith("--config=") for w in words):
            default = next(p.default for p in self.params if p.name == "out")
            config = Path(_out_argument(words) or default) / "config.json"
            if not config.is_file():
                raise ChxError(f"--resume: {config} does not exist, so {config.parent} holds no run to "
                               f"resume; give the run's folder as -o, or run without --resume to start")
            from chx.config import config_values

            values = config_values(config, self.name, _option_specs(self))
            values.pop("max_steps", None)   # a run stopped by --max-steps goes on to its end
            ctx.default_map = {**values, **(ctx.default_map or {})}
        return super().parse_args(ctx, args)


def _refuse_existing(out: Path, overwrite: bool, kind: str, why: str = "", option: str = "-o") -> None:
    """THE overwrite rule (:func:`chx.atomic.check_output`): an existing output is replaced only with
    --overwrite and only when it is chx's output of ``kind``; anything else is refused by name."""
    from chx.atomic import check_output

    check_output(out, kind, overwrite, option=option, why=why)


def _images_of(manifest, images, *, required: bool = True):
    """--images, else the images root ``manifest`` records (`chx prepare --images`; one line when it
    records none or it no longer exists). ``required=False``: None when it records none."""
    if manifest is None or images:
        return images
    from chx.pipeline.prepare import images_of
    return images_of(manifest, images, required=required)


def _values_then_extras(option: str, values, extras) -> list:
    """An option that takes several values (``--files a b``): click gives the first value to the
    option and the rest as extra arguments; extra arguments without the option are a mistake."""
    if extras and not values:
        raise ChxError(f"unexpected argument(s) {' '.join(map(str, extras))}; did you mean {option} "
                       f"{' '.join(map(str, extras))}?")
    return [*values, *extras]


def _report_fit(result) -> None:
    if result.interrupted:
        sys.exit(128 + int(result.interrupted))
    m = result.last_metrics or {}
    summary = f"; val mAP {m['mAP']:.4f}, mAUC {m['mAUC']:.4f}" if "mAP" in m else ""
    if "baseline_mAP" in m:
        summary += f" (class-prior baseline: mAP {m['baseline_mAP']:.4f}, mAUC {m['baseline_mAUC']:.4f})"
    best = f" (best val mAP {result.best_metric:.4f})" if result.best_metric not in (None, float("-inf")) else ""
    click.echo(f"trained {result.step} steps{summary}{best}; run folder {result.out}")
