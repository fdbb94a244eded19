"""What the server and the sites share: the run config schema, message keys, and which
parameters travel in each phase. No Flower imports here: `client/` and `server/` turn
these into Flower messages.

A run's config is one YAML file (simulations/configs/*.yaml). Every site receives it with
each message, so a hospital's SuperNode needs no copy of its own (its site policy checks it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from torch import nn

from .config import from_dict, load_yaml, to_dict
from .data.augment import AugmentConfig
from .data.preprocess import PreprocessConfig
from .model.config import ModelConfig, model_config
from .privacy import PrivacyConfig

PHASES = ("pretrain", "finetune", "evaluate")

# message content keys
ARRAYS = "arrays"            # ArrayRecord: the shared parameters
CONFIG = "config"            # ConfigRecord: phase, round, run config (JSON)
METRICS = "metrics"          # MetricRecord: aggregate numbers only
SITE = "site"                # ConfigRecord: the site's name, and a public error message if it failed
RUN_CONFIG = "run-config"    # key in CONFIG holding the RunConfig as JSON
PHASE = "phase"
ROUND = "round"              # the absolute round within the phase (resume-safe)
SPLIT = "split"
RUN_KEY = "run-key"          # a stable name for the run (same after --resume): the sites' privacy ledgers use it


@dataclass
class CohortSpec:
    """Where the sites' data comes from: an existing folder of site folders, or a synthetic cohort."""
    path: str | None = None               # a folder holding <site>/manifest.csv; None = synthetic
    sites: int = 3
    subjects: int = 40
    shape: int = 64
    seed: int = 0
    effect_scale: float = 1.0
    site_names: list[str] | None = None   # use only these sites (default: every folder with a manifest)


@dataclass
class PhaseConfig:
    rounds: int = 3
    local_epochs: int = 1
    max_steps: int | None = None          # cap on local steps per round (None: whole epochs)
    lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 8


@dataclass
class StrategyConfig:
    name: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    proximal_mu: float = 0.01             # FedProx
    eta: float = 1e-2                     # FedAdam server learning rate
    eta_l: float = 1e-2
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_nodes: int = 2
    round_timeout: float = 3600.0


@dataclass
class EvaluationConfig:
    bootstrap: int = 1000                 # resamples for the AUC's 95 % CI
    histogram_bins: int = 50              # score histograms shared for the pooled AUC
    every_round: bool = True              # validation metrics after each fine-tuning round


@dataclass
class RunConfig:
    seed: int = 0
    cohort: CohortSpec = field(default_factory=CohortSpec)
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny"})
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)     # pretraining augmentations
    # where fine-tuning starts: the pretrained global encoder (the method) or a fresh one (the
    # control; on small CPU schedules short pretraining has measured worse, see README)
    finetune_init: Literal["pretrained", "fresh"] = "pretrained"
    modality_dropout: float = 0.3          # fine-tuning: hide a present PET this often (see ModalityDropout)
    pretrain: PhaseConfig = field(default_factory=lambda: PhaseConfig(rounds=3))
    finetune: PhaseConfig = field(default_factory=lambda: PhaseConfig(rounds=3, lr=5e-4))
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)   # train/val/test where the manifest is silent
    personalize: Literal["none", "head", "norm", "head+norm"] = "none"
    use_reports: bool = True
    threads_per_site: int = 1
    baselines: list[str] = field(default_factory=list)     # "local", "centralized"
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)   # sample-level DP-SGD at every site

    def __post_init__(self):
        if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1) > 1e-6 or min(self.split_fractions) < 0:
            raise ValueError(f"split_fractions must be three non-negative numbers summing to 1, got {self.split_fractions}")
        unknown = set(self.baselines) - {"local", "centralized"}
        if unknown:
            raise ValueError(f"baselines: unknown {sorted(unknown)}; use 'local' and/or 'centralized'")
        mc = self.model_config()
        if mc.img_size != self.preprocess.shape:
            raise ValueError(f"preprocess.shape ({self.preprocess.shape}) must equal the model's img_size "
                             f"({mc.img_size})")

    def model_config(self) -> ModelConfig:
        return model_config(dict(self.model))

    def phase(self, name: str) -> PhaseConfig:
        return {"pretrain": self.pretrain, "finetune": self.finetune}[name]

    def to_json(self) -> str:
        return json.dumps(to_dict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        return run_config(json.loads(text))


def run_config(spec: str | Path | Mapping | None = None, **overrides) -> RunConfig:
    """A RunConfig from a YAML file or a mapping; unknown keys are errors that name them."""
    data = load_yaml(spec) if isinstance(spec, (str, Path)) else dict(spec or {})
    data.update(overrides)
    return from_dict(RunConfig, data, "run")


def shared_parameter_names(model: nn.Module, phase: str, personalize: str = "none") -> list[str]:
    """The parameters that travel between server and sites in `phase` (state-dict names).

    pretrain: everything (image encoder, projector, decoders, report encoder, momentum encoder).
    finetune/evaluate: the image encoder and the head, except what `personalize` keeps at the
    site: "head" (the linear head), "norm" (every RMSNorm weight), or both.
    """
    names = list(model.state_dict())
    if phase == "pretrain":
        return names
    local_head = "head" in personalize
    local_norm = "norm" in personalize
    shared = []
    for name in names:
        if local_head and name.startswith("head."):
            continue
        if local_norm and (".norm." in name or ".norm_f." in name or name.endswith(("norm.weight", "norm_f.weight"))):
            continue
        shared.append(name)
    return shared


__all__ = ["PHASES", "ARRAYS", "CONFIG", "METRICS", "SITE", "RUN_CONFIG", "PHASE", "ROUND", "SPLIT", "CohortSpec",
           "PhaseConfig", "StrategyConfig", "EvaluationConfig", "RunConfig", "run_config", "shared_parameter_names"]
