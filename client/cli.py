"""`cmvim-client`: a hospital's side of cmvim.

    cmvim-client check --data DIR       is this site folder ready? (runs locally, sends nothing)
    cmvim-client --site A --data DIR --server HOST:PORT --root-cert ca.crt --auth-key A.key [--policy FILE]
                                        join a federation as a Flower SuperNode (see docs/deploy.md)
"""
from __future__ import annotations

import argparse
import sys

from cmvim.cli_util import add_version

from . import check, join


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        parser = argparse.ArgumentParser(prog="cmvim-client check", description=check.__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        check.add_arguments(parser)
        add_version(parser)
        args = parser.parse_args(argv[1:])
        return check.check_from_args(args)
    parser = argparse.ArgumentParser(prog="cmvim-client", description=join.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Check a site folder without joining: cmvim-client check --data DIR")
    join.add_arguments(parser)
    add_version(parser)
    return join.join(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
