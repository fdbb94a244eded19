"""The numba selective-scan kernel (backend "cpu"): values, every gradient, vmap rules, Opacus.

Everything is checked against the sequential reference ``selective_scan_ref``
(fp64 inputs: to ~1e-10; fp32 inputs: against the fp64 reference). The first
test to run compiles the kernels (~20 s cold, ~1 s from numba's on-disk cache).
"""
import numba
import numpy as np
import pytest
import torch
from torch import nn
from torch.func import grad, vmap

import cmvim.ssm.cpu_kernel as K
from cmvim import ssm
from cmvim.ssm import selective_scan, selective_scan_ref

F64, F32 = torch.float64, torch.float32
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

# (batch, d, N, L, groups or None for (b, N, L) B/C, options). TILE is 32 and
# CHUNK 16: d=40 and d=80/G=2 leave partial tiles, d=96 has three full tiles
# summed into one dB/dC; L=16 is exactly one chunk, L=17/77/100 are not whole.
CASES = [
    (2, 8, 4, 1, None, ""),
    (1, 6, 1, 2, None, "D"),
    (2, 40, 3, 17, None, "D z"),
    (2, 16, 4, 16, 2, "bias softplus"),
    (3, 80, 5, 77, 2, "D z bias softplus"),
    (2, 96, 16, 100, None, "D"),
    (1, 12, 8, 65, 3, "z bias softplus"),
    (2, 33, 2, 40, 1, "D z bias softplus"),
]


def _random_case(seed):
    """Seeded random shapes: any L >= 1, d a multiple of the group count."""
    rng = np.random.default_rng(seed)
    groups = int(rng.choice([1, 2, 3]))
    return (int(rng.integers(1, 4)), groups * int(rng.integers(1, 30)), int(rng.integers(1, 9)),
            int(rng.integers(1, 90)), groups if rng.random() < 0.7 else None, "D z bias softplus")


CASES += [_random_case(s) for s in range(3)]


def make_inputs(batch, dim, dstate, length, groups, opts, seed=0, dtype=F64):
    """fp64 values (cast to dtype afterwards, so fp32 and fp64 runs see the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=F64)  # noqa: E731
    bc = (batch, dstate, length) if groups is None else (batch, groups, dstate, length)
    softplus = "softplus" in opts
    x = dict(u=rnd(batch, dim, length),
             delta=rnd(batch, dim, length) * 0.5 if softplus
             else torch.rand(batch, dim, length, generator=g, dtype=F64) * 0.5,
             A=-torch.rand(dim, dstate, generator=g, dtype=F64) * 4 - 0.1,
             B=rnd(*bc), C=rnd(*bc))
    if "D" in opts.split():
        x["D"] = rnd(dim)
    if "z" in opts.split():
        x["z"] = rnd(batch, dim, length)
    if "bias" in opts.split():
        x["delta_bias"] = rnd(dim) * 0.5 - 1.0
    return {k: v.to(dtype).requires_grad_() for k, v in x.items()}, softplus


def run(fn, inputs, softplus, use=("out", "last"), seed=1):
    """Output, last state and the gradients of a random projection of the outputs in `use`."""
    out, last = fn(**inputs, delta_softplus=softplus, return_last_state=True)
    g = torch.Generator().manual_seed(seed)
    loss = 0
    if "out" in use:
        loss = loss + (out * torch.randn(out.shape, generator=g, dtype=F64).to(out.dtype)).sum()
    if "last" in use:
        loss = loss + (last * torch.randn(last.shape, generator=g, dtype=F64).to(last.dtype)).sum()
    leaves = list(inputs.values())
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    # an input the used outputs do not depend on: zero gradient (the reference gives None)
    return out, last, {k: torch.zeros_like(x) if gx is None else gx
                       for (k, x), gx in zip(inputs.items(), grads)}


def close(actual, expected, rel, what):
    """max |actual - expected| <= rel * max |expected| (plus a tiny floor for all-zero refs)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, what
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= rel * scale + 1e-300, f"{what}: max error {err:.3g}, relative {err / max(scale, 1e-300):.3g}"


def cpu(**kw):
    return selective_scan(**kw, backend="cpu")


_reference_cache = {}


def reference(case):
    """The fp64 reference run of a case (computed once, shared by the fp64 and fp32 tests)."""
    if case not in _reference_cache:
        *shape, opts = case
        inputs, softplus = make_inputs(*shape, opts, seed=len(opts))
        _reference_cache[case] = run(selective_scan_ref, inputs, softplus)
    return _reference_cache[case]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}d{}N{}L{}G{}-{}".format(*c).replace(" ", "+"))
@pytest.mark.parametrize("dtype", [F64, F32], ids=["fp64", "fp32"])
def test_forward_and_every_gradient_match_reference(case, dtype):
    *shape, opts = case
    inputs, softplus = make_inputs(*shape, opts, seed=len(opts), dtype=dtype)
    out_r, last_r, g_r = reference(case)
    out, last, g = run(cpu, inputs, softplus)
    assert out.dtype == dtype and last.dtype == dtype
    rel = 1e-10 if dtype == F64 else 2e-5
    close(out, out_r, rel, "out")
    close(last, last_r, rel, "last_state")
    for name in inputs:
        close(g[name], g_r[name], rel, f"grad of {name}")


@pytest.mark.parametrize("use", [("last",), ("out",)], ids=["only-last-state", "only-out"])
def test_gradient_from_one_output_only(use):
    """Only last_state used: the adjoint starts from its gradient and gy is None (and vice versa)."""
    ref_inputs, softplus = make_inputs(2, 40, 4, 50, 2, "D z bias softplus", seed=3)
    inputs = {k: v.detach().clone().requires_grad_() for k, v in ref_inputs.items()}
    _, _, g_r = run(selective_scan_ref, ref_inputs, softplus, use=use)
    _, _, g = run(cpu, inputs, softplus, use=use)
    for name in inputs:
        close(g[name], g_r[name], 1e-10, f"grad of {name}")


def test_non_contiguous_inputs():
    x, _ = make_inputs(2, 40, 4, 37, 2, "D", seed=4)
    x = {k: v.detach() for k, v in x.items()}
    # same values in other memory layouts: transposed storage, a strided slice, a permutation
    nc = dict(u=x["u"].transpose(1, 2).contiguous().transpose(1, 2),
              delta=x["delta"].repeat_interleave(2, dim=2)[..., ::2],
              A=x["A"].t().contiguous().t(),
              B=x["B"].permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0),
              C=x["C"], D=x["D"])
    assert not any(nc[k].is_contiguous() for k in ("u", "delta", "A", "B"))
    out, _, g = run(cpu, {k: v.requires_grad_() for k, v in nc.items()}, False)
    out_r, _, g_r = run(selective_scan_ref, {k: v.clone().requires_grad_() for k, v in x.items()}, False)
    close(out, out_r, 1e-10, "out")
    for name in nc:
        close(g[name], g_r[name], 1e-10, f"grad of {name}")


def test_inputs_without_grad_skip_the_dB_dC_sums(monkeypatch):
    calls = []
    real = K._backward

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(K, "_backward", spy)
    x, _ = make_inputs(2, 40, 4, 21, None, "", seed=5)
    x = {k: v.detach() for k, v in x.items()}
    u = x["u"].clone().requires_grad_()
    (gu,) = torch.autograd.grad(cpu(**dict(x, u=u)).square().sum(), [u])
    u_r = x["u"].clone().requires_grad_()
    (gu_r,) = torch.autograd.grad(selective_scan_ref(**dict(x, u=u_r)).square().sum(), [u_r])
    close(gu, gu_r, 1e-10, "grad of u")
    assert calls == [False]
    # nothing requires grad: no backward at all, and no graph
    with torch.no_grad():
        assert not cpu(**x).requires_grad


def test_vmap_of_grad_equals_per_sample_loop():
    """Per-sample gradients (Opacus' functorch path) of shared raw parameters A, D, delta_bias,
    with per-sample u, delta, B, z and a C shared by all samples."""
    x, _ = make_inputs(4, 40, 3, 29, 2, "D z bias", seed=6)
    x = {k: v.detach() for k, v in x.items()}
    C = x["C"][0]

    def loss(A, D, bias, u, delta, B, z, C):
        out, last = selective_scan(u[None], delta[None], A, B[None], C[None], D, z[None], bias, True, True,
                                   backend=backend)
        return (out.sin()).sum() + (last * 1.5).sum()

    params = (x["A"], x["D"], x["delta_bias"])
    per_sample = (x["u"], x["delta"], x["B"], x["z"])
    argnums = (0, 1, 2, 3, 4, 5, 6)
    backend = "cpu"
    got = vmap(grad(loss, argnums=argnums), in_dims=(None, None, None, 0, 0, 0, 0, None))(*params, *per_sample, C)
    backend = "ref"
    for i in range(4):
        want = grad(loss, argnums=argnums)(*params, *(t[i] for t in per_sample), C)
        for k, (a, b) in enumerate(zip(got, want)):
            close(a[i], b, 1e-10, f"sample {i}, argument {k}")


def test_vmap_forward_batching_some_inputs():
    x, _ = make_inputs(2, 40, 3, 23, 2, "", seed=7)
    u, delta, A, B, C = (x[k].detach() for k in ("u", "delta", "A", "B", "C"))
    g = torch.Generator().manual_seed(8)
    ref = lambda **kw: selective_scan_ref(**dict(dict(u=u, delta=delta, A=A, B=B, C=C), **kw))  # noqa: E731

    Bs = torch.randn(3, *B.shape, generator=g, dtype=F64)
    y = vmap(lambda b: cpu(u=u, delta=delta, A=A, B=b, C=C))(Bs)
    for i in range(3):
        close(y[i], ref(B=Bs[i]), 1e-10, f"B batched, sample {i}")

    As = -torch.rand(3, *A.shape, generator=g, dtype=F64) * 3
    y, last = vmap(lambda a: cpu(u=u, delta=delta, A=a, B=B, C=C, return_last_state=True))(As)
    for i in range(3):
        y_r, last_r = selective_scan_ref(u, delta, As[i], B, C, return_last_state=True)
        close(y[i], y_r, 1e-10, f"A batched, sample {i}")
        close(last[i], last_r, 1e-10, f"A batched, last state {i}")

    # u batched along dim 2 and delta along dim 0, the rest shared
    us = torch.randn(2, 40, 3, 23, generator=g, dtype=F64)
    ds = torch.rand(3, 2, 40, 23, generator=g, dtype=F64)
    y = vmap(lambda a, b: cpu(u=a, delta=b, A=A, B=B, C=C), in_dims=(2, 0))(us, ds)
    for i in range(3):
        close(y[i], ref(u=us[:, :, i], delta=ds[i]), 1e-10, f"u/delta batched, sample {i}")

    # nested: A over the outer vmap, u over the inner one
    y = vmap(vmap(lambda a, b: cpu(u=a, delta=delta, A=b, B=B, C=C), in_dims=(0, None)),
             in_dims=(None, 0))(us.movedim(2, 0), As[:2])
    for i in range(2):
        for j in range(3):
            close(y[i, j], ref(u=us[:, :, j], A=As[i]), 1e-10, f"nested, sample {i}, {j}")


def test_grad_through_vmapped_forward():
    """Backward of a vmapped call: an unbatched A's gradient is summed over the vmapped samples."""
    x, _ = make_inputs(2, 24, 3, 19, None, "", seed=9)
    u, delta, B, C = (x[k].detach() for k in ("u", "delta", "B", "C"))
    us = torch.randn(3, *u.shape, generator=torch.Generator().manual_seed(10), dtype=F64)
    A = x["A"].detach().clone().requires_grad_()
    vmap(lambda a: cpu(u=a, delta=delta, A=A, B=B, C=C))(us).square().sum().backward()
    A_r = x["A"].detach().clone().requires_grad_()
    sum(selective_scan_ref(us[i], delta, A_r, B, C).square().sum() for i in range(3)).backward()
    close(A.grad, A_r.grad, 1e-10, "grad of A")


def test_double_backward_raises():
    x, _ = make_inputs(1, 8, 2, 9, None, "", seed=11)
    A = x["A"].detach().requires_grad_()
    (gA,) = torch.autograd.grad(cpu(u=x["u"].detach(), delta=x["delta"].detach(), A=A,
                                    B=x["B"].detach(), C=x["C"].detach()).sum(), [A], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gA.sum().backward()


def test_thread_count_follows_torch():
    before = torch.get_num_threads()
    x, _ = make_inputs(1, 8, 2, 9, None, "", seed=12)
    try:
        torch.set_num_threads(1)
        cpu(**{k: v.detach() for k, v in x.items()})
        assert numba.get_num_threads() == 1
        torch.set_num_threads(max(1, min(2, numba.config.NUMBA_NUM_THREADS)))
        cpu(**{k: v.detach() for k, v in x.items()})
        assert numba.get_num_threads() == max(1, min(2, numba.config.NUMBA_NUM_THREADS))
    finally:
        torch.set_num_threads(before)


def test_dispatcher_offers_the_kernel():
    assert "cpu" in ssm.available_backends()
    assert ssm.resolve_backend(torch.device("cpu"), "cpu") == "cpu"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_polynomial_exp(dtype):
    @numba.njit
    def exp_all(x, out):
        for i in range(x.size):
            out[i] = K.fast_exp(x[i])

    x = np.concatenate([np.linspace(-80, 80, 100_001), -np.geomspace(1e-8, 80, 10_001),
                        [0.0, -1e-30, 1e-30]]).astype(dtype)
    out = np.empty_like(x)
    exp_all(x, out)
    want = np.exp(x.astype(np.float64))
    if dtype == np.float32:
        ulp = np.spacing(want.astype(np.float32)).astype(np.float64)
        assert np.max(np.abs(out - want) / ulp) <= 2.0
    else:
        assert np.max(np.abs(out - want) / want) <= 4e-16
    # past the exponent range: 0 and inf, as np.exp
    far = 120.0 if dtype == np.float32 else 800.0
    edge = np.array([-far, -1e4, far, 1e4, np.inf, -np.inf, np.nan], dtype=dtype)
    out = np.empty_like(edge)
    exp_all(edge, out)
    assert out[:-1].tolist() == [0.0, 0.0, np.inf, np.inf, np.inf, 0.0] and np.isnan(out[-1])


# ---------------------------------------------------------------- Opacus

class ScanLayer(nn.Module):
    """A leaf module with raw parameters only (Opacus has no grad sampler for it, so hooks mode
    falls back to functorch): x (batch, L, d) -> (batch, L, d) through the cpu kernel."""

    def __init__(self, dim, dstate):
        super().__init__()
        g = torch.Generator().manual_seed(13)
        self.A_log = nn.Parameter(torch.rand(dim, dstate, generator=g).log1p())
        self.D = nn.Parameter(torch.randn(dim, generator=g))
        self.dt_bias = nn.Parameter(torch.randn(dim, generator=g) * 0.3 - 1)
        self.W_bc = nn.Parameter(torch.randn(2 * dstate, dim, generator=g) / dim ** 0.5)

    def forward(self, x):
        u = x.transpose(1, 2)
        B, C = torch.einsum("bld,nd->bnl", x, self.W_bc).chunk(2, dim=1)
        return selective_scan(u, u.tanh(), -torch.exp(self.A_log), B, C, D=self.D, z=u,
                              delta_bias=self.dt_bias, delta_softplus=True, backend="cpu").transpose(1, 2)


class Toy(nn.Module):
    def __init__(self, dim=12, dstate=4):
        super().__init__()
        self.inp = nn.Linear(5, dim)
        self.scan = ScanLayer(dim, dstate)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        return self.head(self.scan(self.inp(x)).mean(dim=1))


@pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing")
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_opacus_per_sample_gradients(mode):
    import opacus
    torch.manual_seed(0)
    model, reference = Toy().double(), Toy().double()
    reference.load_state_dict(model.state_dict())
    x, labels = torch.randn(4, 10, 5, dtype=F64), torch.tensor([0, 2, 1, 2])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_size=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    private, optimizer, _ = opacus.PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0, max_grad_norm=1e6,
        grad_sample_mode=mode, poisson_sampling=False)
    nn.functional.cross_entropy(private(x), labels).backward()
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert param.grad_sample is not None, name
        for i in range(len(x)):
            reference.zero_grad()
            nn.functional.cross_entropy(reference(x[i:i + 1]), labels[i:i + 1]).backward()
            close(param.grad_sample[i], ref_params[name].grad, 1e-9, f"{mode}: {name}, sample {i}")
    assert {"scan.A_log", "scan.D", "scan.dt_bias", "scan.W_bc"} <= set(ref_params)
