"""CMViM: Contrastive Masked Vim Autoencoder for 3D multi-modal volumes, and its classifier.

A batch is a dict (see `cmvim.data` for how sites produce it):

    mri, pet            (b, 1, S, S, S) float volumes (zeros where absent)
    mri_present, ...    (b,) bool, whether the subject has that modality
    report_ids          (b, L) long byte tokens (optional), report_present (b,) bool
    label               (b,) long, -1 = unlabeled   (fine-tuning only)

Pretraining step (`CMViM.forward`), per the paper:
  1. each modality -> patch tokens (+ a learned stand-in where it is absent);
  2. random masking per modality (ratio 0.75); the visible tokens of ALL
     modalities are concatenated and go through ONE shared Vim encoder;
  3. per-modality light decoders predict the masked voxel patches (MSE);
  4. intra-modal InfoNCE: online features (masking 1) vs momentum-encoder
     features of an independent masking 2 of the same volume;
  5. inter-modal InfoNCE: MRI vs PET features of the same subject; and
     image vs report features where reports exist.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import info_nce, masked_mse
from ..model_config import ModelConfig
from .patch import MaskToken, PatchEmbed3D, StandIn, patchify, position_embedding, random_masking
from .report import build_report_encoder
from .vim import VimEncoder


def _vim(cfg: ModelConfig, dim: int, depth: int, drop_path: float, scan_backend: str | None) -> VimEncoder:
    """A Vim stack; the scan backend is the argument, else the config's, else chosen automatically."""
    return VimEncoder(dim, depth, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
                      merge=cfg.merge, drop_path=drop_path, scan_backend=scan_backend or cfg.scan_backend)


class ImageEncoder(nn.Module):
    """Tokenizers, stand-ins and the shared Vim encoder: the part pretraining hands to fine-tuning."""

    def __init__(self, cfg: ModelConfig, scan_backend: str | None = None):
        super().__init__()
        self.modalities = cfg.modalities
        self.tokenizers = nn.ModuleDict({
            m: PatchEmbed3D(cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.pos_embed) for m in cfg.modalities})
        self.standins = nn.ModuleDict({m: StandIn(cfg.num_patches, cfg.embed_dim) for m in cfg.modalities})
        self.encoder = _vim(cfg, cfg.embed_dim, cfg.depth, cfg.drop_path, scan_backend)

    def tokens(self, batch: Mapping[str, torch.Tensor], modality: str) -> torch.Tensor:
        """(b, n, dim) tokens of one modality, the stand-in sequence where it is absent."""
        present = batch[f"{modality}_present"].to(torch.float32)
        tokens = self.tokenizers[modality](batch[modality])
        return tokens * present[:, None, None] + self.standins[modality](1.0 - present)


class Decoder(nn.Module):
    """MAE-style light decoder for one modality: visible latents -> all voxel patches."""

    def __init__(self, cfg: ModelConfig, scan_backend: str | None = None):
        super().__init__()
        self.embed = nn.Linear(cfg.embed_dim, cfg.decoder_dim)
        self.mask_token = MaskToken(cfg.decoder_dim)
        self.pos_embed = position_embedding(cfg.num_patches, cfg.decoder_dim, cfg.pos_embed)
        self.blocks = _vim(cfg, cfg.decoder_dim, cfg.decoder_depth, 0.0, scan_backend)
        self.pred = nn.Linear(cfg.decoder_dim, cfg.patch_voxels)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (b, n_vis, dim), ids_restore (b, n) -> predicted patches (b, n, p^3)."""
        x = self.embed(latent)                                             # (b, n_vis, dd)
        b, n_vis, dd = x.shape
        masked = self.mask_token(x.new_ones(b, ids_restore.shape[1] - n_vis))
        x = torch.cat([x, masked], dim=1)                                  # (b, n, dd), shuffled order
        x = torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, dd))  # unshuffle
        return self.pred(self.blocks(x + self.pos_embed))


@dataclass
class PretrainOutput:
    loss: torch.Tensor                                       # weighted total, differentiable
    terms: dict[str, float] = field(default_factory=dict)    # each term, detached, for logging
    predictions: dict[str, torch.Tensor] = field(default_factory=dict)   # (b, n, p^3) per modality
    masks: dict[str, torch.Tensor] = field(default_factory=dict)         # (b, n), 1 = masked


class CMViM(nn.Module):
    """The pretraining model. `forward(batch)` -> PretrainOutput."""

    def __init__(self, cfg: ModelConfig, scan_backend: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.image = ImageEncoder(cfg, scan_backend)
        self.projector = nn.Linear(cfg.embed_dim, cfg.proj_dim)
        self.decoders = nn.ModuleDict({m: Decoder(cfg, scan_backend) for m in cfg.modalities})
        self.report_encoder = (build_report_encoder(cfg.report, cfg.proj_dim, scan_backend or cfg.scan_backend)
                               if cfg.report.enabled else None)
        # The momentum (EMA) copy of the image encoder and projector. Parameters with
        # requires_grad=False rather than buffers: Opacus rejects buffers, and the
        # federated client exchanges them like any other weights.
        self.momentum = nn.ModuleDict({"image": copy.deepcopy(self.image),
                                       "projector": copy.deepcopy(self.projector)})
        self.momentum.requires_grad_(False)
        # False: reconstruction only, the momentum and report encoders not run at all: DP-SGD
        # (per-sample losses), and a config whose contrastive weights are all 0 (MAE alone)
        self.contrastive = any(w > 0 for w in (cfg.loss.intra, cfg.loss.inter, cfg.loss.report))
        # True under DP-SGD: every loss term a mean of per-sample terms that do not depend on
        # batch mates (losses.masked_mse), so clipping bounds each subject's influence
        self.per_sample = False

    # -- steps -----------------------------------------------------------------------------
    def encode_masked(self, image: ImageEncoder, batch, generator=None):
        """Mask every modality independently, encode the visible tokens of all of them together.

        Returns per modality: latent (b, n_vis, dim), mask (b, n), ids_restore (b, n).
        """
        visible, masks, restores = [], {}, {}
        for m in self.cfg.modalities:
            vis, masks[m], restores[m], _ = random_masking(image.tokens(batch, m), self.cfg.mask_ratio, generator)
            visible.append(vis)
        latent = image.encoder(torch.cat(visible, dim=1))                  # (b, sum n_vis, dim)
        latents = dict(zip(self.cfg.modalities, latent.split([v.shape[1] for v in visible], dim=1)))
        return latents, masks, restores

    def forward(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> PretrainOutput:
        cfg, weights = self.cfg, self.cfg.loss
        present = {m: batch[f"{m}_present"].bool() for m in cfg.modalities}
        latents, masks, restores = self.encode_masked(self.image, batch, generator)

        terms: dict[str, torch.Tensor] = {}
        predictions = {}
        for m in cfg.modalities:
            predictions[m] = self.decoders[m](latents[m], restores[m])
            target = patchify(batch[m], cfg.patch_size)
            terms[f"recon_{m}"] = masked_mse(predictions[m], target, masks[m], present[m], weights.norm_pix_loss,
                                             per_sample=self.per_sample)

        if not self.contrastive:        # MAE alone, or DP-SGD's per-sample losses (see cmvim.privacy)
            loss = sum(weights.recon * terms[f"recon_{m}"] for m in cfg.modalities)
            return PretrainOutput(loss, {k: float(v.detach()) for k, v in terms.items()}, predictions, masks)
        online = {m: self.projector(latents[m].mean(dim=1)) for m in cfg.modalities}
        with torch.no_grad():
            mom_latents, _, _ = self.encode_masked(self.momentum["image"], batch, generator)
            momentum = {m: self.momentum["projector"](mom_latents[m].mean(dim=1)) for m in cfg.modalities}
        intra = [info_nce(online[m], momentum[m], weights.temperature, present[m])
                 for m in cfg.modalities if present[m].sum() >= 2]
        terms["intra"] = torch.stack(intra).mean() if intra else online[cfg.modalities[0]].new_zeros(())
        if len(cfg.modalities) == 2:
            a, b = cfg.modalities
            terms["inter"] = info_nce(online[a], online[b], weights.temperature, present[a] & present[b])
        if self.report_encoder is not None and "report_ids" in batch:
            image_feat = self._mean_present(online, present)
            report_feat = self.report_encoder(batch["report_ids"])
            terms["report"] = info_nce(image_feat, report_feat, weights.temperature, batch["report_present"].bool())

        loss = sum(weights.recon * terms[f"recon_{m}"] for m in cfg.modalities)
        loss = loss + weights.intra * terms["intra"]
        loss = loss + weights.inter * terms.get("inter", 0.0) + weights.report * terms.get("report", 0.0)
        return PretrainOutput(loss, {k: float(v.detach()) for k, v in terms.items()}, predictions, masks)

    @staticmethod
    def _mean_present(features: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per subject, the mean of the normalised features of the modalities it has."""
        total = sum(F.normalize(f, dim=-1) * present[m][:, None] for m, f in features.items())
        count = sum(present[m].float() for m in features)[:, None].clamp(min=1.0)
        return total / count

    @torch.no_grad()
    def update_momentum(self, momentum: float | None = None) -> None:
        """EMA: theta_m <- m * theta_m + (1 - m) * theta (after each optimizer step)."""
        m = self.cfg.momentum if momentum is None else momentum
        pairs = ((self.momentum["image"], self.image), (self.momentum["projector"], self.projector))
        for target, source in pairs:
            for p_m, p in zip(target.parameters(), source.parameters()):
                p_m.mul_(m).add_(p.detach(), alpha=1 - m)


class FactorizedHead(nn.Module):
    """A linear head on (b, tokens * dim) features whose weight is low-rank across the token
    dimension: each token's features are projected onto `rank` learned directions (shared by
    every position), then a linear layer weighs each position and direction. The same family as
    a full linear head restricted to rank `rank` per class; far fewer weights to fit from a few
    labelled subjects, and the spatial map (`spatial`) stays readable."""

    def __init__(self, tokens: int, dim: int, rank: int, num_classes: int):
        super().__init__()
        self.tokens, self.dim = tokens, dim
        self.reduce = nn.Linear(dim, rank, bias=False)       # default init: unit-scale projections
        self.spatial = nn.Linear(tokens * rank, num_classes)
        nn.init.trunc_normal_(self.spatial.weight, std=0.02)
        nn.init.zeros_(self.spatial.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = features.reshape(features.shape[0], self.tokens, self.dim)
        return self.spatial(self.reduce(tokens).flatten(1))


class CMViMClassifier(nn.Module):
    """Fine-tuning model: the image encoder on all tokens (no masking), a linear head on its
    mean-pooled tokens (readout "mean", the paper's), on every token in place (readout "tokens"),
    or on every token through a low-rank head (readout "factorized", `FactorizedHead`)."""

    def __init__(self, cfg: ModelConfig, scan_backend: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.image = ImageEncoder(cfg, scan_backend)
        if cfg.readout == "factorized":
            self.head = FactorizedHead(cfg.num_patches * len(cfg.modalities), cfg.embed_dim, cfg.head_rank,
                                       cfg.num_classes)
        else:
            self.head = nn.Linear(self.feature_dim, cfg.num_classes)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    @property
    def feature_dim(self) -> int:
        tokens = 1 if self.cfg.readout == "mean" else self.cfg.num_patches * len(self.cfg.modalities)
        return tokens * self.cfg.embed_dim

    def features(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(b, feature_dim): what the head reads."""
        tokens = torch.cat([self.image.tokens(batch, m) for m in self.cfg.modalities], dim=1)
        hidden = self.image.encoder(tokens)                                # (b, L, dim)
        return hidden.mean(dim=1) if self.cfg.readout == "mean" else hidden.flatten(1)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.features(batch))                            # (b, num_classes) logits

    def load_pretrained(self, state: Mapping[str, torch.Tensor] | CMViM) -> list[str]:
        """Copy the image encoder from a CMViM (or its state dict). Returns the keys copied."""
        if isinstance(state, nn.Module):
            state = state.state_dict()
        image_state = {k[len("image."):]: v for k, v in state.items() if k.startswith("image.")}
        if not image_state:
            raise ValueError("no 'image.*' weights in the pretraining state dict: is it a CMViM checkpoint?")
        self.image.load_state_dict(image_state, strict=True)   # a mismatch names the keys
        return sorted("image." + k for k in image_state)

