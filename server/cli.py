"""`cmvim-server`: the coordinator: a Flower SuperLink (TLS and SuperNode authentication on by
default) and the cmvim run submitted to it. See server/deploy.py and docs/deploy.md."""
import argparse
import sys

from cmvim.cli_util import HelpFormatter, add_version

from . import deploy


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmvim-server", description=deploy.__doc__, formatter_class=HelpFormatter)
    deploy.add_arguments(parser)
    add_version(parser)
    return parser


def main(argv=None) -> int:
    return deploy.serve(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
