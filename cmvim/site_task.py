"""One site's work in a round, for any phase: what the federated client, the local-only and the
centralized baselines all run (the centralized baseline passes every site's data at once).

Input: the run config, the shared parameters from the server (a state dict), and the
site's own (personalised) parameters. Output: the updated shared parameters, the updated
local ones, and aggregate metrics. Subject-level data stays in here.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch.utils.data import ConcatDataset

from . import engine
from .data import PretrainAugment, SiteData, make_loader
from .data.augment import ModalityDropout
from .data.site import SiteDataset, label_index
from .run_config import RunConfig
from .sharing import shared_parameter_names
from .metrics import binary_metrics, score_histograms
from .model import CMViM, CMViMClassifier
from .protocol import NUM_EXAMPLES
from .privacy import (PrivacyBudgetExceeded, PrivacyLedger, Spend, default_delta, dp_train, noise_for_target,
                      steps_per_epoch)

log = logging.getLogger("cmvim.site")

State = Mapping[str, torch.Tensor]


def stable_seed(*parts) -> int:
    """A seed from strings and numbers that is the same in every process (hash() of a str is not)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") & 0x7FFFFFFF


class SiteTaskError(ValueError):
    """A site cannot do the round; the message holds counts and names of parameters only, so it
    may cross the network."""


def build_model(cfg: RunConfig, phase: str) -> torch.nn.Module:
    mc = cfg.model
    return CMViM(mc) if phase == "pretrain" else CMViMClassifier(mc)


def initial_state(cfg: RunConfig, phase: str, pretrained: State | None = None) -> dict[str, torch.Tensor]:
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
    from .config import ConfigError
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


@dataclass
class RoundResult:
    shared: dict[str, torch.Tensor]
    local: dict[str, torch.Tensor]
    metrics: dict[str, float]
    histograms: tuple[list[int], list[int]] | None = None


class _Pooled(torch.utils.data.Dataset):
    """Several sites' datasets as one (the centralized baseline)."""

    def __init__(self, parts: list[SiteDataset]):
        self.parts, self.concat = parts, ConcatDataset(parts)

    def __len__(self):
        return len(self.concat)

    def __getitem__(self, i):
        return self.concat[i]

    def __setattr__(self, key, value):
        if key in ("epoch", "seed"):            # augmentation counters live in each part
            for part in self.parts:
                setattr(part, key, value)
        super().__setattr__(key, value)


class SiteTask:
    """`ledger_path`: where this site's privacy ledger lives (default: in the site folder);
    `run_key`: which run the spends belong to; `epsilon_cap`: the site policy's max epsilon."""

    def __init__(self, cfg: RunConfig, sites: list[SiteData], name: str, ledger_path=None, run_key: str = "local",
                 epsilon_cap: float | None = None):
        self.cfg, self.sites, self.name = cfg, sites, name
        self.num_classes = cfg.model.num_classes
        self.ledger_path = ledger_path or sites[0].site_dir / ".cmvim_privacy" / "ledger.json"
        self.run_key, self.epsilon_cap = run_key, epsilon_cap

    # -- data views ---------------------------------------------------------------------
    def _dataset(self, split: list[str], labeled: bool | None, augment: bool, modality_dropout: float = 0.0):
        transform = PretrainAugment(self.cfg.augment) if augment and self.cfg.augment is not None else None
        if modality_dropout > 0:
            transform = ModalityDropout(modality_dropout)
        parts = []
        for site in self.sites:
            records = [r for s in split for r in site.subset(s, labeled, self.num_classes)]
            parts.append(SiteDataset(site, records, self.num_classes, transform))
        return parts[0] if len(parts) == 1 else _Pooled(parts)

    def _loader(self, dataset, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False):
        max_bytes = self.cfg.model.report.max_bytes
        loader = make_loader(dataset, batch_size, shuffle, seed=seed, max_report_bytes=max_bytes, drop_last=drop_last)
        if not self.cfg.use_reports:
            collate = loader.collate_fn

            def without_reports(items):
                batch = collate(items)
                batch.pop("report_ids"), batch.pop("report_present")
                return batch
            loader.collate_fn = without_reports
        return loader

    # -- phases ------------------------------------------------------------------------
    def _model(self, phase: str, shared: State, local: State) -> torch.nn.Module:
        model = build_model(self.cfg, phase)
        state = model.state_dict()
        missing = [k for k in shared_parameter_names(model, phase, self.cfg.personalize) if k not in shared]
        if missing:
            raise SiteTaskError(f"the server sent no values for {len(missing)} shared parameters "
                             f"(first: {missing[0]}): is the site running the same model config?")
        for key, value in {**shared, **local}.items():
            if key not in state:
                raise SiteTaskError(f"unexpected parameter {key!r} for the {phase} model")
            if tuple(state[key].shape) != tuple(value.shape):
                raise SiteTaskError(f"parameter {key!r} has shape {tuple(value.shape)}, the {phase} model expects "
                                 f"{tuple(state[key].shape)}: is the site running the same model config?")
        model.load_state_dict({**state, **local, **shared}, strict=True)
        return model

    def _split(self, model: torch.nn.Module, phase: str) -> tuple[dict, dict]:
        names = set(shared_parameter_names(model, phase, self.cfg.personalize))
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return {k: v for k, v in state.items() if k in names}, {k: v for k, v in state.items() if k not in names}

    def train(self, phase: str, round_: int, shared: State, local: State | None = None,
              proximal_mu: float = 0.0) -> RoundResult:
        torch.manual_seed(stable_seed(self.cfg.seed, self.name, phase, round_))
        pc = self.cfg.phase(phase)
        model = self._model(phase, shared, local or {})
        prox = None
        if proximal_mu > 0:
            prox = engine.ProximalTerm(model, shared_parameter_names(model, phase, self.cfg.personalize), proximal_mu)
        if self.cfg.privacy.enabled:
            if prox is not None:
                raise SiteTaskError("FedProx's proximal term is not available with DP-SGD: use fedavg or fedadam")
            return self._train_private(phase, round_, model)
        seed = stable_seed(self.cfg.seed, self.name, phase, round_, "loader")
        if phase == "pretrain":
            dataset = self._dataset(["train", "val"], None, augment=True)
            dataset.seed = round_
            if len(dataset) < 2:
                raise SiteTaskError(f"{len(dataset)} subject(s) for pretraining: at least 2 are needed")
            loader = self._loader(dataset, pc.batch_size, True, seed, drop_last=len(dataset) > pc.batch_size)
            optimizer = engine.make_optimizer(model, pc.lr, pc.weight_decay)
            metrics = engine.pretrain(model, loader, optimizer, pc.local_epochs, pc.max_steps, prox)
        elif pc.probing(round_):
            # LP: the head alone, on the frozen encoder's features of the site's real inputs
            dataset = self._dataset(["train"], True, augment=False)
            weights = engine.class_weights(self._checked_labels(dataset), self.num_classes)
            loader = self._loader(dataset, pc.batch_size, False, seed)
            metrics = engine.probe(model, loader, pc.probe_epochs, pc.probe_lr, weights=weights, seed=seed)
        else:
            dataset = self._dataset(["train"], True, augment=False, modality_dropout=self.cfg.modality_dropout)
            dataset.seed = round_
            weights = engine.class_weights(self._checked_labels(dataset), self.num_classes)
            loader = self._loader(dataset, pc.batch_size, True, seed)
            optimizer = engine.make_optimizer(model, pc.lr, pc.weight_decay, pc.layer_decay)
            metrics = engine.finetune(model, loader, optimizer, pc.local_epochs, pc.max_steps, prox, weights)
        shared_out, local_out = self._split(model, phase)
        return RoundResult(shared_out, local_out, metrics)

    # -- differential privacy ------------------------------------------------------------
    def _private_dataset(self, phase: str):
        if phase == "pretrain":
            return self._dataset(["train", "val"], None, augment=True)
        return self._dataset(["train"], True, augment=False, modality_dropout=self.cfg.modality_dropout)

    def privacy_plan(self) -> tuple[float, dict[str, tuple[float, int]]]:
        """(delta, {phase: (sample_rate, steps per round)}) at this site."""
        plan = {}
        for phase in ("pretrain", "finetune"):
            pc, n = self.cfg.phase(phase), len(self._private_dataset(phase))
            q = min(1.0, pc.batch_size / max(n, 1))
            steps = pc.local_epochs * steps_per_epoch(q)
            plan[phase] = (q, min(steps, pc.max_steps) if pc.max_steps else steps)
        delta = self.cfg.privacy.delta or default_delta(len(self._private_dataset("pretrain")))
        return delta, plan

    def noise_multiplier(self, privacy_plan: tuple[float, dict] | None = None) -> float:
        pv = self.cfg.privacy
        if pv.noise_multiplier is not None:
            return pv.noise_multiplier
        delta, plan = privacy_plan or self.privacy_plan()
        planned = [(q, steps * self.cfg.phase(ph).rounds) for ph, (q, steps) in plan.items()]
        return noise_for_target(pv.target_epsilon, delta, planned)

    def privacy_budget(self) -> float | None:
        caps = [c for c in (self.cfg.privacy.budget(), self.epsilon_cap) if c is not None]
        return min(caps) if caps else None

    def _train_private(self, phase: str, round_: int, model: torch.nn.Module) -> RoundResult:
        pv, pc = self.cfg.privacy, self.cfg.phase(phase)
        delta, plan = self.privacy_plan()
        q, steps = plan[phase]
        sigma = self.noise_multiplier((delta, plan))
        ledger = PrivacyLedger(self.ledger_path)
        projected = ledger.epsilon(delta, self.run_key, extra=[(sigma, q, steps)])
        budget = self.privacy_budget()
        if budget is not None and projected > budget + 1e-9:
            spent = ledger.epsilon(delta, self.run_key)
            raise PrivacyBudgetExceeded(
                f"privacy budget: this {phase} round would take the run to epsilon {projected:.2f} > budget "
                f"{budget:.2f} (spent {spent:.2f}, delta {delta:.1e}); the site stops training for this run "
                f"and still evaluates")
        dataset = self._private_dataset(phase)
        dataset.seed = round_
        labels, lr, layer_decay = None, pc.lr, 1.0
        contrastive = getattr(model, "contrastive", False)
        if phase == "pretrain":
            model.contrastive = False               # per-sample losses only; their modules sit out
            for module in (model.projector, model.report_encoder):
                if module is not None:
                    module.requires_grad_(False)
        else:
            labels = self._checked_labels(dataset)
            if pc.probing(round_):                  # LP under DP: the head alone, on the usual privacy plan
                model.image.requires_grad_(False)
                lr = pc.probe_lr
            else:
                layer_decay = pc.layer_decay
        optimizer = engine.make_optimizer(model, lr, pc.weight_decay, layer_decay)
        collate = self._loader(dataset, pc.batch_size, False, 0).collate_fn
        weights = engine.class_weights(labels, self.num_classes) if labels is not None else None

        loss_fn = engine.pretrain_loss if phase == "pretrain" else engine.classification_loss(weights)
        metrics = dp_train(model, dataset, collate, loss_fn, optimizer, sigma, pv.max_grad_norm, q, steps,
                           seed=stable_seed(self.cfg.seed, self.name, phase, round_, "dp"),
                           after_step=model.update_momentum if phase == "pretrain" else None)
        ledger.record(Spend(self.run_key, phase, round_, sigma, q, steps))      # before any weight leaves
        if phase == "pretrain":
            model.contrastive = contrastive
        metrics.update({"epsilon": ledger.epsilon(delta, self.run_key), "delta": delta, "noise_multiplier": sigma,
                        "epsilon_site_total": ledger.epsilon(delta)})
        shared_out, local_out = self._split(model, phase)
        return RoundResult(shared_out, local_out, metrics)

    def _labels(self, dataset) -> list[int]:
        parts = dataset.parts if isinstance(dataset, _Pooled) else [dataset]
        return [label_index(r.entry.label, self.num_classes) for part in parts for r in part.records]

    def _checked_labels(self, dataset) -> list[int]:
        """The training split's labels; a split without both classes cannot fine-tune."""
        labels = self._labels(dataset)
        if len(set(labels)) < 2:
            raise SiteTaskError(f"the training split has {len(labels)} labeled subject(s) of "
                                f"{len(set(labels))} class(es): fine-tuning needs both classes")
        return labels

    def evaluate(self, phase: str, shared: State, local: State | None = None, split: str = "test") -> RoundResult:
        """Pretrain: masked-reconstruction losses on `split`. Finetune: classification metrics."""
        model = self._model(phase, shared, local or {})
        if phase == "pretrain":
            dataset = self._dataset([split], None, augment=False)
            loader = self._loader(dataset, self.cfg.pretrain.batch_size, False, 0)
            batches = [b for b in loader if len(b["mri"]) >= 2]
            metrics = engine.pretrain_losses(model, batches) if batches else {}
            return RoundResult({}, {}, {**metrics, NUM_EXAMPLES: len(dataset)})
        dataset = self._dataset([split], True, augment=False)
        labels, probs = engine.predict(model, self._loader(dataset, self.cfg.finetune.batch_size, False, 0))
        if len(labels) == 0:
            return RoundResult({}, {}, {NUM_EXAMPLES: 0})
        positive = probs[:, -1]                  # P(AD): the last class in both tasks
        binary = (labels == self.num_classes - 1).astype(int)
        return RoundResult({}, {}, *evaluation_metrics(self.cfg, binary, positive))


def evaluation_metrics(cfg: RunConfig, binary: np.ndarray, positive: np.ndarray) -> tuple[dict, tuple]:
    """What a site reports of a model on its test subjects: the metrics (their count as NUM_EXAMPLES)
    and the score histograms, never the scores."""
    metrics = binary_metrics(binary, positive, bootstrap=cfg.evaluation.bootstrap, seed=cfg.seed)
    metrics[NUM_EXAMPLES] = metrics.pop("n")
    return metrics, score_histograms(binary, positive, cfg.evaluation.histogram_bins)


def flatten_metrics(metrics: Mapping) -> dict[str, float]:
    """Numbers only, lists flattened to key_0, key_1 (what a Flower MetricRecord carries as scalars)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (list, tuple)):
            out[key] = [float(v) for v in value]
        elif isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
            out[key] = float(value) if not isinstance(value, (int, np.integer)) else int(value)
    return out
