"""Chunked selective scan made only of ordinary differentiable torch ops.

Why this shape: torch.func.vmap (and so Opacus' per-sample gradients) works
through plain ops but not through custom kernels without vmap rules, so this is
the backend that always works. It splits L into chunks of T steps:

1. inside every chunk, all chunks at once, a T-step loop from a zero state
   (the decays exp(delta*A) are in (0, 1], so nothing overflows, unlike the
   cumsum/exp(-cumsum) trick);
2. a loop over the L/T chunk boundaries carries the true state across chunks;
3. each position adds its carried-in state times the running decay.

With T ~ sqrt(L) that is ~2*sqrt(L) Python steps on large tensors instead of
L steps on small ones. Tensors are laid out (T, b, G, H, nc, N) so the per-step
slices are contiguous and grouped B/C broadcast without copies (d = G*H).
"""
from __future__ import annotations

import math

import torch


def chunk_size(length: int) -> int:
    """Steps per chunk: about sqrt(L), at least 4."""
    return max(4, int(2 ** round(math.log2(max(1.0, math.sqrt(length))))))


def scan_core(u, delta, A, B, C, return_last_state=False):
    """
    u, delta: (b, d, L) in the compute dtype, delta already biased/softplussed;
    A: (d, N); B, C: (b, G, N, L).  Returns y (b, d, L) without D or z
    [, last_state (b, d, N)].
    """
    batch, dim, length = u.shape
    groups, dstate = B.shape[1], A.shape[1]
    per_group = dim // groups
    T = min(chunk_size(length), length)
    nc = -(-length // T)
    pad = nc * T - length
    if pad:
        # delta = 0 on padded steps: decay exp(0) = 1 and no input, the state passes through
        u = torch.nn.functional.pad(u, (0, pad))
        delta = torch.nn.functional.pad(delta, (0, pad))
        B = torch.nn.functional.pad(B, (0, pad))
        C = torch.nn.functional.pad(C, (0, pad))

    def steps_first(x):  # (b, d, L) -> (T, b, G, H, nc, 1)
        return x.reshape(batch, groups, per_group, nc, T).permute(4, 0, 1, 2, 3).unsqueeze(-1).contiguous()

    def steps_first_bc(M):  # (b, G, N, L) -> (T, b, G, 1, nc, N)
        return M.reshape(batch, groups, dstate, nc, T).permute(4, 0, 1, 3, 2).unsqueeze(3).contiguous()

    A_ = A.reshape(groups, per_group, 1, dstate)                         # (G, H, 1, N)
    delta_t = steps_first(delta)
    dA = delta_t * A_                                                    # (T, b, G, H, nc, N)
    decay = torch.exp(dA)
    inputs = (delta_t * steps_first(u)) * steps_first_bc(B)              # (T, b, G, H, nc, N)
    C_t = steps_first_bc(C)                                              # (T, b, G, 1, nc, N)

    # 1. inside every chunk from a zero state. unbind, not indexing: the backward
    # of x[t] allocates a full-size zero tensor per step, unbind's is one stack.
    decay_t, inputs_t, C_steps = decay.unbind(0), inputs.unbind(0), C_t.unbind(0)
    h = inputs_t[0]
    y_local = [(h * C_steps[0]).sum(-1)]
    for t in range(1, T):
        h = decay_t[t] * h + inputs_t[t]
        y_local.append((h * C_steps[t]).sum(-1))
    y = torch.stack(y_local)                                             # (T, b, G, H, nc)

    # 2. carry the state across chunk boundaries
    # sum_t delta_t * A = A * sum_t delta_t: the cumsum runs on the small (b, d, L) tensor
    run_decay = torch.exp(torch.cumsum(delta_t, dim=0) * A_)             # (T, b, G, H, nc, N)
    chunk_decay, chunk_end = run_decay[-1], h                            # (b, G, H, nc, N)
    decay_c, end_c = chunk_decay.unbind(-2), chunk_end.unbind(-2)
    carry = [torch.zeros_like(end_c[0])]
    for c in range(1, nc + (1 if return_last_state else 0)):
        carry.append(decay_c[c - 1] * carry[-1] + end_c[c - 1])
    last_state = carry.pop() if return_last_state else None
    carried = torch.stack(carry, dim=-2)                                 # (b, G, H, nc, N)

    # 3. each step adds its chunk's carried-in state, decayed up to that step
    y = y + (run_decay * carried * C_t).sum(-1)
    y = y.permute(1, 2, 3, 4, 0).reshape(batch, dim, nc * T)[..., :length]
    if return_last_state:
        return y, last_state.reshape(batch, dim, dstate)
    return y
