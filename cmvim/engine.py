"""Local training: `train`, the one loop that every phase, DP-SGD, the federated client, the
baselines and the benchmarks train through, with the objectives it runs (`pretrain_loss`,
`classification_loss`) and the phase helpers built on it (`pretrain`, `finetune`, `probe`)."""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from .device import FP32, Precision, model_device, to_device
from .model import CMViM
from .protocol import NUM_EXAMPLES

LossFn = Callable[[nn.Module, Mapping], tuple[torch.Tensor, dict[str, float], int]]   # -> (loss, stats, batch size)


def _layer_id(name: str, depth: int) -> int:
    """Depth of a parameter for layer-wise lr decay: tokenizers/stand-ins 0, Vim block i -> i + 1,
    the final norm and the head depth + 1 (BEiT/MAE's fine-tuning recipe)."""
    if name.startswith("image.encoder.layers."):
        return int(name.split(".")[3]) + 1
    if name.startswith(("image.tokenizers.", "image.standins.")):
        return 0
    return depth + 1


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05,
                   layer_decay: float = 1.0) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no decay on biases, norms, embeddings and SSM A_log/D (as MAE/Vim).

    layer_decay < 1 scales each Vim block's lr by layer_decay ** (blocks above it), the tokenizers'
    by one more: the pretrained early layers move least (MAE fine-tuning).
    """
    depth = len(model.image.encoder.layers) if hasattr(model, "image") else 0
    groups: dict[tuple[float, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or getattr(param, "_no_weight_decay", False) or name.endswith(
            ("pos_embed", "modality_embed", "token", "tokens"))
        scale = layer_decay ** (depth + 1 - _layer_id(name, depth)) if layer_decay != 1.0 else 1.0
        groups.setdefault((scale, no_decay), []).append(param)
    return torch.optim.AdamW([{"params": params, "lr": lr * scale, "weight_decay": 0.0 if no_decay else weight_decay}
                              for (scale, no_decay), params in groups.items()], lr=lr, betas=(0.9, 0.95))


@torch.no_grad()
def pretrain_losses(model: CMViM, batches: Iterable[Mapping[str, torch.Tensor]], seed: int = 0,
                    precision: Precision = FP32) -> dict[str, float]:
    """Mean loss terms over `batches` with fixed maskings (seeded), without training."""
    model.eval()
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)         # masking draws on the CPU (patch.random_masking)
    totals: dict[str, float] = {}
    count = 0
    for batch in batches:
        with precision.autocast():
            out = model(to_device(batch, device), generator)
        for key, value in {"loss": float(out.loss), **out.terms}.items():
            totals[key] = totals.get(key, 0.0) + value
        count += 1
    return {k: v / max(count, 1) for k, v in totals.items()}


class ProximalTerm:
    """FedProx's mu/2 * ||w - w_global||^2 over the parameters the server shares."""

    def __init__(self, model: nn.Module, names: Iterable[str], mu: float):
        params = dict(model.named_parameters())
        self.pairs = [(params[n], params[n].detach().clone()) for n in names if n in params and params[n].requires_grad]
        self.mu = mu

    def __call__(self) -> torch.Tensor:
        return self.mu / 2 * sum(((p - g) ** 2).sum() for p, g in self.pairs)


def _batches(loader, epochs: int, max_steps: int | None):
    step = 0
    for epoch in range(epochs):
        dataset = getattr(loader, "dataset", None)      # a DataLoader (augmentations draw per epoch), or a list of batches
        if hasattr(dataset, "epoch"):
            dataset.epoch = epoch
        for batch in loader:
            if max_steps is not None and step >= max_steps:
                return
            yield batch
            step += 1


def train(model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
          prox: ProximalTerm | None = None, grad_clip: float | None = 1.0,
          after_step: Callable[[], None] | None = None, precision: Precision = FP32) -> dict[str, float]:
    """The one local training loop: every phase, DP-SGD (its Poisson batches and DP optimizer handed
    in), the baselines and the benchmarks run it. `loss_fn(model, batch) -> (loss, stats, n)`;
    returns each stat's mean over the samples seen and their number (NUM_EXAMPLES). Batches
    follow the model to its device; the forward pass runs in `precision` (autocast)."""
    model.train()
    device = model_device(model)
    totals: dict[str, float] = {}
    samples = 0
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            loss, stats, n = loss_fn(model, to_device(batch, device))
        precision.backward(loss + prox() if prox is not None else loss)
        if grad_clip:
            precision.unscale(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        precision.step(optimizer)
        if after_step is not None:
            after_step()
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value * n
        samples += n
    return {**{k: v / max(samples, 1) for k, v in totals.items()}, NUM_EXAMPLES: samples}


def pretrain_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict, int]:
    """CMViM's self-supervised objective on a batch: the loss and its terms."""
    out = model(batch)
    return out.loss, {"loss": float(out.loss.detach()), **out.terms}, len(batch["mri"])


def classification_loss(weights: torch.Tensor | None = None,
                        forward: Callable[[nn.Module, Mapping], torch.Tensor] = lambda m, b: m(b)) -> LossFn:
    """Class-weighted cross-entropy on `batch["label"]` (and the batch's accuracy)."""
    def loss_fn(model, batch):
        logits = forward(model, batch).float()
        loss = nn.functional.cross_entropy(logits, batch["label"],
                                           weight=weights.to(logits.device) if weights is not None else None)
        acc = float((logits.argmax(-1) == batch["label"]).float().mean())
        return loss, {"loss": float(loss.detach()), "acc": acc}, len(batch["label"])
    return loss_fn


def pretrain(model: CMViM, loader, optimizer: torch.optim.Optimizer, epochs: int = 1, max_steps: int | None = None,
             prox: ProximalTerm | None = None, grad_clip: float | None = 1.0,
             precision: Precision = FP32) -> dict[str, float]:
    """Local self-supervised training; returns the mean of each loss term and the number of samples."""
    batches = (b for b in _batches(loader, epochs, max_steps)
               if len(b["mri"]) >= 2)                  # InfoNCE needs negatives: skip a lone last sample
    return train(model, batches, optimizer, pretrain_loss, prox, grad_clip, after_step=model.update_momentum,
                 precision=precision)


def class_weights(labels: Iterable[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (sites have very different class balances)."""
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_classes).float()
    return counts.sum() / (num_classes * counts.clamp(min=1))


def finetune(model: nn.Module, loader, optimizer: torch.optim.Optimizer, epochs: int = 1,
             max_steps: int | None = None, prox: ProximalTerm | None = None, weights: torch.Tensor | None = None,
             grad_clip: float | None = 1.0, precision: Precision = FP32) -> dict[str, float]:
    """Supervised local training of the classifier; returns mean loss, accuracy and sample count."""
    return train(model, _batches(loader, epochs, max_steps), optimizer, classification_loss(weights), prox, grad_clip,
                 precision=precision)


def probe(model: nn.Module, loader, epochs: int, lr: float, weight_decay: float = 0.0,
          weights: torch.Tensor | None = None, seed: int = 0, precision: Precision = FP32,
          draws: int = 1) -> dict[str, float]:
    """Linear probing: the encoder frozen, every subject's features computed once (`draws` times,
    each pass its own draw of the loader's item transform, e.g. modality dropout), then the head
    alone trained on them for `epochs` (the LP of LP-FT: a head fitted to the pretrained features
    before fine-tuning moves them). Returns the last epoch's mean loss, accuracy and sample count
    (the subjects, not the draws)."""
    features, labels = [], []
    model.eval()
    device = model_device(model)
    with torch.no_grad(), precision.autocast():
        for draw in range(draws):
            if draws > 1:
                loader.dataset.epoch = draw            # each pass its own draw of the item transform
            for batch in loader:
                features.append(model.features(to_device(batch, device)).float())
                labels.append(batch["label"].to(device))
    if not features:
        return {"loss": float("nan"), "acc": float("nan"), NUM_EXAMPLES: 0}
    x, y = torch.cat(features), torch.cat(labels)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    batch_size = loader.batch_size or len(y)
    loss_fn = classification_loss(weights, forward=lambda head, b: head(b["features"]))
    metrics: dict[str, float] = {}
    for _ in range(epochs):
        batches = ({"features": x[idx], "label": y[idx]}
                   for idx in torch.randperm(len(y), generator=generator).to(device).split(batch_size))
        metrics = train(model.head, batches, optimizer, loss_fn, grad_clip=None, precision=precision)
    if NUM_EXAMPLES in metrics:
        metrics[NUM_EXAMPLES] = len(y) // draws             # a site weighs by its subjects, not their draws
    return metrics


@torch.no_grad()
def predict(model: nn.Module, loader, precision: Precision = FP32) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities (n, classes)) over a loader, in eval mode, on the model's device."""
    model.eval()
    device = model_device(model)
    labels, probs = [], []
    for batch in loader:
        labels.append(batch["label"].numpy())
        with precision.autocast():
            logits = model(to_device(batch, device))
        probs.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
    if not labels:
        return np.zeros(0, dtype=int), np.zeros((0, 0))
    return np.concatenate(labels), np.concatenate(probs)
