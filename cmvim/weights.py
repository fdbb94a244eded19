"""Model weights in and out of a phase: the model a phase trains, the global model a phase
starts from (fine-tuning from this run's pretrained encoder, a weights file, or fresh), and
weights files read safely."""
from __future__ import annotations

from typing import Mapping

import torch

from .config import ConfigError
from .model import CMViM, CMViMClassifier
from .names import Phase
from .run_config import RunConfig

State = Mapping[str, torch.Tensor]


def build_model(cfg: RunConfig, phase: Phase) -> torch.nn.Module:
    return CMViM(cfg.model) if phase == "pretrain" else CMViMClassifier(cfg.model)


def initial_state(cfg: RunConfig, phase: Phase, pretrained: State | None = None) -> dict[str, torch.Tensor]:
    """The global model a phase starts from: fine-tuning loads the pretrained image encoder (this
    run's, or the file `finetune_init` names) unless the config asks for a fresh one."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, phase)
    if phase != "pretrain" and cfg.finetune_init != "fresh":
        if cfg.finetune_init != "pretrained":
            pretrained = load_weights(cfg.finetune_init)
        if pretrained is not None:
            model.load_pretrained(pretrained)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """CMViM weights from a file: a state dict, or a cmvim checkpoint (its "arrays"), read with
    torch's weights-only loader (tensors and plain values only, never code)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"finetune_init: no such file {path!r} (use pretrained, fresh or a weights file)") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"finetune_init: {path!r} is not a weights file torch can read safely: {exc}") from None
    if isinstance(data, Mapping) and "arrays" in data:
        data = data["arrays"]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ConfigError(f"finetune_init: {path!r} holds no state dict of tensors")
    return dict(data)
