"""`cmvim-cohort`: write synthetic multi-site cohorts as site folders (issue #4)."""
import sys

from cmvim.cli_util import not_yet


def main(argv=None) -> int:
    return not_yet("cmvim-cohort", 4, "the synthetic cohort writer")


if __name__ == "__main__":
    sys.exit(main())
