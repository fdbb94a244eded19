"""Commands that explain themselves (issue #31): every command README.md names, and each
`cmvim-client` subcommand, answers --help as a real process, exit 0, with its options' defaults;
and every flag the docs show for a cmvim command exists in that command's --help."""
import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cmvim.client.cli import SUBCOMMANDS
from cmvim.server.cli import build_parser as server_parser
from cmvim.simulations.cli import build_parser as sim_parser
from cmvim.simulations.cohort_cli import build_parser as cohort_parser

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SCRIPTS = ("cmvim-client", "cmvim-server", "cmvim-sim", "cmvim-cohort", "cmvim-certs")
NOTHING_DEFAULTED = {("cmvim-client", "keygen")}       # --site and --out: both required
COMMANDS = [("cmvim-sim",), ("cmvim-cohort",), ("cmvim-server",), ("cmvim-certs",), ("cmvim-client",),
            *(("cmvim-client", name) for name in SUBCOMMANDS)]


def _subcommand_parser(name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    SUBCOMMANDS[name][2](parser)
    return parser


# the parsers our help formatter prints, to know which options have a default worth saying
PARSERS = {("cmvim-server",): server_parser, ("cmvim-sim",): sim_parser, ("cmvim-cohort",): cohort_parser,
           **{("cmvim-client", name): (lambda name=name: _subcommand_parser(name)) for name in SUBCOMMANDS}}


@pytest.fixture(scope="module")
def helps() -> dict[tuple, str]:
    """Each command's --help output, from the installed console scripts, all started at once."""
    env = dict(os.environ, COLUMNS="200")
    procs = {cmd: subprocess.Popen([str(BIN / cmd[0]), *cmd[1:], "--help"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env) for cmd in COMMANDS}
    outputs = {}
    for cmd, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{' '.join(cmd)} --help: exit {proc.returncode}\n{err}"
        outputs[cmd] = out
    return outputs


def test_readme_names_every_command():
    readme = (REPO / "README.md").read_text()
    for script in SCRIPTS:
        assert f"`{script} " in readme, script
    for name in SUBCOMMANDS:
        if name != "join":                       # the README shows join in its bare form
            assert f"`cmvim-client {name} " in readme, name


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_exits_0_and_says_defaults(helps, command):
    text = helps[command]
    assert text.startswith(f"usage: {' '.join(command)} "), text[:200]
    assert "default" in text or command in NOTHING_DEFAULTED


def test_client_help_lists_each_subcommand_in_one_line(helps):
    text = helps[("cmvim-client",)]
    for name in SUBCOMMANDS:
        assert re.search(rf"^    {name} +\S", text, re.M), name
    assert "cmvim-client --site A" in text          # the bare form still joins


def _option_blocks(text: str) -> dict[str, str]:
    """--flag -> the lines argparse printed for it (its usage and help, wrapped)."""
    blocks = {}
    for block in re.split(r"\n(?=  -)", text.split("options:", 1)[1]):
        head = block.strip().split("  ")[0]
        for flag in re.findall(r"--?[\w-]+", head):
            blocks[flag] = block
    return blocks


@pytest.mark.parametrize("command", list(PARSERS), ids=" ".join)
def test_every_default_is_in_the_help(helps, command):
    blocks = _option_blocks(helps[command])
    for action in PARSERS[command]()._actions:
        default = action.default
        if not action.option_strings or default is None or default is False or default == [] \
                or default is argparse.SUPPRESS:
            continue
        block = blocks[action.option_strings[-1]]
        assert "default" in block, f"{' '.join(command)} {action.option_strings[-1]}: default {default!r} not shown"


def test_predict_batch_size_and_server_wait_timeout_say_their_defaults(helps):
    assert "(default: 8)" in _option_blocks(helps[("cmvim-client", "predict")])["--batch-size"]
    assert "(default: 3600.0)" in _option_blocks(helps[("cmvim-server",)])["--wait-timeout"]
    assert "(default: 40)" in _option_blocks(helps[("cmvim-cohort",)])["--subjects"]


def documented_commands() -> list[tuple[str, tuple, str]]:
    """(where, command, the command line) for every cmvim command in a code span or block."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        fence = r"^[ \t]*```"                  # fenced blocks, also indented ones in lists
        code = re.findall(fence + r"[^\n]*\n(.*?)" + fence, text, re.M | re.S)
        code += re.findall(r"`([^`\n]+)`", re.sub(fence + r".*?" + fence, "", text, flags=re.M | re.S))
        for snippet in code:
            for line in snippet.replace("\\\n", " ").splitlines():
                for match in re.finditer(rf"(?<![\w/-])({'|'.join(SCRIPTS)})(?![\w-])", line):
                    rest = re.split(r"\s#|;|&&|\||`|(?<![\w/-])cmvim-", line[match.end():])[0]
                    command = (match.group(1),)
                    if command == ("cmvim-client",):
                        first = re.match(r"\s*(\w*)", rest).group(1)
                        command += (first if first in SUBCOMMANDS else "join",)
                    found.append((doc.name, command, match.group(1) + rest))
    return found


def test_every_documented_flag_exists(helps):
    commands = documented_commands()
    assert len(commands) > 30               # the docs are read: README's table alone has nine
    missing = []
    for where, command, line in commands:
        help_flags = set(re.findall(r"(?<![\w-])--[\w-]+", helps[command]))
        for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", line):
            if flag not in help_flags:
                missing.append(f"{where}: {' '.join(command)} has no {flag}: {line.strip()}")
    assert not missing, "\n".join(missing)


def test_markdown_tables_render_on_github_and_plain_ones_stay():
    from markdown_it import MarkdownIt          # Flower's rich renders Markdown with it: always installed

    from cmvim.tables import format_table
    headers, rows = ["n", "site", "d"], [[1, "A|B", 0.5], [12, "C", None]]
    html = MarkdownIt("commonmark").enable("table").render(format_table(headers, rows))
    assert html.count("</th>") == 3 and html.count("</td>") == 6, html
    assert '<td style="text-align:right">12</td>' in html and "<td>A|B</td>" in html
    assert format_table(headers, rows, markdown=False) == ("n   site  d\n"
                                                           "--  ----  ---\n"
                                                           " 1  A|B   0.5\n"
                                                           "12  C")
