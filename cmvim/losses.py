"""CMViM's losses: masked reconstruction and symmetric InfoNCE.

Both take a per-sample validity mask, so a subject without PET (or without a
report) contributes nothing to the terms that need it, instead of a term
computed on stand-in zeros.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
               valid: torch.Tensor | None = None, norm_pix: bool = False, per_sample: bool = False) -> torch.Tensor:
    """MSE over masked patches of valid samples.

    pred, target: (b, n, p^3); mask: (b, n), 1 = masked (the patches to predict);
    valid: (b,) bool/float, samples whose modality exists. 0 when nothing counts.
    per_sample: each sample's own masked-patch mean (0 for an invalid one), averaged over the
    batch size: a sample's term then does not depend on its batch mates, as DP-SGD's clipping
    needs (the default pools the batch's masked patches, whose count depends on who has the scan).
    """
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = ((pred - target) ** 2).mean(dim=-1)                        # (b, n)
    weight = mask if valid is None else mask * valid.to(mask.dtype)[:, None]
    if per_sample:
        return ((per_patch * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)).mean()
    return (per_patch * weight).sum() / weight.sum().clamp(min=1.0)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.07,
             valid: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): row i of `a` matches row i of `b`, other rows are negatives.

    a, b: (n, dim) features (normalised here); valid: (n,) bool, the pairs that exist.
    Fewer than two valid pairs leave no negatives: the loss is then 0.
    """
    if valid is not None:
        keep = valid.bool()
        a, b = a[keep], b[keep]
    if a.shape[0] < 2:
        return a.new_zeros(())
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.t() / temperature
    targets = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
