"""`python -m cmvim.client.supernode ARGS`: Flower's `flower-supernode` (same arguments), asking the
SuperLink for work 0.1 s after this site last replied, the wait growing with the time since up to
`CMVIM_SUPERNODE_POLL` seconds (default 1) for an idle site, instead of Flower's hard-coded 3 s
(cmvim.flower_polls.quicken_supernode): the pick-up delay of every message, a large share of a
round once the site worker is warm; and retrying an object the server is still uploading after
0.05 s, not 1 s (shorten_object_backoff). Both are applied here, before Flower's SuperNode starts.
`cmvim-client --poll-interval` sets the idle poll; each poll is one small HTTPS request to the
coordinator."""
from __future__ import annotations

import os

POLL_ENV = "CMVIM_SUPERNODE_POLL"


def main() -> None:
    from cmvim.flower_internals import flower_supernode
    from cmvim.flower_polls import quicken_supernode, shorten_object_backoff
    quicken_supernode(float(os.environ.get(POLL_ENV, "1.0")))
    shorten_object_backoff()
    flower_supernode()


if __name__ == "__main__":
    main()
