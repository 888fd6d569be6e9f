"""The `chx` command line. Thin: parses options and calls `chx.pipeline` functions.

One module per command group (data, train, evaluate, inference, demo) registers its commands on
:data:`cli` in the pipeline's order; every option is a field of a dataclass in :mod:`chx.options`
(:mod:`chx.cli.options` makes the click options). User mistakes (:class:`chx.errors.ChxError`)
print one line and exit with code 2, never a traceback.
"""

from __future__ import annotations

import signal
import sys

import click

from chx.cli._base import _option_specs, cli
from chx.cli import data, train, evaluate, inference, demo  # noqa: E402,F401  (register the commands)
from chx.errors import ChxError, Interrupted
from chx.workers import end_children

__all__ = ["cli", "main", "_option_specs"]



def _one_line(error: ChxError) -> str:
    """The user's message, also when a DataLoader worker raised it (torch re-raises it in the main
    process with the worker's traceback prepended: keep the original message only)."""
    message = str(error)
    if "Original Traceback" in message:
        last = [line for line in message.strip().splitlines() if line.strip()][-1]
        prefix = f"{type(error).__module__}.{type(error).__name__}: "
        message = last[len(prefix):] if last.startswith(prefix) else last
    return message


class _Terminated(BaseException):
    """SIGTERM outside a training loop: unwinds like Ctrl-C, so that ``finally`` blocks (temp files,
    DataLoader workers, store handles) run before chx exits with 143."""


def _raise_terminated(signum, frame):
    raise _Terminated


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 2. Every exit path
    (success, a user error, any exception, SIGINT, SIGTERM) ends the child processes chx started."""
    old_term = _set_signal(signal.SIGTERM, _raise_terminated)
    try:
        rc = cli.main(args=argv, prog_name="chx", standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except click.exceptions.Abort:   # click's form of Ctrl-C (KeyboardInterrupt)
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        # One line, like every other user error: what is wrong and where to read more.
        hint = ""
        ctx = getattr(e, "ctx", None)
        if ctx is not None:
            hint = f" (see `{ctx.command_path} --help`)"
        click.echo(f"error: {e.format_message()}{hint}", err=True)
        sys.exit(e.exit_code)
    except ChxError as e:
        click.echo(f"error: {_one_line(e)}", err=True)
        sys.exit(2)
    except Interrupted as e:
        click.echo(str(e), err=True)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except _Terminated:
        click.echo("terminated", err=True)
        sys.exit(128 + signal.SIGTERM)
    except BrokenPipeError:
        sys.exit(1)
    finally:
        end_children()
        _set_signal(signal.SIGTERM, old_term)


def _set_signal(signum, handler):
    """Install a handler; returns the old one (None off the main thread, where Python allows none)."""
    if handler is None:
        return None
    try:
        return signal.signal(signum, handler)
    except ValueError:
        return None
