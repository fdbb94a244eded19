"""Selective scan on the CPU: a numba kernel that keeps the state in cache.

    scan_core(u, delta, A, B, C, return_last_state=False)

u, delta: (b, d, L) fp32/fp64 (delta already biased and softplussed); A: (d, N);
B, C: (b, G, N, L), channel c using group c // (d // G). Computes

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,   y_t = <C_t, h_t>

and returns y (b, d, L) [, h_L (b, d, N)].

How: the b*d channels are cut into tiles of ``TILE`` channels of one batch
element and one B/C group; ``prange`` runs over tiles. A tile's state
(N, TILE) lives in a small local array, every step is a loop over the tile's
channels (so LLVM vectorises across channels, and exp is a polynomial that
vectorises: there is no SVML here). Nothing of size (b, d, L, N) is ever
allocated: the forward stores the state only at the start of every chunk of
``CHUNK`` steps; the backward walks the chunks in reverse, recomputes one
chunk's states (and decays) from its checkpoint into a tile-local buffer, then
runs the adjoint recurrence backwards through it:

    lam_t = gy_t * C_t + a_{t+1} * lam_{t+1}     (lam after the last step: d last_state)
    du_t  = delta_t * sum_n lam_t B_t
    dd_t  = u_t * sum_n lam_t B_t + sum_n lam_t h_{t-1} a_t A
    dA   += lam_t h_{t-1} a_t delta_t,   dB_t += lam_t delta_t u_t,   dC_t += gy_t h_t

dB and dC are summed over a tile's channels in the kernel and over the tiles of
a group by torch (one (b, G, tiles, N, L) partial, 1/TILE of the full size).

The autograd side: ``_Scan`` (forward) and ``_ScanBackward`` (its backward)
are both ``torch.autograd.Function`` with ``setup_context`` and a ``vmap`` rule
that folds the vmapped dimension into the kernel's batch dimension, so
``torch.func.vmap(torch.func.grad(f))`` (Opacus per-sample gradients) works.
A may carry its own batch dimension internally (b, d, N), which is what makes
per-sample gradients of an unbatched A come out per sample. Double backward is
not implemented.

numba's thread count follows ``torch.get_num_threads()`` at every call; the
threading layer is made fork-safe unless the user chose one (see below).
Compiled code is cached on disk (``cache=True``, in ``__pycache__`` next to this
file, else numba's user cache dir or NUMBA_CACHE_DIR): the first process
compiles for ~15-20 s (fp32 and fp64 are separate specialisations), later ones
load in ~1 s. If no cache location is writable the kernels still work,
compiled once per process (with a warning).

Vector width: LLVM tunes AVX-512 CPUs to prefer 256-bit vectors. With 32-channel
tiles, forcing 512-bit ones (NUMBA_CPU_FEATURES=...,-prefer-256-bit, or the
per-function "prefer-vector-width" attribute) measured no faster, so nothing
process-wide is changed; 16-channel tiles were ~1.2x faster with it, and
slower than 32-channel tiles without it either way.
"""
from __future__ import annotations

import math
import os
import threading
import warnings

import numpy as np
import torch

import numba
from llvmlite import ir as llvm_ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

__all__ = ["scan_core", "TILE", "CHUNK"]

# Both are compile-time constants of the kernels. Measured on a 2-core Zen 4 at
# b=2, d=384, N=16, L=4096: TILE 32 runs the backward 2x faster than 16 (half the
# horizontal sums for dB/dC), 64 is no faster; CHUNK 16 keeps the backward's
# buffers (2 * CHUNK * N * TILE values) in L1/L2, and fp64 is ~1.5x slower at 32.
TILE = 32    # channels per tile: the trip count of every inner (vectorised) loop
CHUNK = 16   # steps between forward checkpoints (memory: b*d*N*L/CHUNK values)

# Threading layer: numba's default prefers OpenMP over its own workqueue, and
# with GNU OpenMP (what pip's numba finds on Linux) a process that forks after a
# parallel kernel ran gets children that abort ("fork() called from a process
# already using GNU OpenMP") as soon as they run one: multiprocessing with fork,
# federated clients started as forks. Unless the user chose a layer, ask for a
# fork-safe one (TBB if installed, else workqueue). It only counts if no numba
# parallel code has run in this process yet.
if os.environ.get("NUMBA_THREADING_LAYER") is None and numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "forksafe"

# workqueue must not be entered from two Python threads at once; a lock makes
# concurrent callers wait (dropped after the first launch on other layers).
_launch_lock = threading.Lock()


# ---------------------------------------------------------------- exp that vectorises

@intrinsic
def _pow2i(typingctx, nf):
    """2**nf for an integral-valued float nf in the normal exponent range, built
    from the exponent bits (a bitcast: vectorises, unlike ldexp)."""
    if nf == types.float32:
        bits, bias, shift, fty = 32, 127, 23, llvm_ir.FloatType()
    elif nf == types.float64:
        bits, bias, shift, fty = 64, 1023, 52, llvm_ir.DoubleType()
    else:
        return None
    ity = llvm_ir.IntType(bits)

    def codegen(context, builder, signature, args):
        n = builder.fptosi(args[0], ity)
        e = builder.shl(builder.add(n, ity(bias)), ity(shift))
        return builder.bitcast(e, fty)

    return nf(nf), codegen


# float32 constants (numba freezes module-level numpy scalars with their dtype)
_F32_LOG2E = np.float32(1.44269504088896341)
_F32_LN2_HI = np.float32(0.693359375)
_F32_LN2_LO = np.float32(-2.12194440e-4)
_F32_ROUND = np.float32(12582912.0)      # 1.5 * 2**23: x + R - R rounds to an integer
_F32_LO = np.float32(-87.0)              # 2**-126 is the smallest normal float32
_F32_HI = np.float32(88.0)
_F32_UNDER = np.float32(-87.33654)       # exp(x) for x below this is flushed to 0
_F32_OVER = np.float32(88.72283)         # and above this is inf
_F32_P = tuple(np.float32(c) for c in (  # Cephes expf, |r| <= ln2/2, ~1 ulp
    1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
    1.6666665459e-1, 5.0000001201e-1))
_F32_ZERO, _F32_ONE, _F32_INF = np.float32(0.0), np.float32(1.0), np.float32(np.inf)

_F64_LOG2E = 1.4426950408889634
_F64_LN2_HI = 6.93145751953125e-1
_F64_LN2_LO = 1.42860682030941723212e-6
_F64_ROUND = 6755399441055744.0          # 1.5 * 2**52
_F64_LO, _F64_HI = -708.0, 709.0
_F64_UNDER, _F64_OVER = -708.3964185322641, 709.782712893384
# 1/k! for k = 13..2: Taylor to r**13 on |r| <= ln2/2 is below 1e-17 relative
_F64_P = tuple(1.0 / math.factorial(k) for k in range(13, 1, -1))


def fast_exp(x):
    """exp(x) in x's float type, written so that LLVM can vectorise it."""
    return math.exp(x)


@overload(fast_exp, jit_options={"fastmath": {"contract"}})
def _fast_exp_impl(x):
    # no reassociation here: it would fold the rounding trick and the split ln2
    if x == types.float32:
        def exp32(x):
            xc = min(max(x, _F32_LO), _F32_HI)
            n = (xc * _F32_LOG2E + _F32_ROUND) - _F32_ROUND
            r = (xc - n * _F32_LN2_HI) - n * _F32_LN2_LO
            p = _F32_P[0]
            p = p * r + _F32_P[1]
            p = p * r + _F32_P[2]
            p = p * r + _F32_P[3]
            p = p * r + _F32_P[4]
            p = p * r + _F32_P[5]
            e = (p * (r * r) + r + _F32_ONE) * _pow2i(n)
            e = _F32_ZERO if x < _F32_UNDER else e
            e = _F32_INF if x > _F32_OVER else e
            return x if x != x else e   # NaN stays NaN (the clamp above would hide it)
        return exp32
    if x == types.float64:
        def exp64(x):
            xc = min(max(x, _F64_LO), _F64_HI)
            n = (xc * _F64_LOG2E + _F64_ROUND) - _F64_ROUND
            r = (xc - n * _F64_LN2_HI) - n * _F64_LN2_LO
            p = _F64_P[0]
            p = p * r + _F64_P[1]
            p = p * r + _F64_P[2]
            p = p * r + _F64_P[3]
            p = p * r + _F64_P[4]
            p = p * r + _F64_P[5]
            p = p * r + _F64_P[6]
            p = p * r + _F64_P[7]
            p = p * r + _F64_P[8]
            p = p * r + _F64_P[9]
            p = p * r + _F64_P[10]
            p = p * r + _F64_P[11]
            e = (p * (r * r) + r + 1.0) * _pow2i(n)
            e = 0.0 if x < _F64_UNDER else e
            e = math.inf if x > _F64_OVER else e
            return x if x != x else e
        return exp64
    return None


# ---------------------------------------------------------------- kernels

def _jit(**options):
    """njit with an on-disk cache, or without one when no cache location is writable."""
    def wrap(fn):
        try:
            return njit(cache=True, **options)(fn)
        except RuntimeError as exc:  # "cannot cache function ...: no locator available"
            warnings.warn(f"cmvim.ssm.cpu_kernel: numba cannot cache {fn.__name__} ({exc}); "
                          "set NUMBA_CACHE_DIR to a writable folder to avoid recompiling "
                          "in every process", RuntimeWarning, stacklevel=2)
            return njit(cache=False, **options)(fn)
    return wrap


@_jit(parallel=True, fastmath={"contract"})
def _forward_kernel(u, dl, A, B, C, tiles_per_group, y, ckpt, last):
    """
    u, dl, y: (b, d, L); A: (b or 1, d, N); B, C: (b, G, N, L);
    ckpt: (b, tiles, n_chunks, N, TILE) state before each chunk; last: (b, d, N).
    """
    nb, dim, length = u.shape
    dstate = A.shape[2]
    per_group = dim // B.shape[1]
    ntiles = B.shape[1] * tiles_per_group
    for job in prange(nb * ntiles):
        bi = job // ntiles
        ti = job - bi * ntiles
        g = ti // tiles_per_group
        c0 = g * per_group + (ti - g * tiles_per_group) * TILE
        width = min(TILE, (g + 1) * per_group - c0)
        ai = bi if A.shape[0] > 1 else 0
        h = np.zeros((dstate, TILE), dtype=u.dtype)
        a_tile = np.zeros((dstate, TILE), dtype=u.dtype)
        dt = np.zeros(TILE, dtype=u.dtype)
        du = np.zeros(TILE, dtype=u.dtype)
        acc = np.zeros(TILE, dtype=u.dtype)
        for w in range(width):
            for n in range(dstate):
                a_tile[n, w] = A[ai, c0 + w, n]
        for t in range(length):
            if t % CHUNK == 0:
                k = t // CHUNK
                for n in range(dstate):
                    for w in range(TILE):
                        ckpt[bi, ti, k, n, w] = h[n, w]
            for w in range(width):
                dt[w] = dl[bi, c0 + w, t]
                du[w] = dt[w] * u[bi, c0 + w, t]
            for w in range(TILE):
                acc[w] = 0
            for n in range(dstate):
                bn = B[bi, g, n, t]
                cn = C[bi, g, n, t]
                for w in range(TILE):
                    hv = fast_exp(dt[w] * a_tile[n, w]) * h[n, w] + du[w] * bn
                    h[n, w] = hv
                    acc[w] += cn * hv
            for w in range(width):
                y[bi, c0 + w, t] = acc[w]
        for w in range(width):
            for n in range(dstate):
                last[bi, c0 + w, n] = h[n, w]


# reassoc lets LLVM vectorise the sums over a tile's channels (dB, dC); the exp
# is compiled separately without it
@_jit(parallel=True, fastmath={"contract", "reassoc"})
def _backward_kernel(u, dl, A, B, C, tiles_per_group, ckpt, gy, glast, has_glast,
                     want_bc, du_out, dd_out, dA_out, dB_out, dC_out):
    """
    Inputs as in _forward_kernel, gy: (b, d, L), glast: (b, d, N) (read if has_glast).
    Writes du_out, dd_out: (b, d, L); dA_out: (b, d, N) (per batch element);
    dB_out, dC_out: (b, G, tiles_per_group, N, L) partial sums (if want_bc).
    """
    nb, dim, length = u.shape
    dstate = A.shape[2]
    per_group = dim // B.shape[1]
    ntiles = B.shape[1] * tiles_per_group
    n_chunks = (length + CHUNK - 1) // CHUNK
    for job in prange(nb * ntiles):
        bi = job // ntiles
        ti = job - bi * ntiles
        g = ti // tiles_per_group
        k_in_group = ti - g * tiles_per_group
        c0 = g * per_group + k_in_group * TILE
        width = min(TILE, (g + 1) * per_group - c0)
        ai = bi if A.shape[0] > 1 else 0
        a_tile = np.zeros((dstate, TILE), dtype=u.dtype)
        hbuf = np.zeros((CHUNK + 1, dstate, TILE), dtype=u.dtype)   # h before/after each step
        abuf = np.zeros((CHUNK, dstate, TILE), dtype=u.dtype)       # decays of each step
        mu = np.zeros((dstate, TILE), dtype=u.dtype)                # a_{t+1} * lam_{t+1}
        dA_acc = np.zeros((dstate, TILE), dtype=u.dtype)
        dt = np.zeros(TILE, dtype=u.dtype)
        uu = np.zeros(TILE, dtype=u.dtype)
        dtu = np.zeros(TILE, dtype=u.dtype)
        gg = np.zeros(TILE, dtype=u.dtype)
        s = np.zeros(TILE, dtype=u.dtype)
        r = np.zeros(TILE, dtype=u.dtype)
        zero = np.zeros(1, dtype=u.dtype)
        for w in range(width):
            for n in range(dstate):
                a_tile[n, w] = A[ai, c0 + w, n]
                if has_glast:
                    mu[n, w] = glast[bi, c0 + w, n]
        for k in range(n_chunks - 1, -1, -1):
            t0 = k * CHUNK
            steps = min(CHUNK, length - t0)
            # 1. recompute this chunk's states and decays from its checkpoint
            for n in range(dstate):
                for w in range(TILE):
                    hbuf[0, n, w] = ckpt[bi, ti, k, n, w]
            for j in range(steps):
                t = t0 + j
                for w in range(width):
                    dt[w] = dl[bi, c0 + w, t]
                    dtu[w] = dt[w] * u[bi, c0 + w, t]
                for n in range(dstate):
                    bn = B[bi, g, n, t]
                    for w in range(TILE):
                        a = fast_exp(dt[w] * a_tile[n, w])
                        abuf[j, n, w] = a
                        hbuf[j + 1, n, w] = a * hbuf[j, n, w] + dtu[w] * bn
            # 2. the adjoint recurrence, backwards through the chunk
            for j in range(steps - 1, -1, -1):
                t = t0 + j
                for w in range(width):
                    dt[w] = dl[bi, c0 + w, t]
                    uu[w] = u[bi, c0 + w, t]
                    dtu[w] = dt[w] * uu[w]
                    gg[w] = gy[bi, c0 + w, t]
                for w in range(TILE):
                    s[w] = 0
                    r[w] = 0
                for n in range(dstate):
                    bn = B[bi, g, n, t]
                    cn = C[bi, g, n, t]
                    if want_bc:
                        sb = zero[0]
                        sc = zero[0]
                        for w in range(TILE):
                            lam = gg[w] * cn + mu[n, w]
                            lha = lam * hbuf[j, n, w] * abuf[j, n, w]
                            s[w] += lam * bn
                            r[w] += lha * a_tile[n, w]
                            dA_acc[n, w] += lha * dt[w]
                            mu[n, w] = lam * abuf[j, n, w]
                            sb += lam * dtu[w]
                            sc += gg[w] * hbuf[j + 1, n, w]
                        dB_out[bi, g, k_in_group, n, t] = sb
                        dC_out[bi, g, k_in_group, n, t] = sc
                    else:
                        for w in range(TILE):
                            lam = gg[w] * cn + mu[n, w]
                            lha = lam * hbuf[j, n, w] * abuf[j, n, w]
                            s[w] += lam * bn
                            r[w] += lha * a_tile[n, w]
                            dA_acc[n, w] += lha * dt[w]
                            mu[n, w] = lam * abuf[j, n, w]
                for w in range(width):
                    du_out[bi, c0 + w, t] = dt[w] * s[w]
                    dd_out[bi, c0 + w, t] = uu[w] * s[w] + r[w]
        for w in range(width):
            for n in range(dstate):
                dA_out[bi, c0 + w, n] = dA_acc[n, w]


# ---------------------------------------------------------------- launching

_locking = True   # until the threading layer is known; workqueue keeps it on


def _launch(kernel, *args):
    """Run a parallel kernel with numba's thread count set to torch's."""
    global _locking
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    if not _locking:
        kernel(*args)
        return
    with _launch_lock:
        kernel(*args)
        try:
            _locking = numba.threading_layer() == "workqueue"
        except ValueError:  # no parallel region has run yet
            pass


def _check(u, delta, A, B, C):
    if u.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"cpu scan kernel: u must be float32 or float64, got {u.dtype}")
    for name, x in (("delta", delta), ("A", A), ("B", B), ("C", C)):
        if x.dtype != u.dtype:
            raise TypeError(f"cpu scan kernel: {name} is {x.dtype}, u is {u.dtype}")
    for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if x.device.type != "cpu":
            raise RuntimeError(f"cpu scan kernel: {name} is on {x.device}, needs the CPU")
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (b, d, L), got {tuple(u.shape)} and "
                         f"{tuple(delta.shape)}")
    batch, dim, length = u.shape
    if A.dim() not in (2, 3) or A.shape[-2] != dim or (A.dim() == 3 and A.shape[0] != batch):
        raise ValueError(f"A must be (d, N) (or (b, d, N)), got {tuple(A.shape)} for d={dim}")
    dstate = A.shape[-1]
    for name, M in (("B", B), ("C", C)):
        if (M.dim() != 4 or M.shape[0] != batch or M.shape[2] != dstate
                or M.shape[3] != length or dim % M.shape[1]):
            raise ValueError(f"{name} must be (b, G, N, L) with G dividing d, got "
                             f"{tuple(M.shape)} for b={batch}, d={dim}, N={dstate}, L={length}")
    if B.shape[1] != C.shape[1]:
        raise ValueError("B and C must have the same number of groups")


def _layout(u, B):
    groups = B.shape[1]
    tiles_per_group = -(-(u.shape[1] // groups) // TILE)
    return groups, tiles_per_group


def _np(x):
    return x.detach().resolve_conj().resolve_neg().contiguous().numpy()


def _forward(u, delta, A, B, C):
    """-> y (b, d, L), last state (b, d, N), checkpoints (b, tiles, chunks, N, TILE)."""
    _check(u, delta, A, B, C)
    batch, dim, length = u.shape
    dstate = A.shape[-1]
    groups, tpg = _layout(u, B)
    A3 = A if A.dim() == 3 else A.unsqueeze(0)
    y = u.new_empty(batch, dim, length)
    last = u.new_empty(batch, dim, dstate)
    ckpt = u.new_empty(batch, groups * tpg, -(-length // CHUNK), dstate, TILE)
    if y.numel():
        _launch(_forward_kernel, _np(u), _np(delta), _np(A3), _np(B), _np(C), tpg,
                y.numpy(), ckpt.numpy(), last.numpy())
    else:
        last.zero_()
    return y, last, ckpt


def _backward(u, delta, A, B, C, ckpt, gy, glast, want_bc):
    """-> du, ddelta, dA (shaped like A), dB, dC (None unless want_bc)."""
    batch, dim, length = u.shape
    dstate = A.shape[-1]
    groups, tpg = _layout(u, B)
    A3 = A if A.dim() == 3 else A.unsqueeze(0)
    du = u.new_empty(batch, dim, length)
    dd = u.new_empty(batch, dim, length)
    dA = u.new_empty(batch, dim, dstate)
    if want_bc:
        dB = u.new_empty(batch, groups, tpg, dstate, length)
        dC = u.new_empty(batch, groups, tpg, dstate, length)
    else:
        dB = dC = u.new_empty(1, 1, 1, 1, 1)
    if gy is None:
        gy = torch.zeros_like(u)
    has_glast = glast is not None
    glast_np = _np(glast.to(u.dtype)) if has_glast else np.zeros((1, 1, 1), dtype=du.numpy().dtype)
    if u.numel():
        _launch(_backward_kernel, _np(u), _np(delta), _np(A3), _np(B), _np(C), tpg, _np(ckpt),
                _np(gy.to(u.dtype)), glast_np, has_glast, bool(want_bc),
                du.numpy(), dd.numpy(), dA.numpy(), dB.numpy(), dC.numpy())
    else:
        du.zero_(), dd.zero_(), dA.zero_(), dB.zero_(), dC.zero_()
    if A.dim() == 2:
        dA = dA.sum(0)
    if not want_bc:
        return du, dd, dA, None, None
    if tpg == 1:
        return du, dd, dA, dB.squeeze(2), dC.squeeze(2)
    return du, dd, dA, dB.sum(2), dC.sum(2)


# ---------------------------------------------------------------- autograd + vmap

def _fold(x, bdim, size):
    """Put the vmapped dimension (or an expansion to it) first and merge it into the next."""
    x = x.movedim(bdim, 0) if bdim is not None else x.expand(size, *x.shape)
    return x.reshape(size * x.shape[1], *x.shape[2:])


def _fold_A(A, bdim, size, batch, per_batch):
    """A as (size*batch, d, N): one copy per folded batch element.

    per_batch: whether A, seen from inside the vmap, already has the batch dimension."""
    A = A.movedim(bdim, 0) if bdim is not None else A.expand(size, *A.shape)
    if not per_batch:
        A = A.unsqueeze(1).expand(size, batch, *A.shape[1:])
    return A.reshape(size * batch, *A.shape[2:])


def _unfold(x, size):
    return x.reshape(size, x.shape[0] // size, *x.shape[1:])


class _Scan(torch.autograd.Function):
    """(u, delta, A, B, C) -> (y, last_state, checkpoints); checkpoints are not differentiable."""

    generate_vmap_rule = False

    @staticmethod
    def forward(u, delta, A, B, C):
        return _forward(u, delta, A, B, C)

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, delta, A, B, C = inputs
        _, _, ckpt = output
        ctx.mark_non_differentiable(ckpt)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(u, delta, A, B, C, ckpt)

    @staticmethod
    def backward(ctx, gy, glast, _gckpt):
        need = ctx.needs_input_grad[:5]
        if not any(need):
            return None, None, None, None, None
        u, delta, A, B, C, ckpt = ctx.saved_tensors
        grads = _ScanBackward.apply(u, delta, A, B, C, ckpt, gy, glast, need[3] or need[4])
        return tuple(g if n else None for g, n in zip(grads, need))

    @staticmethod
    def vmap(info, in_dims, u, delta, A, B, C):
        size = info.batch_size
        u_dim, delta_dim, A_dim, B_dim, C_dim = in_dims
        u_, delta_, B_, C_ = (_fold(x, d, size) for x, d in
                              ((u, u_dim), (delta, delta_dim), (B, B_dim), (C, C_dim)))
        batch = u_.shape[0] // size
        per_batch = A.dim() - (A_dim is not None) == 3
        if A_dim is None and not per_batch:
            A_ = A   # shared by everything: stays (d, N)
        else:
            A_ = _fold_A(A, A_dim, size, batch, per_batch)
        y, last, ckpt = _Scan.apply(u_, delta_, A_, B_, C_)
        return (_unfold(y, size), _unfold(last, size), _unfold(ckpt, size)), (0, 0, 0)


class _ScanBackward(torch.autograd.Function):
    """The kernel's backward as a Function of its own, so that it has a vmap rule."""

    generate_vmap_rule = False

    @staticmethod
    def forward(u, delta, A, B, C, ckpt, gy, glast, want_bc):
        return _backward(u, delta, A, B, C, ckpt, gy, glast, want_bc)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("double backward through the 'cpu' selective-scan kernel is not "
                           "implemented; use backend='torch' for higher-order gradients")

    @staticmethod
    def vmap(info, in_dims, u, delta, A, B, C, ckpt, gy, glast, want_bc):
        size = info.batch_size
        u_dim, delta_dim, A_dim, B_dim, C_dim, ckpt_dim, gy_dim, glast_dim, _ = in_dims
        u_, delta_, B_, C_, ckpt_ = (_fold(x, d, size) for x, d in
                                     ((u, u_dim), (delta, delta_dim), (B, B_dim),
                                      (C, C_dim), (ckpt, ckpt_dim)))
        batch = u_.shape[0] // size
        gy_ = None if gy is None else _fold(gy, gy_dim, size)
        glast_ = None if glast is None else _fold(glast, glast_dim, size)
        per_batch = A.dim() - (A_dim is not None) == 3
        # dA must come out per vmapped sample even when A is shared: give every
        # folded batch element its own A and sum dA back over the inner batch
        A_ = _fold_A(A, A_dim, size, batch, per_batch)
        du, dd, dA, dB, dC = _ScanBackward.apply(u_, delta_, A_, B_, C_, ckpt_, gy_, glast_,
                                                 want_bc)
        dA = _unfold(dA, size)
        if not per_batch:
            dA = dA.sum(1)
        outs = (_unfold(du, size), _unfold(dd, size), dA,
                None if dB is None else _unfold(dB, size),
                None if dC is None else _unfold(dC, size))
        return outs, (0, 0, 0, None if dB is None else 0, None if dC is None else 0)


def scan_core(u, delta, A, B, C, return_last_state=False):
    """
    u, delta: (b, d, L) float32/float64, delta already biased/softplussed;
    A: (d, N); B, C: (b, G, N, L). Returns y (b, d, L) without D or z
    [, last_state (b, d, N)].
    """
    y, last, _ = _Scan.apply(u, delta, A, B, C)
    return (y, last) if return_last_state else y
