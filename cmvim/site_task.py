"""One site's work in a round, for any phase: what the federated client, the local-only and the
centralized baselines all run (the centralized baseline passes every site's data at once).

Input: the run config, the shared parameters from the server (a state dict), and the
site's own (personalised) parameters. Output: the updated shared parameters, the updated
local ones, and aggregate metrics. Subject-level data stays in here. The pieces live in their
own homes: the data views (cmvim.data.views), the model's weights (cmvim.weights), what travels
(cmvim.sharing), the training loop (cmvim.engine), DP-SGD and its plan (cmvim.privacy).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from . import engine
from .calibration import Calibration
from .data import SiteData, SiteDataset
from .data.views import SiteViews
from .device import Precision, describe, resolve_device, to_cpu, to_device
from .linear import collect
from .names import PHASES, Phase
from .privacy import PrivacyLedger, PrivacyRefused, SiteLimits, Spend, dp_train, planned_noise, privacy_plan
from .protocol import NUM_EXAMPLES, SUPPRESSED
from .release import AS_COMPUTED, ReleaseGrid, evaluation_release
from .run_config import RunConfig
from .sharing import SharingError, load_shared, shared_parameter_names, split_shared
from .weights import build_model

log = logging.getLogger("cmvim.site")
# finetune.probe_inputs: finetuning: how many modality-dropout draws of each training subject the
# probe's features hold (at dropout 0.3, a subject with PET is seen without it ~1.2 times of 4)
PROBE_DRAWS = 4

State = Mapping[str, torch.Tensor]


def stable_seed(*parts) -> int:
    """A seed from strings and numbers that is the same in every process (hash() of a str is not)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") & 0x7FFFFFFF


class SiteTaskError(ValueError):
    """A site cannot do the round; the message holds counts and names of parameters only, so it
    may cross the network."""


@dataclass
class RoundResult:
    shared: dict[str, torch.Tensor]
    local: dict[str, torch.Tensor]
    metrics: dict[str, float]
    histograms: tuple[list[int], list[int]] | None = None


class SiteTask:
    """`ledger_path`: where this site's privacy ledger lives (default: in the site folder);
    `run_key`: which run the spends belong to; `limits`: what the site's policy lets DP spend."""

    def __init__(self, cfg: RunConfig, sites: list[SiteData], name: str, ledger_path=None, run_key: str = "local",
                 limits: SiteLimits | None = None, device: str | None = None):
        self.cfg, self.sites, self.name = cfg, sites, name
        self.num_classes = cfg.model.num_classes
        self.ledger_path = ledger_path or sites[0].site_dir / ".cmvim_privacy" / "ledger.json"
        self.run_key, self.limits = run_key, limits or SiteLimits()
        # the site's own device choice (cmvim-client --device) wins over the run's
        self.device = resolve_device(device or cfg.device)
        self.precision = Precision.resolve(cfg.precision, self.device)
        self.views = SiteViews(cfg, sites, pin_memory=self.device.type == "cuda")
        if self.device.type == "cuda":
            log.info("site %s computes on %s in %s", name, describe(self.device), self.precision.name)

    def _model(self, phase: Phase, shared: State, local: State) -> torch.nn.Module:
        try:
            model = load_shared(build_model(self.cfg, phase), phase, self.cfg.personalize, shared, local)
        except SharingError as exc:
            raise SiteTaskError(str(exc)) from None
        return model.to(self.device)

    def _split(self, model: torch.nn.Module, phase: Phase) -> tuple[dict, dict]:
        shared, local = split_shared(model, phase, self.cfg.personalize)
        return to_cpu(shared), to_cpu(local)                   # what leaves the site never names a GPU

    def train(self, phase: Phase, round_: int, shared: State, local: State | None = None,
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
        views = self.views
        if phase == "pretrain":
            dataset = views.pretraining()
            dataset.seed = round_
            if len(dataset) < 2:
                raise SiteTaskError(f"{len(dataset)} subject(s) for pretraining: at least 2 are needed")
            loader = views.loader(dataset, pc.batch_size, True, seed, drop_last=len(dataset) > pc.batch_size)
            optimizer = engine.make_optimizer(model, pc.lr, pc.weight_decay)
            metrics = engine.pretrain(model, loader, optimizer, pc.local_epochs, pc.max_steps, prox,
                                      precision=self.precision)
        elif pc.probing(round_):
            # LP: the head alone, on the frozen encoder's features of the site's real inputs, or of
            # those fine-tuning will train on (PET hidden at the modality-dropout rate, several draws)
            like_finetuning = pc.probe_inputs == "finetuning" and self.cfg.modality_dropout > 0
            dataset = views.dataset(["train"], True, augment=False,
                                    modality_dropout=self.cfg.modality_dropout if like_finetuning else 0.0)
            dataset.seed = round_
            weights = engine.class_weights(self._checked_labels(dataset), self.num_classes)
            loader = views.loader(dataset, pc.batch_size, False, seed)
            metrics = engine.probe(model, loader, pc.probe_epochs, pc.probe_lr, weights=weights, seed=seed,
                                   precision=self.precision, draws=PROBE_DRAWS if like_finetuning else 1)
        else:
            dataset = views.finetuning()
            dataset.seed = round_
            weights = engine.class_weights(self._checked_labels(dataset), self.num_classes)
            loader = views.loader(dataset, pc.batch_size, True, seed)
            optimizer = engine.make_optimizer(model, pc.lr, pc.weight_decay, pc.layer_decay)
            metrics = engine.finetune(model, loader, optimizer, pc.local_epochs, pc.max_steps, prox, weights,
                                      precision=self.precision)
        shared_out, local_out = self._split(model, phase)
        return RoundResult(shared_out, local_out, metrics)

    # -- differential privacy ------------------------------------------------------------
    def _private_dataset(self, phase: Phase):
        return self.views.pretraining() if phase == "pretrain" else self.views.finetuning()

    def _private_sizes(self) -> dict[str, int]:
        return {phase: len(self._private_dataset(phase)) for phase in PHASES}

    def privacy_plan(self, sizes: dict[str, int] | None = None) -> tuple[float, dict[str, tuple[float, int]]]:
        """(delta, {phase: (sample_rate, steps per round)}) at this site."""
        return privacy_plan(self.cfg, sizes or self._private_sizes())

    def noise_multiplier(self, plan: tuple[float, dict] | None = None) -> float:
        return planned_noise(self.cfg, *(plan or self.privacy_plan()))

    def _train_private(self, phase: Phase, round_: int, model: torch.nn.Module) -> RoundResult:
        pv, pc = self.cfg.privacy, self.cfg.phase(phase)
        sizes = self._private_sizes()
        delta, plan = self.privacy_plan(sizes)
        q, steps = plan[phase]
        sigma = self.noise_multiplier((delta, plan))
        max_delta = self.limits.max_delta if self.limits.max_delta is not None else 1.0 / max(sizes["pretrain"], 1)
        if delta > max_delta:
            raise PrivacyRefused(f"privacy: the run's delta {delta:.1e} is above what the site allows ({max_delta:.1e}, "
                                 "max_delta, default 1/n): the site does not train with it")
        if sigma < self.limits.min_noise_multiplier:
            raise PrivacyRefused(f"privacy: the run's noise multiplier {sigma:.3g} is below the site's floor "
                                 f"{self.limits.min_noise_multiplier:g} (min_noise_multiplier): the site does not train with it")
        ledger = PrivacyLedger(self.ledger_path)
        ledger.spend(Spend(self.run_key, phase, round_, sigma, q, steps), delta, run_budget=self.cfg.privacy.budget(),
                     site_budget=self.limits.max_epsilon)                  # before any step: checked, locked, on disk
        dataset = self._private_dataset(phase)
        dataset.seed = round_
        lr, layer_decay = pc.lr, 1.0
        contrastive = getattr(model, "contrastive", False)
        if phase == "pretrain":
            model.contrastive = False               # per-sample losses only; their modules sit out
            model.per_sample = True                 # and none that depends on batch mates
            for module in (model.projector, model.report_encoder):
                if module is not None:
                    module.requires_grad_(False)
        else:
            self._checked_labels(dataset)
            if pc.probing(round_):                  # LP under DP: the head alone, on the usual privacy plan
                model.image.requires_grad_(False)
                lr = pc.probe_lr
            else:
                layer_decay = pc.layer_decay
        optimizer = engine.make_optimizer(model, lr, pc.weight_decay, layer_decay)
        collate = self.views.loader(dataset, pc.batch_size, False, 0).collate_fn
        # no class weights under DP: a weighted mean divides by the batch's weights, so a subject's
        # gradient would depend on its batch mates, and the weights themselves count the labels
        loss_fn = engine.pretrain_loss if phase == "pretrain" else engine.classification_loss(None)
        metrics = dp_train(model, dataset, collate, loss_fn, optimizer, sigma, pv.max_grad_norm, q, steps,
                           seed=stable_seed(self.cfg.seed, self.name, phase, round_, "dp"),
                           after_step=model.update_momentum if phase == "pretrain" else None,
                           precision=self.precision)
        if phase == "pretrain":
            model.contrastive, model.per_sample = contrastive, False
        # what leaves: the accounting and the count FedAvg weights by; the private batches' loss and
        # accuracy stay here (they would be releases outside epsilon)
        log.info("site %s %s round %d under DP: %s", self.name, phase, round_,
                 ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != NUM_EXAMPLES))
        metrics = {NUM_EXAMPLES: metrics[NUM_EXAMPLES], "epsilon": ledger.epsilon(delta, self.run_key), "delta": delta,
                   "noise_multiplier": sigma, "epsilon_site_total": ledger.epsilon(delta)}
        shared_out, local_out = self._split(model, phase)
        return RoundResult(shared_out, local_out, metrics)

    def _checked_labels(self, dataset) -> list[int]:
        """The training split's labels; a split without both classes cannot fine-tune."""
        labels = self.views.labels(dataset)
        if len(set(labels)) < 2:
            raise SiteTaskError(f"the training split has {len(labels)} labeled subject(s) of "
                                f"{len(set(labels))} class(es): fine-tuning needs both classes")
        return labels

    def evaluate(self, phase: Phase, shared: State, local: State | None = None, split: str = "test",
                 calibration: Calibration | None = None, logits: bool = False) -> RoundResult:
        """Pretrain: masked-reconstruction losses on `split`. Finetune: classification metrics, at
        `calibration`'s threshold on its calibrated scores (default: 0.5 on the model's own), and
        with `logits` the logit histograms the coordinator fits the calibration on."""
        model = self._model(phase, shared, local or {})
        k = self.limits.min_cell_count
        if phase == "pretrain":
            dataset = self.views.dataset([split], None, augment=False)
            if len(dataset) < k:
                return RoundResult({}, {}, {NUM_EXAMPLES: 0, SUPPRESSED: 1})
            loader = self.views.loader(dataset, self.cfg.pretrain.batch_size, False, 0)
            batches = [b for b in loader if len(b["mri"]) >= 2]
            metrics = engine.pretrain_losses(model, batches, precision=self.precision) if batches else {}
            return RoundResult({}, {}, {**metrics, NUM_EXAMPLES: len(dataset)})
        dataset = self.views.dataset([split], True, augment=False)
        binary = (np.asarray(self.views.labels(dataset)) == self.num_classes - 1).astype(int)
        if len(binary) and min(int(binary.sum()), int(len(binary) - binary.sum())) < k:
            # a small cell: nothing about it leaves, not even how many (decided before the model runs)
            return RoundResult({}, {}, {NUM_EXAMPLES: 0, SUPPRESSED: 1})
        labels, probs = self._predict(model, dataset)
        if len(labels) == 0:
            return RoundResult({}, {}, {NUM_EXAMPLES: 0})
        positive = probs[:, -1]                  # P(AD): the last class in both tasks
        binary = (labels == self.num_classes - 1).astype(int)
        return RoundResult({}, {}, *evaluation_metrics(self.cfg, binary, positive, calibration, logits,
                                                              self.limits.release))

    def predict(self, shared: State, local: State | None = None, split: str = "val") -> tuple[np.ndarray, np.ndarray]:
        """The fine-tuned model's (is AD 0/1, P(AD)) on the labelled subjects of `split`, in this
        process: for benchmarks that score rounds (nothing here leaves the site)."""
        labels, probs = self._predict(self._model("finetune", shared, local or {}),
                                      self.views.dataset([split], True, augment=False))
        return (labels == self.num_classes - 1).astype(int), probs[:, -1] if len(labels) else np.zeros(0)

    def refit_head(self, shared: State, local: State | None, records: list) -> tuple[dict, dict]:
        """(shared, local) of the fine-tuned model with its head refitted, the encoder frozen, on
        `records` (labelled records of this task's site) as the LP rounds fit it (probe_epochs at
        probe_lr, class weights): how a hospital outside the federation fits the federated model
        to a few of its own labels. In process, for benchmarks."""
        pc = self.cfg.finetune
        model = self._model("finetune", shared, local or {})
        dataset = SiteDataset(self.sites[0], list(records), self.cfg.model.classes)
        weights = engine.class_weights(self._checked_labels(dataset), self.num_classes)
        seed = stable_seed(self.cfg.seed, self.name, "refit_head", len(records))
        engine.probe(model, self.views.loader(dataset, pc.batch_size, False, seed), pc.probe_epochs, pc.probe_lr,
                     weights=weights, seed=seed, precision=self.precision)
        return self._split(model, "finetune")

    def features(self, shared: State, local: State | None, records: list) -> tuple[np.ndarray, np.ndarray]:
        """(is AD 0/1, the frozen fine-tuned encoder's features: what the head reads) of `records`
        of this task's site. In process, for benchmarks."""
        model = self._model("finetune", shared, local or {})
        model.eval()

        @torch.no_grad()
        def read(batch):
            return model.features(to_device(batch, self.device)).float().cpu().numpy()
        dataset = SiteDataset(self.sites[0], list(records), self.cfg.model.classes)
        x, labels = collect(self.views.loader(dataset, self.cfg.finetune.batch_size, False, 0), read)
        return (labels == self.num_classes - 1).astype(int), x

    def _predict(self, model: torch.nn.Module, dataset) -> tuple[np.ndarray, np.ndarray]:
        return engine.predict(model, self.views.loader(dataset, self.cfg.finetune.batch_size, False, 0), self.precision)


def evaluation_metrics(cfg: RunConfig, binary: np.ndarray, positive: np.ndarray, calibration: Calibration | None = None,
                       logits: bool = False, grid: ReleaseGrid = AS_COMPUTED
                       ) -> tuple[dict, tuple]:
    """What a site reports of a model on its test subjects: the metrics (their count as NUM_EXAMPLES)
    at the run's threshold, and the histograms of the scores, never the scores; on the site's
    release grid (cmvim.release: a deployed site's policy; none in simulation)."""
    metrics, histograms = evaluation_release(binary, positive, calibration, cfg.evaluation.histogram_bins, grid,
                                             cfg.evaluation.bootstrap, cfg.seed, logits)
    metrics[NUM_EXAMPLES] = metrics.pop("n")
    return metrics, histograms
