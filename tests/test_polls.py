"""The polls on both ends of a deployed message (cmvim.flower_process): short right after activity,
growing back to the configured interval, and still aimed at the waits Flower 1.42 hard-codes."""
from __future__ import annotations

import inspect
import time
import types

from cmvim.flower_process import FLOWER_POLL, FLOWER_REPLY_WAIT, Backoff, quicken_server_polls, quicken_supernode


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


def fake_supernode():
    calls = []

    def _push_messages(**kwargs):
        calls.append(kwargs)
    return types.SimpleNamespace(time=time, _push_messages=_push_messages), calls


def test_the_supernode_asks_quickly_after_it_replied_and_slows_down_when_idle():
    module, calls = fake_supernode()
    activity = quicken_supernode(module, poll=1.0, fast=0.1)
    activity.last -= 30                                 # a site idle for 30 s
    assert module.time.rules[FLOWER_POLL].interval() == 1.0
    module._push_messages(state="s")                    # it replied: the wrapper marks the activity
    assert calls == [{"state": "s"}]
    assert module.time.rules[FLOWER_POLL].interval() == 0.1
    assert module.time.rules[FLOWER_REPLY_WAIT].interval() == 0.01
    start = time.perf_counter()
    module.time.sleep(FLOWER_POLL)                      # Flower's 3 s
    assert time.perf_counter() - start < 0.5
    start = time.perf_counter()
    module.time.sleep(0.05)                             # a wait it does not know stays as it is
    assert time.perf_counter() - start >= 0.05
    quicken_supernode(module, poll=1.0)                 # twice: wrapped once
    assert module._push_messages.__wrapped__.__name__ == "_push_messages"
    assert not hasattr(module._push_messages.__wrapped__, "__wrapped__")


def test_the_waits_replaced_are_the_ones_flower_hard_codes():
    """A Flower upgrade that changes these waits would leave the rules aimed at nothing."""
    from flwr.superlink.grid import http_grid
    from flwr.supernode import start_client_internal

    loop = inspect.getsource(start_client_internal.start_client_internal)
    push = inspect.getsource(start_client_internal._push_messages)
    assert f"time.sleep({FLOWER_POLL:g})" in loop
    assert f"time.sleep({FLOWER_REPLY_WAIT:g})" in push
    assert "_push_messages(" in loop
    assert f"time.sleep({FLOWER_POLL:g})" in inspect.getsource(http_grid.HttpGrid.send_and_receive)


def test_the_server_asks_for_replies_quickly_after_sending(monkeypatch):
    grid_class = type("HttpGrid", (), {"send_and_receive": lambda self, messages, timeout=None: list(messages)})
    module = types.SimpleNamespace(time=time, HttpGrid=grid_class)
    activity = quicken_server_polls(module, poll=0.5, fast=0.05)
    activity.last -= 30
    assert module.time.rules[FLOWER_POLL].interval() == 0.5
    assert grid_class().send_and_receive([1, 2]) == [1, 2]
    assert module.time.rules[FLOWER_POLL].interval() == 0.05


def test_an_object_still_being_uploaded_is_fetched_soon_after_it_arrives():
    """Flower retries an object not there yet after 1 s, doubling to 10 s; shortened, an object
    that arrives 0.3 s late is in hand well before Flower's first retry."""
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects

    from cmvim.flower_process import shorten_object_backoff
    functions = [pull_objects, inflatable_utils.pull_and_inflate_object_from_tree]
    saved = [dict(f.__kwdefaults__) for f in functions]
    try:
        shorten_object_backoff(0.05, 0.5)
        assert pull_objects.__kwdefaults__["initial_backoff"] == 0.05
        assert pull_objects.__kwdefaults__["backoff_cap"] == 0.5
        # the same patience as Flower's: 500 tries at up to 10 s
        assert pull_objects.__kwdefaults__["max_tries_per_object"] * 0.5 == 500 * 10
        start = time.monotonic()

        def pull(object_id):
            if time.monotonic() - start < 0.3:
                raise ObjectUnavailableError(object_id)
            return b"content"
        assert inflatable_utils.pull_objects(["a"], pull) == {"a": b"content"}
        assert time.monotonic() - start < 0.8
    finally:
        for function, defaults in zip(functions, saved):
            function.__kwdefaults__.clear()
            function.__kwdefaults__.update(defaults)
