"""The polls on both ends of a deployed message (cmvim.flower_polls): short right after activity,
growing back to the configured interval; each patch rewrites exactly the waits it names, in the
functions it names, refuses a Flower whose waits differ, and is applied only where a process asks."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cmvim.flower_polls import (FLOWER_POLL, FLOWER_REPLY_WAIT, OBJECT_PULLS, PULLS, SERVER, SUPERNODE, Backoff,
                                FlowerChanged, hard_coded_waits, quicken_server_polls, quicken_supernode,
                                shorten_object_backoff)

ROOT = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_the_wait_grows_with_the_time_since_activity_up_to_the_slow_poll():
    clock = Clock()
    backoff = Backoff(fast=0.1, slow=1.0, ratio=0.1, clock=clock)
    assert backoff.interval() == 0.1                  # right after (construction counts as activity)
    clock.now += 0.5
    assert backoff.interval() == 0.1                  # 0.05 would be below fast
    clock.now += 3.5
    assert abs(backoff.interval() - 0.4) < 1e-12      # 4 s since: 0.1 x 4
    clock.now += 60
    assert backoff.interval() == 1.0                  # idle: the slow poll
    backoff.mark()
    assert backoff.interval() == 0.1


def test_an_idle_site_asks_no_more_often_than_a_fixed_poll_after_slow_over_ratio_seconds():
    clock = Clock()
    backoff = Backoff(fast=0.1, slow=1.0, ratio=0.1, clock=clock)
    asks = 0
    while clock.now < 100.0 + 60:
        clock.now += backoff.interval()
        asks += 1
    # 10 asks in the first second, ~23 from 1 to 10 s, then one a second: 60 s cost ~83 asks
    # where the fixed 1 s poll costs 60 and Flower's 3 s poll 20
    assert 75 <= asks <= 90, asks


def test_each_patch_rewrites_exactly_the_waits_flower_1_42_hard_codes():
    """The SuperNode's loop waits once (3 s, no work), its reply push twice (0.5 s: the reply, then
    each of the reply's objects, in memory); the ServerApp's send_and_receive once (3 s). A Flower
    release that adds, drops or changes one fails here and in the patch itself."""
    from flwr.superlink.grid import http_grid
    from flwr.supernode import start_client_internal

    assert SUPERNODE.counts() == {"start_client_internal": 1, "_push_messages": 2}
    assert SERVER.counts() == {"HttpGrid.send_and_receive": 1}
    assert sorted(hard_coded_waits(start_client_internal)) == [
        ("_push_messages", FLOWER_REPLY_WAIT), ("_push_messages.<locals>.yield_object_contents", FLOWER_REPLY_WAIT),
        ("start_client_internal", FLOWER_POLL)]
    assert hard_coded_waits(http_grid) == [("HttpGrid.send_and_receive", FLOWER_POLL)]
    assert sorted((w.function, w.seconds) for w in SUPERNODE.waits) == sorted(hard_coded_waits(start_client_internal))


FAKE_SUPERNODE = """
import time

def start_client_internal():
    time.sleep(3)

def _push_messages(**kwargs):
    def yield_object_contents():
        time.sleep(0.5)
        yield b"object"
    if kwargs.get("wait"):
        time.sleep(0.5)
    return list(yield_object_contents())
"""


def module_from(tmp_path: Path, name: str, source: str):
    """A module made from `source` on disk (the patches read their module's source, as Flower's)."""
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slept(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def test_the_supernode_asks_quickly_after_it_replied_and_slows_down_when_idle(tmp_path):
    module = module_from(tmp_path, "fake_supernode", FAKE_SUPERNODE)
    original = module._push_messages
    activity = quicken_supernode(poll=1.0, fast=0.1, module=module)
    activity.last -= 30                                 # a site idle for 30 s
    assert activity.interval() == 1.0
    assert module._push_messages(wait=True) == [b"object"]      # it replied: the wrapper marks the activity
    assert activity.interval() == 0.1
    assert slept(module.start_client_internal) < 0.5              # Flower's 3 s, right after a reply
    assert slept(lambda: module._push_messages(wait=True)) < 0.2  # both 0.5 s looks: 10 ms each
    # matched by the function that waits, not by the length: the same 3 s elsewhere is left as it is
    assert slept(lambda: module.time.sleep(0.05)) >= 0.05
    assert module.time.monotonic is time.monotonic
    assert quicken_supernode(poll=2.0, module=module) is activity  # twice: the same Backoff, wrapped once
    assert activity.slow == 2.0
    assert module._push_messages.__wrapped__ is original


def test_a_third_wait_or_a_changed_one_is_refused_and_nothing_is_patched(tmp_path):
    added = FAKE_SUPERNODE + "\ndef _pull_and_store_message():\n    time.sleep(0.5)\n"
    changed = FAKE_SUPERNODE.replace("time.sleep(3)", "time.sleep(2)")
    computed = FAKE_SUPERNODE.replace("time.sleep(3)", "time.sleep(3 if True else 1)")
    dropped = FAKE_SUPERNODE.replace("        time.sleep(0.5)\n    return", "        pass\n    return")
    for name, source in (("added", added), ("changed", changed), ("computed", computed), ("dropped", dropped)):
        module = module_from(tmp_path, f"supernode_{name}", source)
        original = module._push_messages
        with pytest.raises(FlowerChanged, match="expects exactly"):
            quicken_supernode(poll=1.0, module=module)
        assert module.time is time and module._push_messages is original, name


def test_the_server_asks_for_replies_quickly_after_sending(tmp_path):
    module = module_from(tmp_path, "fake_http_grid", """
        import time

        class HttpGrid:
            def send_and_receive(self, messages, *, timeout=None):
                time.sleep(3)
                return list(messages)
        """)
    activity = quicken_server_polls(poll=0.5, fast=0.05, module=module)
    activity.last -= 30
    assert activity.interval() == 0.5
    start = time.perf_counter()
    assert module.HttpGrid().send_and_receive([1, 2]) == [1, 2]      # marks, then sleeps the fast wait
    assert time.perf_counter() - start < 0.5
    assert activity.interval() == 0.05


def test_the_patches_apply_to_flowers_own_modules(monkeypatch):
    from flwr.superlink.grid import http_grid
    from flwr.supernode import start_client_internal

    for owner, name in ((start_client_internal, "time"), (start_client_internal, "_push_messages"),
                        (http_grid, "time"), (http_grid.HttpGrid, "send_and_receive")):
        monkeypatch.setattr(owner, name, getattr(owner, name))          # put back after the test
    push, send = start_client_internal._push_messages, http_grid.HttpGrid.send_and_receive
    activity = quicken_supernode(poll=1.0)
    assert quicken_supernode(poll=1.0) is activity
    assert start_client_internal._push_messages.__wrapped__ is push
    assert quicken_server_polls(poll=0.2) is quicken_server_polls(poll=0.2)
    assert http_grid.HttpGrid.send_and_receive.__wrapped__ is send
    assert start_client_internal.time.rules == {("start_client_internal", 3.0): "activity",
                                                ("_push_messages", 0.5): "reply",
                                                ("_push_messages.<locals>.yield_object_contents", 0.5): "reply"}


def saved_object_backoff(monkeypatch, module):
    """Flower's pull functions' defaults, put back after the test (the patch changes them in place)."""
    for name in PULLS:
        function = getattr(module, name)
        monkeypatch.setattr(function, "__kwdefaults__", dict(function.__kwdefaults__))
        monkeypatch.setattr(function, "_cmvim_flower_defaults", None, raising=False)
        monkeypatch.delattr(function, "_cmvim_flower_defaults")


def test_an_object_still_being_uploaded_is_fetched_soon_after_it_arrives(monkeypatch):
    """Flower retries an object not there yet after 1 s, doubling to 10 s; shortened, an object
    that arrives 0.3 s late is in hand well before Flower's first retry."""
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects

    saved_object_backoff(monkeypatch, inflatable_utils)
    shorten_object_backoff(0.05, 0.5)
    shorten_object_backoff(0.05, 0.5)                   # again: from its own values
    for name in PULLS:
        defaults = getattr(inflatable_utils, name).__kwdefaults__
        assert (defaults["initial_backoff"], defaults["backoff_cap"]) == (0.05, 0.5)
        # the same patience as Flower's: 500 tries at up to 10 s
        assert defaults["max_tries_per_object"] * 0.5 == 500 * 10
    start = time.monotonic()

    def pull(object_id):
        if time.monotonic() - start < 0.3:
            raise ObjectUnavailableError(object_id)
        return b"content"
    assert pull_objects(["a"], pull) == {"a": b"content"}
    assert time.monotonic() - start < 0.8


def test_the_object_backoff_patch_refuses_pulls_it_does_not_know(tmp_path):
    pulls = textwrap.dedent("""
        def pull_objects(ids, pull, *, max_tries_per_object=500, initial_backoff=1, backoff_cap=10):
            pass

        def pull_and_inflate_object_from_tree(tree, *, max_tries_per_object=500, initial_backoff=1, backoff_cap=10):
            pass
        """)
    third = pulls + "\ndef pull_one(i, *, initial_backoff=1):\n    pass\n"
    changed = pulls.replace("initial_backoff=1,", "initial_backoff=2,", 1)
    with pytest.raises(FlowerChanged, match="expects exactly"):
        shorten_object_backoff(module=module_from(tmp_path, "pulls_third", third))
    with pytest.raises(FlowerChanged, match="expects Flower 1.42's"):
        shorten_object_backoff(module=module_from(tmp_path, "pulls_changed", changed))
    module = module_from(tmp_path, "pulls_as_flower", pulls)
    shorten_object_backoff(0.05, 0.5, module=module)
    assert module.pull_objects.__kwdefaults__["initial_backoff"] == 0.05
    assert OBJECT_PULLS == "flwr.supercore.inflatable.inflatable_utils"


PATCHED = """
import time
from flwr.superlink.grid import http_grid
from flwr.supernode import start_client_internal
from flwr.supercore.inflatable import inflatable_utils
print(http_grid.time is time, start_client_internal.time is time,
      inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"])
"""


def test_no_patch_is_applied_on_import_and_the_server_apps_apply_theirs_in_their_lifespan():
    """Importing the apps and the processes' modules changes nothing in Flower; running a
    ServerApp (deployment or simulation) applies the ServerApp's patches before its main runs."""
    imports = ("import cmvim.server.app, cmvim.simulations.app, cmvim.server.superlink, cmvim.client.supernode, "
               "cmvim.client.worker, cmvim.client.approved_app\n")
    run = ("from flwr.app import Context\nfrom cmvim.config import ConfigError\n"
           "try:\n"
           "    APP.app(None, Context(run_id=1, node_id=0, node_config={}, state=None,\n"
           "                          run_config={'config-file': '/nonexistent.yaml'}))\n"
           "except ConfigError:\n"
           "    pass\n")
    for code, expected in ((imports, "True True 1"),
                           (imports.replace("import ", "import cmvim.server.app as APP, ", 1) + run, "False True 0.05"),
                           ("import cmvim.simulations.app as APP\n" + run, "False True 0.05")):
        proc = subprocess.run([sys.executable, "-c", code + PATCHED], capture_output=True, text=True, cwd=ROOT,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip().splitlines()[-1] == expected, code
