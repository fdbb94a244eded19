"""Shared bits of the command-line entry points."""
from __future__ import annotations

import argparse
import copy
import importlib
import socket
import sys

from . import __version__
from .config import ConfigError, split_override


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every command's --help: descriptions keep their layout (the module docstrings are written as
    they should print) and every option says its default, including options whose help strings
    live in modules that never mention it. An option with no default (None, an unset flag, an
    empty list) or whose help already says it gets nothing added."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _default_to_say(action):       # argparse prints no help line at all for these
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        stated = action.help and "default" in action.help
        return super()._get_help_string(action) if _default_to_say(action) and not stated else action.help


def _default_to_say(action: argparse.Action) -> bool:
    default = action.default          # by identity: a default of 0 is worth saying, an unset flag's False is not
    return bool(action.option_strings) and not (default is None or default is False or default is argparse.SUPPRESS
                                                 or default == [])


def require_extra(command: str, extra: str, modules: tuple[str, ...]) -> None:
    """Exit 2 with the pip command when an optional extra's packages (pyproject.toml's
    [project.optional-dependencies]) do not import, instead of a traceback later."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            what = {"sim": "the simulation extra"}.get(extra, f"the {extra} extra")
            print(f"{command} needs {what}: pip install 'cmvim[{extra}]' ({exc})", file=sys.stderr)
            raise SystemExit(2) from None


def add_version(parser) -> None:
    """`--version` on a command: the installed cmvim's version (one home: cmvim.__version__)."""
    parser.add_argument("--version", action="version", version=f"%(prog)s (cmvim) {__version__}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _override(text: str) -> str:
    try:
        split_override(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_set_option(parser) -> None:
    """`--set KEY=VALUE` (repeatable): a run config setting over the YAML's, checked like it
    (cmvim.run_config.overridden)."""
    parser.add_argument("--set", dest="set", action="append", default=[], type=_override, metavar="KEY=VALUE",
                        help="override a run config setting, e.g. --set finetune.rounds=3 --set model.depth=2 "
                             "--set 'baselines=[linear]' (dotted keys for nested settings, values read as YAML; "
                             "repeatable; checked like the YAML)")
