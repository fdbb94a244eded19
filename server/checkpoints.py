"""A run's checkpoints: after every round the global model, the strategy's state, the phase,
the round, the history and the central-DP account go to `<out>/checkpoints/`, and
`latest.json` points at the newest, so a stopped run resumes where it left off.

Written to survive a crash or a full disk: each file goes to a temporary name, is fsynced, then
renamed over the old one (and the folder fsynced), so a reader sees the old file or the new one,
never half of one. Reading trusts nothing: a checkpoint holds tensors and plain types only and
is loaded with `weights_only=True` (no pickled objects run), and when `latest.json` or the file it
names cannot be read, resume falls back to the newest checkpoint that can. Weights are saved
from and loaded onto the CPU: a checkpoint written where a GPU trained loads anywhere.
`keep_last` checkpoints of each phase stay (the last pretraining round is the pretrained
encoder, worth keeping after fine-tuning starts)."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cmvim.device import to_cpu
from cmvim.durable import write_atomic
from cmvim.names import RUN_PHASES, RunPhase

log = logging.getLogger("cmvim.server")

FORMAT = 2
_NAME = re.compile(rf"^({'|'.join(RUN_PHASES)})_round(\d+)\.pt$")


def _order(path: Path) -> tuple[int, int]:
    match = _NAME.match(path.name)
    return (RUN_PHASES.index(match.group(1)), int(match.group(2))) if match else (-1, -1)


class CheckpointError(Exception):
    """A checkpoint that cannot be read (the message names the file and why)."""


@dataclass
class Checkpoint:
    phase: RunPhase
    round: int
    arrays: dict[str, torch.Tensor]
    strategy: dict = field(default_factory=dict)       # {attribute: {name: ndarray}} (FedAdam's moments)
    history: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    central_dp: dict = field(default_factory=dict)     # Flower's accountant state, the sites it counts

    def save(self, folder: Path, keep_last: int | None = None) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.phase}_round{self.round:03d}.pt"
        payload = {"format": FORMAT, "phase": self.phase, "round": self.round, "arrays": to_cpu(self.arrays),
                   "strategy": {attr: {k: torch.from_numpy(np.asarray(v)) for k, v in value.items()}
                                for attr, value in self.strategy.items()},
                   # the rest as JSON text: plain types only, whatever a strategy or accountant put in
                   "state": json.dumps({"history": self.history, "rejected": self.rejected,
                                        "central_dp": self.central_dp})}
        write_atomic(path, lambda handle: torch.save(payload, handle))
        pointer = json.dumps({"file": path.name, "phase": self.phase, "round": self.round}).encode()
        write_atomic(folder / "latest.json", lambda handle: handle.write(pointer))
        if keep_last:
            self.prune(folder, keep_last, keep=path)
        return path

    @staticmethod
    def prune(folder: Path, keep_last: int, keep: Path) -> None:
        """Delete all but the newest `keep_last` checkpoints of each phase (never `keep`)."""
        for phase in RUN_PHASES:
            files = sorted((p for p in folder.glob(f"{phase}_round*.pt") if _NAME.match(p.name)), key=_order)
            for old in files[:-keep_last]:
                if old != keep:
                    old.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> "Checkpoint":
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise CheckpointError(f"{path.name}: not a cmvim checkpoint of format {FORMAT}")
            state = json.loads(data["state"])
            strategy = {attr: {k: v.numpy() for k, v in value.items()} for attr, value in data["strategy"].items()}
            return cls(data["phase"], int(data["round"]), dict(data["arrays"]), strategy, state["history"],
                       state["rejected"], state["central_dp"])
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001  (truncated, corrupt, or a pickle that weights_only refuses)
            raise CheckpointError(f"{path.name}: unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None

    @classmethod
    def latest(cls, folder: Path) -> "Checkpoint | None":
        """The checkpoint latest.json names, or, when it or that file cannot be read, the newest
        one that can (each one skipped is logged by name). None when there is none at all."""
        candidates = sorted((p for p in folder.glob("*_round*.pt") if _NAME.match(p.name)), key=_order, reverse=True)
        try:
            named = folder / json.loads((folder / "latest.json").read_text())["file"]
            if _NAME.match(named.name) and named in candidates:
                candidates.remove(named)
                candidates.insert(0, named)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("checkpoints: latest.json unreadable (%s); using the newest readable checkpoint", exc)
        for path in candidates:
            try:
                return cls.load(path)
            except CheckpointError as exc:
                log.warning("checkpoints: skipping %s", exc)
        return None


class BestRound:
    """The selection rule of finetune.select: best_val: the round with the best mean per-site
    validation AUC so far, the latest of equals; NaN (no site could score) never wins. The
    federated run keeps its choice on disk (BestModel); the baselines and benchmarks that train
    rounds in one process keep it in memory with the same rule (simulations.baselines.train_rounds)."""

    def __init__(self):
        self.round, self.score, self.value = 0, float("-inf"), None

    def offer(self, round_: int, score: float, value) -> bool:
        """Keep `value` (the round's model) if `score` is at least the best so far."""
        if not score >= self.score:            # NaN (no site could score) never wins
            return False
        self.keep(round_, score, value)
        self.round, self.score = round_, score
        return True

    def keep(self, round_: int, score: float, value) -> None:
        self.value = value


class BestModel(BestRound):
    """Early stopping on the validation split (BestRound's rule) for the federated run: the chosen
    round's arrays kept on disk beside the checkpoints (written like them), so a resumed run
    still knows it."""

    def __init__(self, folder: Path):
        super().__init__()
        self.path = folder / "finetune_best_val.pt"
        if self.path.exists():
            try:
                data = torch.load(self.path, map_location="cpu", weights_only=True)
                self.round, self.score = int(data["round"]), float(data["score"])
            except Exception as exc:  # noqa: BLE001 - unreadable: start the selection over, said
                log.warning("checkpoints: %s unreadable (%s); the selection starts over", self.path.name, exc)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        self.round, self.score = 0, float("-inf")

    def keep(self, round_: int, score: float, arrays: dict[str, torch.Tensor]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"round": round_, "score": score, "arrays": to_cpu(arrays)}
        write_atomic(self.path, lambda handle: torch.save(payload, handle))

    def arrays(self) -> dict[str, torch.Tensor] | None:
        if not self.round:
            return None
        return dict(torch.load(self.path, map_location="cpu", weights_only=True)["arrays"])
