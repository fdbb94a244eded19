"""`cmvim-server`: the coordinator (Flower SuperLink + the cmvim run) (issue #6)."""
import sys

from cmvim.cli_util import not_yet


def main(argv=None) -> int:
    return not_yet("cmvim-server", 6, "the coordinator on Flower's deployment engine")


if __name__ == "__main__":
    sys.exit(main())
