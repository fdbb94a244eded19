"""Every selective-scan backend against the sequential reference: forward and all gradients."""
import os
import subprocess
import sys

import pytest
import torch

from cmvim import ssm
from cmvim.ssm import available_backends, selective_scan, selective_scan_ref

FAST = [b for b in available_backends() if b not in ("ref", "cuda")]

# (batch, d, N, L, groups): L not a power of two, L=1, grouped B/C
SHAPES = [(2, 8, 4, 1, None), (1, 6, 3, 7, None), (2, 8, 4, 37, None), (3, 4, 16, 130, 2),
          (2, 12, 8, 65, 3), (1, 16, 4, 300, None)]
OPTIONS = [dict(), dict(D=True), dict(z=True), dict(delta_bias=True, delta_softplus=True),
           dict(D=True, z=True, delta_bias=True, delta_softplus=True)]


def make_inputs(batch, dim, dstate, length, groups, dtype, options, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale + shift).requires_grad_()

    bc_shape = (batch, dstate, length) if groups is None else (batch, groups, dstate, length)
    inputs = dict(
        u=rnd(batch, dim, length),
        # positive steps as after softplus, unless the scan applies softplus itself
        delta=rnd(batch, dim, length, scale=0.5) if options.get("delta_softplus")
        else (torch.rand(batch, dim, length, generator=g, dtype=dtype) * 0.5).requires_grad_(),
        A=(-torch.rand(dim, dstate, generator=g, dtype=dtype) * 4 - 0.1).requires_grad_(),
        B=rnd(*bc_shape), C=rnd(*bc_shape))
    if options.get("D"):
        inputs["D"] = rnd(dim)
    if options.get("z"):
        inputs["z"] = rnd(batch, dim, length)
    if options.get("delta_bias"):
        inputs["delta_bias"] = rnd(dim, scale=0.5, shift=-1.0)
    return inputs


def grads(fn, inputs, options, seed=1):
    out, last = fn(**inputs, delta_softplus=bool(options.get("delta_softplus")), return_last_state=True)
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=out.dtype)
    w_last = torch.randn(last.shape, generator=g, dtype=last.dtype)
    loss = (out * w_out).sum() + (last * w_last).sum()
    return out, last, torch.autograd.grad(loss, list(inputs.values()), allow_unused=True)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}d{}N{}L{}G{}".format(*s))
@pytest.mark.parametrize("opt", range(len(OPTIONS)))
def test_backend_matches_reference(backend, dtype, shape, opt):
    options = OPTIONS[opt]
    inputs = make_inputs(*shape, dtype, options, seed=opt)
    out_ref, last_ref, g_ref = grads(selective_scan_ref, inputs, options)
    out, last, g = grads(lambda **kw: selective_scan(**kw, backend=backend), inputs, options)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    assert out.dtype == dtype
    torch.testing.assert_close(out, out_ref, **tol)
    torch.testing.assert_close(last, last_ref, **tol)
    for name, a, b in zip(inputs, g, g_ref):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"grad of {name}: {m}")


def test_returns_input_dtype_and_computes_in_fp32():
    inputs = make_inputs(2, 8, 4, 20, None, torch.float32, {})
    half = {k: v.detach().to(torch.bfloat16) for k, v in inputs.items()}
    for backend in FAST + ["ref"]:
        out = selective_scan(**half, backend=backend)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), selective_scan_ref(**inputs).detach(), rtol=0.05, atol=0.05)


def test_torch_backend_works_under_vmap_of_grad():
    """Opacus' functorch path: per-sample gradients through the scan."""
    inputs = make_inputs(3, 8, 4, 33, None, torch.float64, dict(D=True))
    A, D = inputs["A"].detach(), inputs["D"].detach()

    def loss(A, D, u, delta, B, C):
        out = selective_scan(u[None], delta[None], A, B[None], C[None], D, backend="torch")
        return (out ** 2).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0, 0, 0))(
        A, D, *(inputs[k].detach() for k in ("u", "delta", "B", "C")))
    for i in range(3):
        A_i, D_i = A.clone().requires_grad_(), D.clone().requires_grad_()
        expected = torch.autograd.grad(
            loss(A_i, D_i, *(inputs[k].detach()[i] for k in ("u", "delta", "B", "C"))), (A_i, D_i))
        torch.testing.assert_close(per_sample[0][i], expected[0])
        torch.testing.assert_close(per_sample[1][i], expected[1])


def test_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert ssm.resolve_backend(cpu, "torch") == "torch"
    monkeypatch.setenv(ssm.ENV_VAR, "ref")
    assert ssm.resolve_backend(cpu) == "ref"
    monkeypatch.delenv(ssm.ENV_VAR)
    assert ssm.resolve_backend(cpu) == ("cpu" if "cpu" in available_backends() else "torch")
    with pytest.raises(ValueError, match="unknown scan backend 'cdua'"):
        ssm.resolve_backend(cpu, "cdua")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            ssm.resolve_backend(cpu, "cuda")


def test_cuda_backend_is_never_imported_on_cpu():
    code = ("import sys, torch; from cmvim.ssm import selective_scan; "
            "x = torch.randn(1, 4, 8); B = torch.randn(1, 2, 8); "
            "selective_scan(x, x.abs(), -torch.ones(4, 2), B, B); "
            "assert not any(m.startswith('mamba_ssm') for m in sys.modules), 'mamba_ssm imported'")
    env = dict(os.environ, CMVIM_SCAN_BACKEND="")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
