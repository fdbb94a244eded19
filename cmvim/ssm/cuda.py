"""mamba-ssm's fused CUDA selective scan (the `cuda` extra). Imported only for CUDA tensors.

mamba-ssm's autograd.Function has no vmap rule, so under torch.func.vmap (Opacus'
per-sample gradients) the dispatcher routes CUDA tensors to the `torch` backend.
"""
from __future__ import annotations

from mamba_ssm.ops.selective_scan_interface import selective_scan_fn


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False):
    contiguous = [t.contiguous() if t is not None else None for t in (u, delta, A, B, C, D, z, delta_bias)]
    u, delta, A, B, C, D, z, delta_bias = contiguous
    if D is not None:
        D = D.float()
    if delta_bias is not None:
        delta_bias = delta_bias.float()
    return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
