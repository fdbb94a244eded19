"""Local training steps: the one place the federated client, the centralized and
the local-only baselines all train through."""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from .model import CMViM


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no decay on biases, norms, embeddings and SSM A_log/D (as MAE/Vim)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or getattr(param, "_no_weight_decay", False) or name.endswith(
                ("pos_embed", "modality_embed", "token", "tokens")):
            no_decay.append(param)
        else:
            decay.append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def pretrain_step(model: CMViM, batch: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                  generator: torch.Generator | None = None, grad_clip: float | None = 1.0) -> dict[str, float]:
    """One self-supervised step (and the momentum-encoder update). Returns the loss terms."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    out = model(batch, generator)
    out.loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    model.update_momentum()
    return {"loss": float(out.loss.detach()), **out.terms}


@torch.no_grad()
def pretrain_losses(model: CMViM, batches: Iterable[Mapping[str, torch.Tensor]], seed: int = 0) -> dict[str, float]:
    """Mean loss terms over `batches` with fixed maskings (seeded), without training."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    totals: dict[str, float] = {}
    count = 0
    for batch in batches:
        out = model(batch, generator)
        for key, value in {"loss": float(out.loss), **out.terms}.items():
            totals[key] = totals.get(key, 0.0) + value
        count += 1
    return {k: v / max(count, 1) for k, v in totals.items()}
