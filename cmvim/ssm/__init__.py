"""Selective scan (the S6 recurrence of Mamba): one function, several backends.

    selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                   delta_softplus=False, return_last_state=False)

Shapes and semantics are those of mamba-ssm's ``selective_scan_ref``:
u, delta, z: (b, d, L); A: (d, N); B, C: (b, N, L) or grouped (b, G, N, L);
D, delta_bias: (d,). Computed in fp32 (fp64 inputs stay fp64), returned in the
input dtype.

Backends:
  ref    the sequential loop (``ref.py``), the reference for tests.
  torch  chunked scan of plain torch ops: vmap-safe (Opacus), any device.
  cpu    numba kernel keeping the state in cache, with its own backward and a
         vmap rule; the CPU default when numba is installed.
  cuda   mamba-ssm's fused kernel, for CUDA tensors when the `cuda` extra is
         installed. Never imported otherwise.

Choice: ``backend=`` argument > ``set_backend()`` > env ``CMVIM_SCAN_BACKEND``
> automatic (cuda on CUDA if available, else cpu on CPU if available, else torch).
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

from .ref import finish_output, prepare_inputs, selective_scan_ref

BACKENDS = ("ref", "torch", "cpu", "cuda")
ENV_VAR = "CMVIM_SCAN_BACKEND"
_forced: str | None = None

__all__ = ["selective_scan", "selective_scan_ref", "causal_conv1d_silu", "available_backends", "set_backend",
           "get_backend", "resolve_backend", "BACKENDS"]


@functools.cache
def _probe(name: str) -> str | None:
    """None when the backend can run here, else why it cannot."""
    if name in ("ref", "torch"):
        return None
    if name == "cpu":
        try:
            importlib.import_module("cmvim.ssm.cpu_kernel")
        except Exception as exc:  # noqa: BLE001 - llvmlite failing to load its library raises OSError, not ImportError
            return f"numba kernel unavailable ({type(exc).__name__}: {exc})"
        return None
    if name == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device"
        try:
            importlib.import_module("mamba_ssm.ops.selective_scan_interface")
        except Exception as exc:  # noqa: BLE001 - mamba-ssm raises more than ImportError without its extension
            return f"mamba-ssm not importable ({type(exc).__name__}: {exc}); install the `cuda` extra"
        return None
    raise ValueError(f"unknown scan backend {name!r}; choose one of {', '.join(BACKENDS)}")


def available_backends() -> list[str]:
    return [name for name in BACKENDS if _probe(name) is None]


def set_backend(name: str | None) -> None:
    """Force a backend for this process (None: back to env var / automatic)."""
    global _forced
    if name is not None:
        _require(name)
    _forced = name


def get_backend() -> str | None:
    return _forced or os.environ.get(ENV_VAR) or None


def _require(name: str) -> None:
    reason = _probe(name)
    if reason is not None:
        raise RuntimeError(f"scan backend {name!r} cannot run here: {reason}")


def _under_vmap(tensor: torch.Tensor) -> bool:
    return torch._C._functorch.is_batchedtensor(tensor) or torch._C._functorch.is_gradtrackingtensor(tensor)


def resolve_backend(device: torch.device, backend: str | None = None, vmapped: bool = False) -> str:
    """The backend a call on `device` would use (`vmapped`: inside torch.func transforms)."""
    name = backend or get_backend()
    if name and name != "auto":
        _require(name)
        if name == "cuda" and device.type != "cuda":
            raise RuntimeError("scan backend 'cuda' needs CUDA tensors")
        if name == "cpu" and device.type != "cpu":
            raise RuntimeError("scan backend 'cpu' needs CPU tensors")
        return name
    if device.type == "cuda" and _probe("cuda") is None and not vmapped:
        return "cuda"    # mamba-ssm's Function has no vmap rule
    if device.type == "cuda" and not vmapped:
        _warn_slow_gpu_scan()
    if device.type == "cpu" and _probe("cpu") is None:
        return "cpu"
    return "torch"


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend: str | None = None):
    if A.is_complex():
        raise NotImplementedError("complex A is not supported")
    if B.dim() not in (3, 4) or C.dim() not in (3, 4):
        raise ValueError("B and C must be (b, N, L) or grouped (b, G, N, L)")
    name = resolve_backend(u.device, backend, vmapped=_under_vmap(u))
    if name == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                  return_last_state)
    if name == "cuda":
        from .cuda import selective_scan_cuda
        return selective_scan_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                   return_last_state)
    core = _core(name)
    dtype_in = u.dtype
    u, delta, A = prepare_inputs(u, delta, A, delta_bias, delta_softplus)
    cdt = u.dtype
    B = (B if B.dim() == 4 else B.unsqueeze(1)).to(cdt)
    C = (C if C.dim() == 4 else C.unsqueeze(1)).to(cdt)
    if u.shape[1] % B.shape[1] or u.shape[1] % C.shape[1]:
        raise ValueError(f"d_inner={u.shape[1]} is not divisible by the number of B/C groups")
    if B.shape[1] != C.shape[1]:
        if max(B.shape[1], C.shape[1]) % min(B.shape[1], C.shape[1]):
            raise ValueError(f"B has {B.shape[1]} groups and C {C.shape[1]}: one must divide the other")
        # the kernels index one group count; share the finer grouping
        groups = max(B.shape[1], C.shape[1])
        B = B.repeat_interleave(groups // B.shape[1], dim=1)
        C = C.repeat_interleave(groups // C.shape[1], dim=1)
    result = core(u, delta, A, B, C, return_last_state)
    y, last_state = result if return_last_state else (result, None)
    out = finish_output(y, u, D, z, dtype_in)
    return (out, last_state) if return_last_state else out


@functools.cache
def _warn_slow_gpu_scan() -> None:
    """Once a process: a GPU site without the fused kernel trains several times slower."""
    warnings.warn(f"cmvim: the selective scan runs as plain torch ops on the GPU ({_probe('cuda')}); "
                  "mamba-ssm's fused kernel is several times faster: pip install 'cmvim[cuda]'", stacklevel=3)


@functools.cache
def _fused_conv():
    """causal-conv1d's fused kernel, when installed and a GPU is here; else None."""
    if not torch.cuda.is_available():
        return None
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:  # noqa: BLE001  (its extension raises more than ImportError when built for another CUDA)
        return None
    return causal_conv1d_fn


def causal_conv1d_silu(x: torch.Tensor, conv: torch.nn.Conv1d) -> torch.Tensor:
    """SiLU(causal depthwise conv1d(x)), x (b, d, L): causal-conv1d's fused kernel for CUDA tensors
    where the `cuda` extra installed it (outside vmap: it has no batching rule), else PyTorch's
    conv with left padding, the reference. Same parameters either way (conv.weight (d, 1, w))."""
    fused = _fused_conv() if x.is_cuda and not _under_vmap(x) else None
    if fused is not None:
        return fused(x.contiguous(), conv.weight.squeeze(1), conv.bias, activation="silu")
    return torch.nn.functional.silu(conv(x)[..., :x.shape[-1]])


def _core(name: str):
    if name == "torch":
        from .torch_scan import scan_core
        return scan_core
    from .cpu_kernel import scan_core
    return scan_core
