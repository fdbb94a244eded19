"""`python -m cmvim.server.superlink [flower-superlink options]`: Flower's SuperLink, with its Fleet
API taking only replies from the sites (issue #30, findings 1 and 3).

Flower 1.42 checks a reply thoroughly (the message it answers must exist, be addressed to the
sender's node and still be alive; one reply per instruction; its TTL no longer than the
instruction's), but a pushed message with no `reply_to` is stored as a new instruction for any
node, with any size and TTL: a site could instruct another site, or fill the coordinator's
memory with messages to itself. A site never has a reason to send anything but replies, so this
SuperLink refuses, before anything is stored, every pushed message that is not one, and every
one whose sender is not the node the request authenticated (Flower matches a reply's stated
sender, not the authenticated one, against the instruction's destination: another site could
otherwise answer in a site's name). cmvim-server
starts it in place of `flower-superlink`; everything else is Flower's own.
"""
from __future__ import annotations

import sys

REFUSED = ("cmvim: the Fleet API accepts replies only (a message with reply_to); a site cannot send "
           "instructions")


NOT_YOURS = "cmvim: a site may push only its own replies (the message's sender is another node)"


def only_replies(push):
    """Flower's Fleet push handler, refusing any pushed message that is not a reply."""
    from flwr.supercore.error import ApiErrorCode, FlowerError

    def push_messages(request, state):
        if any(not m.metadata.reply_to_message_id for m in request.messages_list):
            raise FlowerError(ApiErrorCode.FLEET_RUN_STATUS_NOT_ALLOWED, REFUSED)
        # the request's node is the one its signature authenticated (Flower's node-auth middleware);
        # the reply's sender is what Flower matches against the instruction's destination
        if any(m.metadata.src_node_id != request.node.node_id for m in request.messages_list):
            raise FlowerError(ApiErrorCode.FLEET_RUN_STATUS_NOT_ALLOWED, NOT_YOURS)
        return push(request, state)

    push_messages.cmvim_only_replies = True
    return push_messages


def install() -> None:
    """Put the check in front of Flower's handler (its gRPC and HTTP servicers look it up on the
    module at each request)."""
    from flwr.superlink.servicer.fleet import fleet_handlers
    if not getattr(fleet_handlers.push_messages, "cmvim_only_replies", False):
        fleet_handlers.push_messages = only_replies(fleet_handlers.push_messages)


def main() -> None:
    install()
    from flwr.superlink.cli import flower_superlink
    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
