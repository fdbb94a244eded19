"""Bidirectional Vision-Mamba ("Vim", bimamba v2) blocks in plain PyTorch.

Parameter names, shapes and initialisation follow Vim's `mamba_simple.Mamba`
with ``bimamba_type="v2"`` and mamba-ssm's `create_block`, so state dicts move
between this code, Vim and mamba-ssm:

    layers.{i}.mixer.{in_proj, conv1d, x_proj, dt_proj, A_log, D,
                      conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b, out_proj}
    layers.{i}.norm.weight,  norm_f.weight

Opacus: no buffers, no BatchNorm, and each module with raw parameters (the
mixer: A_log, D) takes ONE input tensor, so Opacus' functorch fallback can
recompute it per sample. The scan backends are vmap-safe (see cmvim.ssm).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ssm import causal_conv1d_silu, selective_scan


class BiMamba(nn.Module):
    """Vim's bidirectional Mamba mixer: shared in/out projections, one SSM per direction.

    x -> in_proj -> (x, z); forward branch scans x, backward branch scans flip(x);
    out = out_proj(merge(y_fwd, flip(y_bwd))). Each branch: causal depthwise conv1d
    -> SiLU -> x_proj -> (dt, B, C); delta = softplus(dt_proj(dt) + bias); selective scan.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, dt_scale: float = 1.0, conv_bias: bool = True,
                 bias: bool = False, merge: str = "mean", scan_backend: str | None = None):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.merge = merge
        self.scan_backend = scan_backend
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias)
        for suffix in ("", "_b"):
            conv = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                             padding=d_conv - 1, bias=conv_bias)
            x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
            dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
            _init_dt_proj(dt_proj, self.dt_rank, dt_min, dt_max, dt_init_floor, dt_scale)
            # S4D-real init: A = -(1..N) for every channel
            A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
            setattr(self, f"conv1d{suffix}", conv)
            setattr(self, f"x_proj{suffix}", x_proj)
            setattr(self, f"dt_proj{suffix}", dt_proj)
            A_log, D = nn.Parameter(torch.log(A)), nn.Parameter(torch.ones(self.d_inner))
            A_log._no_weight_decay = D._no_weight_decay = True
            setattr(self, "A_log" if not suffix else "A_b_log", A_log)
            setattr(self, f"D{suffix}", D)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def _branch(self, x, z, conv, x_proj, dt_proj, A_log, D):
        """x, z: (b, d_inner, L) -> y (b, d_inner, L)."""
        x = causal_conv1d_silu(x, conv)                                  # causal depthwise conv + SiLU
        x_dbl = x_proj(x.transpose(1, 2))                                # (b, L, dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)             # (b, d_inner, L), bias in the scan
        return selective_scan(x, delta, -torch.exp(A_log.float()), B.transpose(1, 2), C.transpose(1, 2),
                              D.float(), z=z, delta_bias=dt_proj.bias.float(), delta_softplus=True,
                              backend=self.scan_backend)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (b, L, d_model) -> (b, L, d_model)."""
        xz = self.in_proj(hidden_states).transpose(1, 2)                 # (b, 2*d_inner, L)
        x, z = xz.chunk(2, dim=1)
        y = self._branch(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        y_b = self._branch(x.flip(-1), z.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b,
                           self.A_b_log, self.D_b)
        y = y + y_b.flip(-1)
        if self.merge == "mean":
            y = y / 2
        return self.out_proj(y.transpose(1, 2))


def _init_dt_proj(dt_proj: nn.Linear, dt_rank: int, dt_min: float, dt_max: float, floor: float,
                  scale: float) -> None:
    """mamba-ssm's init: dt log-uniform in [dt_min, dt_max]; the bias is softplus^-1(dt)."""
    std = dt_rank ** -0.5 * scale
    nn.init.uniform_(dt_proj.weight, -std, std)
    dt = torch.exp(torch.rand(dt_proj.out_features) * (math.log(dt_max) - math.log(dt_min))
                   + math.log(dt_min)).clamp(min=floor)
    with torch.no_grad():
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    dt_proj.bias._no_reinit = True


class DropPath(nn.Module):
    """Stochastic depth per sample (no parameters, so Opacus leaves it alone)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """mamba-ssm's pre-norm block: residual = drop_path(h) + residual; h = mixer(norm(residual))."""

    def __init__(self, dim: int, mixer: nn.Module, drop_path: float = 0.0):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.mixer = mixer
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden_states, residual=None):
        residual = hidden_states if residual is None else self.drop_path(hidden_states) + residual
        return self.mixer(self.norm(residual)), residual


class VimEncoder(nn.Module):
    """A stack of bidirectional Vim blocks and a final RMSNorm: (b, L, dim) -> (b, L, dim)."""

    def __init__(self, dim: int, depth: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 merge: str = "mean", drop_path: float = 0.0, scan_backend: str | None = None):
        super().__init__()
        rates = torch.linspace(0, drop_path, depth).tolist() if depth > 1 else [drop_path]
        self.layers = nn.ModuleList(
            Block(dim, BiMamba(dim, d_state=d_state, d_conv=d_conv, expand=expand, merge=merge,
                               scan_backend=scan_backend), drop_path=rate)
            for rate in rates)
        self.norm_f = nn.RMSNorm(dim, eps=1e-5)
        self.final_drop_path = DropPath(rates[-1] if rates else 0.0)
        self.apply(_init_weights)
        _rescale_prenorm_residual(self, depth)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, residual = tokens, None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        return self.norm_f(self.final_drop_path(hidden) + residual)


def _init_weights(module: nn.Module) -> None:
    """mamba-ssm's `_init_weights`: zero Linear biases (but dt_proj's), normal embeddings."""
    if isinstance(module, nn.Linear) and module.bias is not None:
        if not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


def _rescale_prenorm_residual(encoder: nn.Module, depth: int) -> None:
    """GPT-2 style: out_proj weights scaled by 1/sqrt(depth) so the residual stream stays O(1)."""
    for name, param in encoder.named_parameters():
        if name.endswith("out_proj.weight"):
            nn.init.kaiming_uniform_(param, a=math.sqrt(5))
            with torch.no_grad():
                param /= math.sqrt(depth)
