"""`cmvim-client`: a hospital's side of cmvim. Each subcommand has its own --help.

    cmvim-client keygen --site A --out keys    this site's SuperNode key pair, made here: send only keys/sites/A.pub
    cmvim-client check --data DIR              is this site folder ready? (runs locally, sends nothing)
    cmvim-client predict --model DIR --data DIR --out FILE.csv
                                               score every subject-visit with a run's exported model (locally)
    cmvim-client join --site A --data DIR --server HOST:PORT --root-cert ca.crt \\
        --auth-key keys/sites/A.key --coordinator-key coordinator.pub [--policy FILE]
                                               join a federation as a Flower SuperNode (docs/deploy.md)

`join` is the default: `cmvim-client --site A --data DIR --server ...` (no subcommand) joins.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cmvim.cli_util import HelpFormatter, add_version
from cmvim.deploy.certs import make_site_keys

from . import check, join, predict

JOIN = "join"


KEYGEN_DOC = """`cmvim-client keygen --site A --out keys`: make this site's SuperNode key pair at the site.

keys/sites/A.key (0600) is the site's identity: it never leaves the site and is what
`cmvim-client join --auth-key` reads. Send keys/sites/A.pub to the coordinator, who
puts it in the folder `cmvim-server --site-keys` registers. Existing files are never
overwritten."""


def add_keygen_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--site", required=True, help="the site's name (letters, digits, '-', '_')")
    parser.add_argument("--out", required=True, type=Path, help="folder: writes sites/<site>.key and .pub")


def keygen(args: argparse.Namespace) -> int:
    try:
        make_site_keys(args.out, args.site)
    except (FileExistsError, ValueError) as err:
        print(f"cmvim-client keygen: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out / 'sites' / (args.site + '.key')} (secret: stays here, use it as --auth-key) and "
          f"{args.out / 'sites' / (args.site + '.pub')} (send it to the coordinator)")
    return 0


# name: (the one line the top-level --help shows, the subcommand's own description, its options, what runs)
SUBCOMMANDS = {
    JOIN: ("join a federation as a Flower SuperNode (the default: `cmvim-client --site A ...` joins)",
           join.__doc__, join.add_arguments, join.join),
    "check": ("is this site folder ready to join? (runs locally, sends nothing)",
              check.__doc__, check.add_arguments, check.check_from_args),
    "predict": ("score every subject-visit of a site folder with a run's exported model (locally)",
                predict.__doc__, predict.add_arguments, predict.predict_from_args),
    "keygen": ("make this site's SuperNode key pair here; send only the .pub to the coordinator",
               KEYGEN_DOC, add_keygen_arguments, keygen),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmvim-client", description=__doc__, formatter_class=HelpFormatter)
    add_version(parser)
    commands = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}",
                                     title="subcommands (each has its own --help)")
    for name, (summary, description, add_arguments, run) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=description, formatter_class=HelpFormatter)
        add_arguments(sub)
        add_version(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    # the form hospitals and containers already use, no subcommand, is `join`
    if argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv = [JOIN, *argv]
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
