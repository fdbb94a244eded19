"""`cmvim-client`: a hospital's Flower SuperNode (issue #6) and `cmvim-client check` (issue #3)."""
import sys

from cmvim.cli_util import not_yet


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        return not_yet("cmvim-client check", 3, "the site data check")
    return not_yet("cmvim-client", 6, "the hospital SuperNode")


if __name__ == "__main__":
    sys.exit(main())
