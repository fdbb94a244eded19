"""`cmvim-client`: a hospital's side of cmvim.

    cmvim-client check --data DIR       is this site folder ready? (runs locally, sends nothing)
    cmvim-client --site A --data DIR    join a federated run as a Flower SuperNode (issue #6)
"""
from __future__ import annotations

import argparse
import sys

from cmvim.cli_util import not_yet

from . import check


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        parser = argparse.ArgumentParser(prog="cmvim-client check", description=check.__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        check.add_arguments(parser)
        args = parser.parse_args(argv[1:])
        return check.check_site(args.data, strict=args.strict)
    return not_yet("cmvim-client", 6, "the hospital SuperNode")


if __name__ == "__main__":
    sys.exit(main())
