"""Shared bits of the command-line entry points."""
from __future__ import annotations

import socket

from . import __version__


def add_version(parser) -> None:
    """`--version` on a command: the installed cmvim's version (one home: cmvim.__version__)."""
    parser.add_argument("--version", action="version", version=f"%(prog)s (cmvim) {__version__}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
