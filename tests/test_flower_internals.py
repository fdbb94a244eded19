"""The room of Flower's internals (cmvim.flower_internals): every name it lists is where Flower
keeps it and is used through the room, and its guards go in front of Flower's functions once."""
from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

from cmvim import flower_internals
from cmvim.flower_internals import GUARDED, INTERNALS, guard

ROOT = Path(__file__).resolve().parent.parent
ROOM = ("cmvim/flower_internals.py", "cmvim/flower_polls.py", "cmvim/flower_process.py")


def test_every_internal_is_where_this_flower_keeps_it():
    """A Flower upgrade that moves or drops one fails here, all of them at once."""
    missing = []
    for name, (module, attribute) in INTERNALS.items():
        try:
            value = importlib.import_module(module)
            if attribute is not None:
                value = getattr(value, attribute)
        except (ImportError, AttributeError) as err:
            missing.append(f"{name}: {err}")
            continue
        assert getattr(flower_internals, name) is value
    assert missing == []
    for name, (module, attribute) in GUARDED.items():
        assert inspect.isfunction(getattr(importlib.import_module(module), attribute)), name


def test_every_internal_listed_is_used_through_the_room():
    """No name is kept for nobody: each is imported from cmvim.flower_internals outside the room,
    or awaited by a file that still takes it from Flower directly."""
    users = {}
    for folder in ("cmvim", "server", "client", "simulations", "deploy", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            if str(path.relative_to(ROOT)) not in ROOM and "flower_internals" in text:
                for name in INTERNALS:
                    if re.search(rf"\b{name}\b", text):
                        users.setdefault(name, []).append(str(path.relative_to(ROOT)))
    unused = sorted(set(INTERNALS) - set(users))
    assert unused == []


def test_a_name_outside_the_list_is_an_error_that_says_where_the_list_is():
    with pytest.raises(AttributeError, match="INTERNALS"):
        getattr(flower_internals, "start_client_internal")


def test_a_guard_goes_in_front_of_flowers_function_once(monkeypatch):
    module_name, attribute = GUARDED["fab install"]
    module = importlib.import_module(module_name)
    original = getattr(module, attribute)
    monkeypatch.setattr(module, attribute, original)          # put back after the test
    calls = []

    def wrap(function):
        def checked(*args, **kwargs):
            calls.append(args)
            return "refused"
        return checked
    assert guard("fab install", wrap) is True
    guarded = getattr(module, attribute)
    assert guard("fab install", wrap) is False and getattr(module, attribute) is guarded
    assert guarded(b"bundle") == "refused" and calls == [(b"bundle",)]
