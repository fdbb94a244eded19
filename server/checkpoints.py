"""A run's checkpoints: after every round the global model, the strategy's state, the phase,
the round, the history and the central-DP account go to `<out>/checkpoints/`, and
`latest.json` points at the newest, so a stopped run resumes where it left off. Weights are saved
from and loaded onto the CPU: a checkpoint written where a GPU trained loads anywhere."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cmvim.device import to_cpu


@dataclass
class Checkpoint:
    phase: str
    round: int
    arrays: dict[str, torch.Tensor]
    strategy: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    central_dp: dict = field(default_factory=dict)     # Flower's accountant state, the sites it counts

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.phase}_round{self.round:03d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"phase": self.phase, "round": self.round, "arrays": to_cpu(self.arrays), "strategy": self.strategy,
                    "history": self.history, "rejected": self.rejected, "central_dp": self.central_dp}, tmp)
        tmp.replace(path)
        (folder / "latest.json").write_text(json.dumps({"file": path.name, "phase": self.phase, "round": self.round}))
        return path

    @classmethod
    def latest(cls, folder: Path) -> "Checkpoint | None":
        pointer = folder / "latest.json"
        if not pointer.exists():
            return None
        data = torch.load(folder / json.loads(pointer.read_text())["file"], map_location="cpu", weights_only=False)
        return cls(data["phase"], data["round"], data["arrays"], data["strategy"], data["history"],
                   data["rejected"], data.get("central_dp", {}))
