"""Shorter waits in Flower 1.42's hard-coded polls, in our own processes, applied explicitly.

Flower's SuperNode asks the SuperLink for work every 3 s when there was none, its ServerApp asks
for the sites' replies every 3 s, and a message's objects not pushed yet are retried after 1 s
doubling to 10 s. With the warm site worker a small model's round is a few seconds of work, so
those waits were most of it. Each patch here is applied by the process that needs it (the
SuperNode's main, the ServerApp's lifespan, the site worker), never on import, and applying it
again changes nothing but its settings.

A patch rewrites only the waits it names: each `Wait` is one `time.sleep(<seconds>)` call in one
function of a Flower module, and a patch refuses (FlowerChanged) a module whose `time.sleep`
calls are not exactly the ones it names, so a Flower release that adds, removes, moves or
changes a wait fails loudly instead of being rewritten (or missed) silently.
"""
from __future__ import annotations

import ast
import functools
import importlib
import inspect
import sys
import time
from dataclasses import dataclass
from types import ModuleType

FLOWER_POLL = 3.0           # Flower 1.42's hard-coded poll on both ends of a message
FLOWER_REPLY_WAIT = 0.5     # the SuperNode's looks into its own memory for a reply (and the reply's objects)


class FlowerChanged(RuntimeError):
    """The installed Flower is not the code a patch here was written for (flwr 1.42)."""


class Backoff:
    """A poll's wait that is short right after activity and grows with the time since it, up to
    `slow`: clamp(ratio x seconds since `mark()`, fast, slow) (a relative backoff). Right after a
    site replied, the next message of a round is usually a second or two away; an idle
    federation's polls slow back down to `slow` within slow/ratio seconds."""

    def __init__(self, fast: float, slow: float, ratio: float = 0.1, clock=None):
        self.fast, self.slow, self.ratio = fast, max(fast, slow), ratio
        self.clock = clock or time.monotonic
        self.last = self.clock()

    def mark(self) -> None:
        self.last = self.clock()

    def interval(self) -> float:
        return min(self.slow, max(self.fast, self.ratio * (self.clock() - self.last)))


@dataclass(frozen=True)
class Wait:
    """One hard-coded `time.sleep(seconds)` in `function` (its qualified name: `Class.method`,
    `outer.<locals>.inner`), shortened to the interval of the patch's Backoff named `role`."""
    function: str
    seconds: float
    role: str
    why: str


@dataclass(frozen=True)
class PollPatch:
    """Every `time.sleep` call of one Flower module, and the function whose calls mark activity."""
    module: str
    waits: tuple[Wait, ...]
    marks: str              # attribute path in the module: its calls and returns mark every Backoff

    def counts(self) -> dict[str, int]:
        """How many waits the patch rewrites per top-level function of the module."""
        counts: dict[str, int] = {}
        for wait in self.waits:
            top = wait.function.split(".<locals>.")[0]
            counts[top] = counts.get(top, 0) + 1
        return counts


SUPERNODE = PollPatch("flwr.supernode.start_client_internal", (
    Wait("start_client_internal", FLOWER_POLL, "activity",
         "no message for this node: ask the SuperLink again (one HTTPS request to the coordinator)"),
    Wait("_push_messages", FLOWER_REPLY_WAIT, "reply",
         "the ClientApp's reply is not in this node's memory yet"),
    Wait("_push_messages.<locals>.yield_object_contents", FLOWER_REPLY_WAIT, "reply",
         "an object of the reply is not in this node's object store yet (the ClientApp is still pushing it)"),
), marks="_push_messages")

SERVER = PollPatch("flwr.superlink.grid.http_grid", (
    Wait("HttpGrid.send_and_receive", FLOWER_POLL, "activity",
         "not every site has replied: ask the SuperLink again (a request on the coordinator's loopback)"),
), marks="HttpGrid.send_and_receive")

OBJECT_PULLS = "flwr.supercore.inflatable.inflatable_utils"
# Flower 1.42's keyword defaults of its object pulls: every function of OBJECT_PULLS taking them
FLOWER_OBJECT_BACKOFF = {"initial_backoff": 1, "backoff_cap": 10, "max_tries_per_object": 500}
PULLS = ("pull_objects", "pull_and_inflate_object_from_tree")


def hard_coded_waits(module: ModuleType) -> list[tuple[str, float | None]]:
    """Every `time.sleep(...)` call in `module`'s source: (the qualified name of the function it
    is in, its seconds; None when not a number), sorted."""
    found: list[tuple[str, float | None]] = []

    def visit(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, scope + [child.name, "<locals>"])
            elif isinstance(child, ast.ClassDef):
                visit(child, scope + [child.name])
            else:
                if (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
                        and child.func.attr == "sleep" and isinstance(child.func.value, ast.Name)
                        and child.func.value.id == "time"):
                    argument = child.args[0] if len(child.args) == 1 and not child.keywords else None
                    seconds = argument.value if isinstance(argument, ast.Constant) else None
                    name = ".".join(scope[:-1] if scope and scope[-1] == "<locals>" else scope) or "<module>"
                    found.append((name, float(seconds) if isinstance(seconds, (int, float)) else None))
                visit(child, scope)

    visit(ast.parse(inspect.getsource(module)), [])
    return sorted(found, key=repr)


def _check_waits(module: ModuleType, patch: PollPatch) -> None:
    found = hard_coded_waits(module)
    named = sorted(((w.function, float(w.seconds)) for w in patch.waits), key=repr)
    if found != named:
        raise FlowerChanged(
            f"{module.__name__} ({module.__file__}) sleeps {found}, where cmvim.flower_polls expects exactly "
            f"{named} (flwr 1.42): this Flower's waits differ; read them before patching them "
            f"(cmvim/flower_polls.py, tests/test_polls.py)")


def _code_key(function: str) -> str:
    """How a running function names itself: its qualified name (Python 3.11+), its plain name before."""
    return function if sys.version_info >= (3, 11) else function.rsplit(".", 1)[-1]


class _Waits:
    """The `time` module as one Flower module sees it: the sleeps a patch names (by the function
    that calls them and their seconds) sleep their Backoff's interval; every other call is time's."""

    def __init__(self, patch: PollPatch, backoffs: dict[str, Backoff]):
        self._time, self.patch, self.backoffs = time, patch, backoffs
        self.rules = {(_code_key(w.function), float(w.seconds)): w.role for w in patch.waits}
        if len(self.rules) != len(patch.waits):
            raise FlowerChanged(f"{patch.module}: two waits of the same length in functions of the same name")

    def __getattr__(self, name):
        return getattr(self._time, name)

    def sleep(self, seconds: float) -> None:
        code = sys._getframe(1).f_code
        role = self.rules.get((getattr(code, "co_qualname", code.co_name), seconds))
        self._time.sleep(self.backoffs[role].interval() if role is not None else seconds)


def _marking(function, backoffs: dict[str, Backoff]):
    """`function`, marking every one of `backoffs` when it is called and when it returns."""
    def mark():
        for backoff in backoffs.values():
            backoff.mark()

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        mark()
        try:
            return function(*args, **kwargs)
        finally:
            mark()
    return wrapper


def apply_polls(patch: PollPatch, settings: dict[str, tuple[float, float]], module: ModuleType | None = None
                ) -> dict[str, Backoff]:
    """`patch` on `module` (default: the Flower module it names): each role's Backoff (fast, slow)
    from `settings`. Checks the module's waits first (FlowerChanged, nothing patched); a second
    application keeps the first's Backoffs and changes their settings. Returns them by role."""
    module = module if module is not None else importlib.import_module(patch.module)
    if set(settings) != {w.role for w in patch.waits}:
        raise ValueError(f"{patch.module}: settings for {sorted(settings)}, waits of {sorted({w.role for w in patch.waits})}")
    _check_waits(module, patch)
    current = module.__dict__.get("time")
    if isinstance(current, _Waits):                  # applied before: same Backoffs, new settings
        for role, (fast, slow) in settings.items():
            current.backoffs[role].fast, current.backoffs[role].slow = fast, max(fast, slow)
        return current.backoffs
    if current is not time:
        raise FlowerChanged(f"{patch.module} has no `time` module of its own to patch (found {current!r})")
    *path, name = patch.marks.split(".")
    owner = functools.reduce(getattr, path, module)
    backoffs = {role: Backoff(fast, slow) for role, (fast, slow) in settings.items()}
    waits = _Waits(patch, backoffs)
    setattr(owner, name, _marking(getattr(owner, name), backoffs))
    module.time = waits
    return backoffs


def quicken_supernode(poll: float, fast: float = 0.1, module: ModuleType | None = None) -> Backoff:
    """Flower's SuperNode, in this process: the ask for work waits `fast` s right after the site
    last sent a reply, growing with the time since (Backoff: ratio 0.1) back to `poll` s for an idle
    site; the looks for the reply and its objects (in this process's memory, free) every 10 ms, so a
    reply leaves within 10 ms of the site's work ending. Returns the activity Backoff (marked when
    a reply starts and ends)."""
    return apply_polls(SUPERNODE, {"activity": (fast, poll), "reply": (0.01, 0.01)}, module)["activity"]


def quicken_server_polls(poll: float, fast: float = 0.05, module: ModuleType | None = None) -> Backoff:
    """Flower's ServerApp (its HTTP Grid), in this process: the ask for the sites' replies waits
    `fast` s right after it sent the messages, growing with the time since (ratio 0.1) to `poll` s."""
    return apply_polls(SERVER, {"activity": (fast, poll)}, module)["activity"]


def shorten_object_backoff(initial: float = 0.05, cap: float = 0.5, module: ModuleType | None = None) -> None:
    """Flower pulls a message's objects with a backoff of 1 s doubling to 10 s when one is not there
    yet (the sender is still pushing it): on a small model's round, a second or more per message
    waiting for an object that arrived milliseconds later. Start at `initial`, cap at `cap`, with
    as many tries as give Flower's patience (500 tries at up to 10 s), in this process. Rewrites the
    keyword defaults of exactly PULLS, the functions of the module that have them, from Flower
    1.42's values (FlowerChanged otherwise); again, from its own."""
    module = module if module is not None else importlib.import_module(OBJECT_PULLS)
    wanted = {"initial_backoff": initial, "backoff_cap": cap, "max_tries_per_object": int(500 * 10 / cap)}
    having = sorted(name for name, value in vars(module).items()
                    if inspect.isfunction(value) and value.__module__ == module.__name__
                    and set(FLOWER_OBJECT_BACKOFF) & set(inspect.signature(value).parameters))
    if having != sorted(PULLS):
        raise FlowerChanged(f"{module.__name__}: the functions with an object backoff are {having}, where "
                            f"cmvim.flower_polls expects exactly {sorted(PULLS)} (flwr 1.42)")
    for name in PULLS:
        function = getattr(module, name)
        defaults = function.__kwdefaults__ or {}
        before = getattr(function, "_cmvim_flower_defaults", None)
        found = {key: defaults.get(key) for key in FLOWER_OBJECT_BACKOFF}
        if before is None and found != FLOWER_OBJECT_BACKOFF:
            raise FlowerChanged(f"{module.__name__}.{name}'s object backoff is {found}, where cmvim.flower_polls "
                                f"expects Flower 1.42's {FLOWER_OBJECT_BACKOFF}")
        function._cmvim_flower_defaults = before or found
        defaults.update(wanted)
