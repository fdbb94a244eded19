"""The site machine's other users (issue #30, finding 5): the warm site worker talks only to the
SuperNode its own `cmvim-client` started, and runs a task only under its own start-up settings.

Flower's Runtime API is plain HTTP on a loopback port: whoever binds that port first (another
local user, before the SuperNode starts or while it restarts) would otherwise hand the worker
tasks with a node config of their choosing (a permissive policy, their state folder) and read
what it answers. Two checks close that:

* **who listens.** Before it asks for a task and again before it reads one, the worker looks up
  the listening socket of its Runtime API port in the kernel's socket table (/proc/net/tcp and
  tcp6 on Linux) and talks to it only if the socket belongs to this site's user. Another user
  cannot make a socket that the kernel lists under the site's uid. (The worker's own requests
  carry the SuperExec secret, so the SuperNode knows the worker too: mutual.)
* **what a task may say.** The site's name, data folder, state folder, policy, device and the
  coordinator's public key come
  from the worker's command line, set by `cmvim-client`; a task whose node config says anything
  else did not come from this site's SuperNode and is refused before any data is read.
"""
from __future__ import annotations

import os
from pathlib import Path

SOCKET_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
LISTEN = "0A"


class ForeignRuntime(Exception):
    """The Runtime API or a task is not this site's; the message says whose and what to do."""


def listener_uids(port: int, tables=SOCKET_TABLES) -> set[int] | None:
    """The uids owning sockets that listen on `port` (any address); None where the kernel's
    socket table cannot be read (not Linux)."""
    found, readable = set(), False
    for table in tables:
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            fields = line.split()
            if len(fields) > 7 and fields[3] == LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(int(fields[7]))
    return found if readable else None


def check_runtime_owner(port: int, uid: int | None = None) -> None:
    """ForeignRuntime unless whatever listens on `port` is this site's user's (`uid`, default this
    process's). Nothing listening yet is not an error (the SuperNode is starting); an unreadable
    socket table (not Linux) is left to the SuperExec secret alone."""
    uid = os.getuid() if uid is None else uid
    owners = listener_uids(port)
    if owners and owners != {uid}:
        others = ", ".join(str(o) for o in sorted(owners - {uid}))
        raise ForeignRuntime(f"the Runtime API port {port} is held by another user (uid {others}), not this "
                             f"site's (uid {uid}): not asking it for tasks. Another local user bound it before the "
                             "site's SuperNode; stop that process, or restart cmvim-client (it picks a free port)")


SETTINGS = ("site", "data-dir", "state-dir", "policy", "device", "coordinator-key")


def own_node_config(context_config: dict, own: dict) -> dict:
    """The node config a task runs under: the worker's own start-up settings (`own`, from
    cmvim-client). ForeignRuntime if the task's says otherwise about any of them (it was not
    handed over by this site's SuperNode); Flower's own keys pass."""
    for key in SETTINGS:
        theirs, ours = context_config.get(key), own.get(key)
        if (theirs or None) != (ours or None):
            raise ForeignRuntime(f"a task arrived with node config {key}={theirs!r}, but this site's worker was "
                                 f"started with {ours!r}: it did not come from this site's SuperNode; refused "
                                 "before any data was read")
    return {**context_config, **{k: v for k, v in own.items() if v}}
