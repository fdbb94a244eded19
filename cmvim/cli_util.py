"""Shared bits of the command-line entry points."""
from __future__ import annotations

import argparse
import socket

from . import __version__
from .config import ConfigError, split_override


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
