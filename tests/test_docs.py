"""Docs and CLI cannot drift: every `chx ...` command line shown in README.md and in the examples
of each command's --help parses with the real CLI (no unknown option, no missing value, no
"unexpected extra argument"). The commands themselves run end to end in the other tests."""

from __future__ import annotations

import inspect
import re
import shlex

import click
import pytest

from chx.cli import cli
from helpers import ROOT


def _command_lines(text: str) -> list[str]:
    """`chx ...` lines of indented code blocks (4+ spaces), backslash continuations joined."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i].strip()
        m = re.search(r"(?:^|\s-m\s)(chx\s.*)$", line) if lines[i].startswith("    ") else None
        if m and not line.startswith(("#", "|")):
            cmd = m.group(1)
            while cmd.endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd[:-1] + " " + lines[i].strip()
            out.append(re.sub(r"\s+#.*$", "", cmd).strip())
        i += 1
    return out


def _help_examples() -> list[tuple[str, str]]:
    found = []

    def walk(group: click.Group, prefix: str):
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                walk(cmd, f"{prefix} {name}")
            # examples are the indented lines of the help ("\b Examples:" blocks)
            indented = [ln for ln in inspect.cleandoc(cmd.help or "").splitlines() if ln.startswith("  ")]
            found.extend((f"{prefix} {name} --help", line)
                         for line in _command_lines("\n".join("    " + ln.strip() for ln in indented)))
    walk(cli, "chx")
    return found


README_LINES = [("README.md", line) for line in _command_lines((ROOT / "README.md").read_text())]
EXAMPLES = README_LINES + _help_examples()


def test_the_docs_show_commands():
    assert len(README_LINES) >= 20 and len(EXAMPLES) >= len(README_LINES) + 10


def _resolve(words: list[str]):
    cmd, path = cli, ["chx"]
    while isinstance(cmd, click.Group) and words and words[0] in cmd.commands:
        cmd = cmd.commands[words[0]]
        path.append(words.pop(0))
    return cmd, " ".join(path), words


@pytest.mark.parametrize("where, line", EXAMPLES, ids=[f"{w}: {ln[:60]}" for w, ln in EXAMPLES])
def test_documented_command_line_parses(where, line):
    words = [w for w in shlex.split(line)[1:] if w != "..."]       # drop "chx" and elisions
    cmd, name, args = _resolve(words)
    assert not isinstance(cmd, click.Group), f"{where}: `{line}` names no command"
    ctx = click.Context(cmd, info_name=name)
    parser = cmd.make_parser(ctx)
    try:
        _, positional, _ = parser.parse_args(args=list(args))
    except click.UsageError as e:
        pytest.fail(f"{where}: `{line}`: {e.format_message()}")
    # the parser hands positional words to the command's arguments; what is left over is what click
    # would refuse as "unexpected extra argument"
    assert not positional, f"{where}: `{line}`: unexpected extra argument(s) {positional}"
