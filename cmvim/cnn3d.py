"""A supervised 3D CNN trained from scratch: the reference the field would name beside CMViM.

`ResNet3d` is a small 3D ResNet (He et al., CVPR 2016; the ResNet-10 layout of MedicalNet, Chen
et al. 2019): a stride-2 stem and a stride-2 max-pool (S -> S/4), four stages of one basic residual
block each (widths 16-32-64-128, every stage after the first halving the grid: S/32 at the end),
global average pooling and a linear head. 0.9 M parameters; a 32^3 visit trains in ~15 ms on a
CPU core, so the tests' cohort trains in seconds.

Inputs: the batch dict every model here takes. MRI and PET are stacked as two channels; a modality
that is absent is zeroed in the network (whatever its tensor holds), and the head reads the
presence flags beside the pooled features, so a visit without PET scores the same whether its PET
tensor holds zeros or noise, and the model can still tell "no PET" from "a dark PET".

Normalisation: GroupNorm (8 groups), not BatchNorm. Federated averaging of BatchNorm's running
statistics mixes the sites' intensity distributions into statistics no site's data has (FedBN, Li
et al., ICLR 2021, is about exactly this), and with the batches of 4-8 volumes a site holds, batch
statistics are noisy anyway; GroupNorm has no running state, so FedAvg averages weights only and
training and evaluation compute the same function.

`CnnTask` trains and evaluates it at one site (or several pooled) on the CNN's own schedule (the
run config's `cnn3d` section, chosen for it: docs/science.md), through the same loop
(cmvim.engine), data views and metrics (`evaluation_metrics`) as CMViM's SiteTask, and with
SiteTask's `train`/`evaluate` signature, so that simulations.baselines.train_cnn3d runs its
rounds, FedAvg and best-validation selection.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping

import numpy as np
import torch
from torch import nn

from . import engine
from .data import SiteData
from .data.views import SiteViews
from .device import Precision, resolve_device, to_cpu
from .names import Phase
from .privacy import SiteLimits
from .protocol import NUM_EXAMPLES, SUPPRESSED
from .run_config import RunConfig
from .site_task import RoundResult, SiteTaskError, evaluation_metrics, stable_seed

WIDTHS = (16, 32, 64, 128)
GROUPS = 8                                   # GroupNorm groups: 2 channels a group at width 16


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(GROUPS, channels), channels)


class BasicBlock3d(nn.Module):
    """conv3-norm-ReLU-conv3-norm, plus the input (through a strided 1x1x1 conv where the shape
    changes), then ReLU."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, channels, 3, stride, 1, bias=False)
        self.norm1 = _norm(channels)
        self.conv2 = nn.Conv3d(channels, channels, 3, 1, 1, bias=False)
        self.norm2 = _norm(channels)
        self.shortcut = nn.Identity() if stride == 1 and in_channels == channels else nn.Sequential(
            nn.Conv3d(in_channels, channels, 1, stride, bias=False), _norm(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet3d(nn.Module):
    """batch {"mri", "pet": (B, 1, S, S, S), "mri_present", "pet_present": (B,)} -> logits (B, num_classes)."""

    modalities = ("mri", "pet")

    def __init__(self, num_classes: int = 2, widths: tuple[int, ...] = WIDTHS, generator: torch.Generator | None = None):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(len(self.modalities), widths[0], 3, 2, 1, bias=False), _norm(widths[0]),
                                  nn.ReLU(), nn.MaxPool3d(3, 2, 1))          # (B, 16, S/4, S/4, S/4)
        blocks, in_channels = [], widths[0]
        for i, channels in enumerate(widths):
            blocks.append(BasicBlock3d(in_channels, channels, stride=1 if i == 0 else 2))
            in_channels = channels
        self.stages = nn.Sequential(*blocks)
        self.head = nn.Linear(widths[-1] + len(self.modalities), num_classes)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """He-normal convolutions, unit/zero norms, the last norm of every residual branch zero (each
        block starts as the identity: Goyal et al. 2017), a small head; drawn from `generator`."""
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.stages:
            nn.init.zeros_(block.norm2.weight)
        nn.init.normal_(self.head.weight, std=0.01, generator=generator)
        nn.init.zeros_(self.head.bias)

    def inputs(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(volumes (B, 2, S, S, S) with absent modalities zeroed, presence (B, 2) as 0/1)."""
        present = torch.stack([batch[f"{m}_present"].bool() for m in self.modalities], dim=1)      # (B, 2)
        volumes = torch.cat([batch[m].float() for m in self.modalities], dim=1)                     # (B, 2, S, S, S)
        volumes = torch.where(present[:, :, None, None, None], volumes, torch.zeros((), device=volumes.device))
        return volumes, present.float()

    def features(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, widths[-1] + 2): the pooled last stage and the presence flags: what the head reads."""
        volumes, present = self.inputs(batch)
        x = self.stages(self.stem(volumes))                      # (B, 128, S/32, S/32, S/32)
        return torch.cat([x.mean(dim=(2, 3, 4)), present.to(x.dtype)], dim=1)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.features(batch))


def cnn_initial_state(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The one initialisation every site (and the pooled baseline) starts from: drawn from a
    generator seeded by the run's seed, whatever the global RNG holds."""
    generator = torch.Generator().manual_seed(stable_seed(cfg.seed, "cnn3d", "init"))
    return {k: v.clone() for k, v in ResNet3d(cfg.model.num_classes, generator=generator).state_dict().items()}


def cnn_run_config(cfg: RunConfig) -> RunConfig:
    """The run config the CNN trains under: the run's, with the fine-tuning schedule replaced by the
    CNN's own (`cnn3d`: rounds, epochs, lr, batch, weight decay, step cap; no probe rounds, which
    a network from scratch has nothing to probe with), the selection rule kept. `cnn3d: null`
    leaves the run's fine-tuning schedule. Applying it twice changes nothing."""
    own = cfg.cnn3d
    if own is None:
        return cfg
    return replace(cfg, finetune=replace(cfg.finetune, rounds=own.rounds, local_epochs=own.local_epochs,
                                         max_steps=own.max_steps, lr=own.lr, weight_decay=own.weight_decay,
                                         batch_size=own.batch_size, probe_rounds=0))


def describe(cfg: RunConfig) -> str:
    """What the baseline is, for the run's record."""
    count = sum(p.numel() for p in ResNet3d(cfg.model.num_classes).parameters())
    schedule = cnn_run_config(cfg).finetune
    return (f"3D ResNet from scratch ({len(WIDTHS)} stages of 1 basic block, widths {'-'.join(map(str, WIDTHS))}, "
            f"GroupNorm, {count / 1e6:.2f} M parameters), MRI + PET as 2 channels; "
            f"{'its own schedule' if cfg.cnn3d is not None else 'the fine-tuning schedule'}: "
            f"{schedule.rounds} rounds x {schedule.local_epochs} epochs, lr {schedule.lr:g}, "
            f"batch {schedule.batch_size}, select {schedule.select}")


class CnnTask:
    """One site's (or several pooled sites') training and evaluation of the 3D CNN, with SiteTask's
    signature (`phase` is always "finetune": the CNN has no pretraining, and every round trains the
    whole network), on the CNN's own schedule (`cnn_run_config`: self.cfg is the run's config with
    it in place of fine-tuning's). Trains without DP-SGD whatever the run's privacy section says:
    it is an accuracy reference, run in simulation only."""

    def __init__(self, cfg: RunConfig, sites: list[SiteData], name: str, limits: SiteLimits | None = None,
                 device: str | None = None):
        self.cfg, self.sites, self.name = cnn_run_config(cfg), sites, name
        self.num_classes = cfg.model.num_classes
        self.limits = limits or SiteLimits()
        self.device = resolve_device(device or cfg.device)
        self.precision = Precision.resolve(cfg.precision, self.device)
        self.views = SiteViews(cfg, sites, pin_memory=self.device.type == "cuda")

    def _model(self, shared: Mapping[str, torch.Tensor]) -> ResNet3d:
        model = ResNet3d(self.num_classes)
        model.load_state_dict(shared)
        return model.to(self.device)

    def train(self, phase: Phase, round_: int, shared: Mapping[str, torch.Tensor],
              local: Mapping[str, torch.Tensor] | None = None) -> RoundResult:
        """`finetune.local_epochs` epochs over the site's labelled training subjects (the fine-tuning
        view: the run's modality dropout and augmentation), class-weighted, at `finetune.lr`."""
        pc = self.cfg.finetune
        model = self._model(shared)
        dataset = self.views.finetuning()
        dataset.seed = round_                     # augmentations and modality dropout differ per round, reproducibly
        labels = self.views.labels(dataset)
        if len(set(labels)) < 2:
            raise SiteTaskError(f"the training split has {len(labels)} labeled subject(s) of {len(set(labels))} "
                                "class(es): the CNN baseline needs both classes")
        loader = self.views.loader(dataset, pc.batch_size, True, stable_seed(self.cfg.seed, self.name, "cnn3d",
                                                                             round_, "loader"))
        optimizer = engine.make_optimizer(model, pc.lr, pc.weight_decay)
        metrics = engine.finetune(model, loader, optimizer, pc.local_epochs, pc.max_steps,
                                  weights=engine.class_weights(labels, self.num_classes), precision=self.precision)
        return RoundResult(to_cpu(model.state_dict()), {}, metrics)

    def evaluate(self, phase: Phase, shared: Mapping[str, torch.Tensor], local: Mapping[str, torch.Tensor] | None = None,
                 split: str = "test") -> RoundResult:
        """The metrics and score histograms of `split`, as SiteTask.evaluate reports a site's (a class
        with fewer than the site's min_cell_count subjects releases nothing)."""
        dataset = self.views.dataset([split], True, augment=False)
        binary = (np.asarray(self.views.labels(dataset)) == self.num_classes - 1).astype(int)
        k = self.limits.min_cell_count
        if len(binary) and min(int(binary.sum()), int(len(binary) - binary.sum())) < k:
            return RoundResult({}, {}, {NUM_EXAMPLES: 0, SUPPRESSED: 1})
        if len(binary) == 0:
            return RoundResult({}, {}, {NUM_EXAMPLES: 0})
        loader = self.views.loader(dataset, self.cfg.finetune.batch_size, False, 0)
        labels, probs = engine.predict(self._model(shared), loader, self.precision)
        binary = (labels == self.num_classes - 1).astype(int)
        return RoundResult({}, {}, *evaluation_metrics(self.cfg, binary, probs[:, -1]))

    def predict(self, shared: Mapping[str, torch.Tensor], local: Mapping[str, torch.Tensor] | None = None,
                split: str = "val") -> tuple[np.ndarray, np.ndarray]:
        """(is AD 0/1, P(AD)) of the labelled subjects of `split`, in this process (SiteTask.predict's
        signature): for benchmarks that keep per-subject scores."""
        dataset = self.views.dataset([split], True, augment=False)
        if len(dataset) == 0:
            return np.zeros(0, dtype=int), np.zeros(0)
        labels, probs = engine.predict(self._model(shared), self.views.loader(dataset, self.cfg.finetune.batch_size,
                                                                              False, 0), self.precision)
        return (labels == self.num_classes - 1).astype(int), probs[:, -1]
