"""Reference selective scan: the plain sequential recurrence.

Same shapes and semantics as mamba-ssm's ``selective_scan_ref`` (real A only).
Every faster backend in this package is tested against this function; keep it
slow and obvious.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (for tight gradient checks); everything else runs in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_groups(M: torch.Tensor, dim: int) -> torch.Tensor:
    """(b, N, L) or grouped (b, G, N, L) -> (b, dim, N, L), channel d using group d // (dim // G)."""
    if M.dim() == 3:
        return M.unsqueeze(1).expand(-1, dim, -1, -1)
    groups = M.shape[1]
    if dim % groups:
        raise ValueError(f"d_inner={dim} is not divisible by the number of B/C groups G={groups}")
    return M.repeat_interleave(dim // groups, dim=1)


def prepare_inputs(u, delta, A, delta_bias=None, delta_softplus=False):
    """u, delta, A in the compute dtype, with delta's bias and softplus applied."""
    cdt = compute_dtype(u.dtype)
    u, delta, A = u.to(cdt), delta.to(cdt), A.to(cdt)
    if delta_bias is not None:
        delta = delta + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta, A


def finish_output(y, u, D=None, z=None, dtype=None):
    """out = (y + D * u) * silu(z), cast back to the input dtype."""
    out = y if D is None else y + u * D.to(y.dtype)[:, None]
    if z is not None:
        out = out * F.silu(z.to(y.dtype))
    return out.to(dtype)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, return_last_state=False):
    """
    u, delta, z: (b, d, L);  A: (d, N);  B, C: (b, N, L) or (b, G, N, L);  D, delta_bias: (d,)
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t;   y_t = <C_t, h_t> + D * u_t
    out = y * silu(z) if z is given.  Returns out (b, d, L) [, last_state (b, d, N)].
    """
    dtype_in = u.dtype
    u, delta, A = prepare_inputs(u, delta, A, delta_bias, delta_softplus)
    cdt = u.dtype
    batch, dim, _ = u.shape
    B = expand_groups(B.to(cdt), dim)                                    # (b, d, N, L)
    C = expand_groups(C.to(cdt), dim)                                    # (b, d, N, L)
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))           # (b, d, L, N)
    deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)           # (b, d, L, N)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    # unbind rather than deltaA[:, :, t]: indexing's backward writes a full-size zero tensor per
    # step, which makes the reference quadratic in L (minutes at L=4096); unbind's is one stack
    for dA_t, dBu_t, C_t in zip(deltaA.unbind(2), deltaB_u.unbind(2), C.unbind(3)):
        h = dA_t * h + dBu_t
        ys.append(torch.einsum("bdn,bdn->bd", h, C_t))
    y = torch.stack(ys, dim=2)                                           # (b, d, L)
    out = finish_output(y, u, D, z, dtype_in)
    return (out, h) if return_last_state else out
