"""Free-text report encoder: byte-level tokens, small Vim encoder, trained from scratch.

Byte-level means no vocabulary file to download (hospitals are air-gapped) and
every language and typo tokenises. Encoders are pluggable through
`REPORT_ENCODERS`; a frozen pretrained encoder loaded from a local path can be
registered there later.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..data.reports import PAD, VOCAB_SIZE
from ..model_config import ReportConfig
from .vim import VimEncoder

class ByteEmbedding(nn.Module):
    """Byte tokens (b, L) -> (b, L, dim) with learned positions."""

    def __init__(self, dim: int, max_bytes: int):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB_SIZE, dim, padding_idx=PAD)
        self.pos_embed = nn.Parameter(torch.randn(1, max_bytes, dim) * 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokens(ids) + self.pos_embed[:, :ids.shape[1]]


class BytesVimReportEncoder(nn.Module):
    """(ids (b, L)) -> (b, out_dim): bytes -> Vim blocks -> mean over non-pad tokens -> linear."""

    def __init__(self, cfg: ReportConfig, out_dim: int, scan_backend: str | None = None):
        super().__init__()
        self.embed = ByteEmbedding(cfg.dim, cfg.max_bytes)
        self.encoder = VimEncoder(cfg.dim, cfg.depth, scan_backend=scan_backend)
        self.proj = nn.Linear(cfg.dim, out_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embed(ids))                            # (b, L, dim)
        keep = (ids != PAD).to(hidden.dtype)[..., None]
        pooled = (hidden * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return self.proj(pooled)


REPORT_ENCODERS: dict[str, Callable[..., nn.Module]] = {"bytes-vim": BytesVimReportEncoder}


def build_report_encoder(cfg: ReportConfig, out_dim: int, scan_backend: str | None = None) -> nn.Module:
    return REPORT_ENCODERS[cfg.encoder](cfg, out_dim, scan_backend=scan_backend)
