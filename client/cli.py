"""`cmvim-client`: a hospital's side of cmvim.

    cmvim-client keygen --site A --out DIR   this site's SuperNode key pair, made here: send only DIR/sites/A.pub
    cmvim-client check --data DIR       is this site folder ready? (runs locally, sends nothing)
    cmvim-client predict --model DIR --data DIR --out FILE.csv
                                        score every subject-visit with a run's exported model (locally)
    cmvim-client --site A --data DIR --server HOST:PORT --root-cert ca.crt --auth-key A.key [--policy FILE]
                                        join a federation as a Flower SuperNode (see docs/deploy.md)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cmvim.cli_util import add_version
from cmvim.deploy.certs import make_site_keys

from . import check, join, predict


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keygen"]:
        parser = argparse.ArgumentParser(prog="cmvim-client keygen", description="Make this site's SuperNode key "
                                         "pair at the site: the private key (0600) never leaves it; send the .pub "
                                         "file to the coordinator, who registers it.")
        parser.add_argument("--site", required=True, help="the site's name (letters, digits, '-', '_')")
        parser.add_argument("--out", required=True, type=Path, help="folder: writes sites/<site>.key and .pub")
        add_version(parser)
        args = parser.parse_args(argv[1:])
        try:
            make_site_keys(args.out, args.site)
        except (FileExistsError, ValueError) as err:
            print(f"cmvim-client keygen: {err}", file=sys.stderr)
            return 1
        print(f"wrote {args.out / 'sites' / (args.site + '.key')} (secret: stays here, use it as --auth-key) and "
              f"{args.out / 'sites' / (args.site + '.pub')} (send it to the coordinator)")
        return 0
    if argv[:1] == ["check"]:
        parser = argparse.ArgumentParser(prog="cmvim-client check", description=check.__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        check.add_arguments(parser)
        add_version(parser)
        args = parser.parse_args(argv[1:])
        return check.check_from_args(args)
    if argv[:1] == ["predict"]:
        parser = argparse.ArgumentParser(prog="cmvim-client predict", description=predict.__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        predict.add_arguments(parser)
        add_version(parser)
        return predict.predict_from_args(parser.parse_args(argv[1:]))
    parser = argparse.ArgumentParser(prog="cmvim-client", description=join.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Check a site folder without joining: cmvim-client check --data DIR")
    join.add_arguments(parser)
    add_version(parser)
    return join.join(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
