"""The GPU check, in one go on a CUDA machine (a few minutes on one data-centre GPU):

    PYTHONPATH=. python benchmarks/gpu.py [--out docs/benchmarks/gpu.md] [--quick]

1. Kernels: mamba-ssm's fused selective scan (the `cuda` backend) against cmvim.ssm's torch scan
   on the same GPU and the numba kernel on the CPU (the reference implementations), forward and
   gradients in fp32, max relative error; causal-conv1d's fused conv against PyTorch's.
2. Throughput: pretraining and fine-tuning steps (forward, backward, optimizer) of the paper's
   `base` model at 128^3 in bf16, and of the `small` preset, in subjects/s with peak GPU memory.
3. A federated simulation: `cmvim-sim` with 3 sites sharing the one GPU (gpus_per_site 0.3) on a
   small synthetic cohort, end to end, checked by its metrics.json.

Each part records its own failure and the rest go on; the table (markdown) goes to --out with
the GPU's name, torch/CUDA/mamba-ssm versions, and is printed. Without CUDA it says so and stops.
"""
from __future__ import annotations

import sys
sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("benchmarks")]   # benchmarks/ssl.py must not shadow the ssl module
import argparse
import importlib.metadata
import json
import os
import subprocess
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


DEVICE = "cuda"          # --dry-run-on-cpu: every code path on the CPU, to check the script itself


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-12))


def kernels(rows: list, quick: bool) -> None:
    from cmvim.ssm import available_backends, causal_conv1d_silu, selective_scan
    print("kernels: backends available", available_backends(), flush=True)
    shapes = [(2, 192, 256, 16)] if quick else [(2, 192, 256, 16), (4, 1536, 1024, 16)]
    for b, d, length, n in shapes:
        g = torch.Generator().manual_seed(0)
        u = torch.randn(b, d, length, generator=g)
        delta = torch.randn(b, d, length, generator=g) * 0.5
        A = -torch.rand(d, n, generator=g) - 0.5
        B, C = torch.randn(b, n, length, generator=g), torch.randn(b, n, length, generator=g)
        D, z, bias = torch.randn(d, generator=g), torch.randn(b, d, length, generator=g), torch.randn(d, generator=g) * 0.1
        grad_out = torch.randn(b, d, length, generator=g)

        def run(backend: str, device: str):
            leaves = [t.to(device).requires_grad_(True) for t in (u, delta, A, B, C, D, z, bias)]
            out = selective_scan(*leaves[:6], z=leaves[6], delta_bias=leaves[7], delta_softplus=True, backend=backend)
            out.backward(grad_out.to(device))
            return out.detach().cpu(), [t.grad.cpu() for t in leaves]

        reference = run("cpu" if "cpu" in available_backends() else "torch", "cpu")
        for backend in ("torch", "cuda"):
            try:
                out, grads = run(backend, DEVICE)
                err_f = _rel(out, reference[0])
                err_g = max(_rel(x, y) for x, y in zip(grads, reference[1]))
                rows.append(["kernel", f"scan `{backend}` on GPU vs CPU reference, b{b} d{d} L{length} N{n}",
                             f"fwd {err_f:.1e}, grads {err_g:.1e}", "ok" if max(err_f, err_g) < 1e-3 else "CHECK"])
            except Exception as exc:  # noqa: BLE001
                rows.append(["kernel", f"scan `{backend}` on GPU, b{b} d{d} L{length}", "", f"failed: {exc!r}"[:200]])
    conv = torch.nn.Conv1d(192, 192, 4, groups=192, padding=3)
    x = torch.randn(2, 192, 256)
    expect = torch.nn.functional.silu(conv(x)[..., :256])
    got = causal_conv1d_silu(x.to(DEVICE), conv.to(DEVICE)).detach().cpu()
    from cmvim.ssm import _fused_conv
    rows.append(["kernel", "causal conv1d + SiLU on GPU vs PyTorch CPU"
                 + (" (causal-conv1d fused)" if _fused_conv() else " (PyTorch conv: causal-conv1d not installed)"),
                 f"fwd {_rel(got, expect.detach()):.1e}", "ok" if _rel(got, expect.detach()) < 1e-3 else "CHECK"])


def throughput(rows: list, quick: bool) -> None:
    from cmvim import engine
    from cmvim.device import Precision
    from cmvim.model import CMViM, CMViMClassifier, model_config
    from cmvim.simulations.toy import synthetic_batch
    device = torch.device(DEVICE)
    cases = [("small", 8), ("base", 4)] if not quick else [("small", 8)]
    for preset, batch_size in cases:
        mc = model_config(preset, readout="tokens")
        for precision_name in ("bf16", "fp32"):
            precision = Precision.resolve(precision_name, device)
            for phase in ("pretrain", "finetune"):
                try:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    model = (CMViM(mc) if phase == "pretrain" else CMViMClassifier(mc)).to(device)
                    optimizer = engine.make_optimizer(model, 1e-4)
                    batch = synthetic_batch(mc, batch_size, seed=0)
                    batch["label"] = torch.arange(batch_size) % 2
                    loss_fn = engine.pretrain_loss if phase == "pretrain" else engine.classification_loss()
                    steps = 3 if quick else 10
                    engine.train(model, [batch] * 2, optimizer, loss_fn, precision=precision)   # warm-up
                    sync()
                    start = time.perf_counter()
                    engine.train(model, [batch] * steps, optimizer, loss_fn, precision=precision)
                    sync()
                    seconds = time.perf_counter() - start
                    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
                    rows.append(["throughput", f"{preset} ({mc.img_size}^3, width {mc.embed_dim}, depth {mc.depth}) "
                                 f"{phase}, batch {batch_size}, {precision_name}",
                                 f"{steps * batch_size / seconds:.1f} subjects/s, peak {peak:.1f} GiB", "ok"])
                    del model, optimizer
                except Exception as exc:  # noqa: BLE001
                    rows.append(["throughput", f"{preset} {phase} {precision_name}", "", f"failed: {exc!r}"[:200]])


def simulation(rows: list, quick: bool, workdir: Path) -> None:
    import yaml
    config = {"seed": 0, "cohort": {"sites": 3, "subjects": 30, "shape": 32, "seed": 5, "effect_scale": 3.0},
              "model": {"preset": "tiny", "readout": "tokens"},
              "preprocess": {"shape": 32, "voxel_size": 6.0, "normalize": {"mri": "zscore", "pet": "suvr"}},
              "pretrain": {"rounds": 2, "local_epochs": 1, "batch_size": 8},
              "finetune": {"rounds": 2, "probe_rounds": 1, "local_epochs": 1, "batch_size": 8, "lr": 1e-4},
              "strategy": {"min_nodes": 3}, "evaluation": {"bootstrap": 100},
              "device": "auto", "gpus_per_site": 0.3 if DEVICE == "cuda" else 0.0, "threads_per_site": 1}
    path = workdir / "gpu_sim.yaml"
    path.write_text(yaml.safe_dump(config))
    out = workdir / "gpu_sim"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cmvim.simulations.cli", "--config", str(path), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env=dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                                   PYTHONPATH=str(ROOT)))
    minutes = (time.perf_counter() - start) / 60
    metrics = out / "metrics.json"
    if proc.returncode == 0 and metrics.exists():
        data = json.loads(metrics.read_text())
        aucs = {k: v.get("auc") for k, v in data["sites"].items()}
        rows.append(["simulation", "cmvim-sim, 3 sites on one GPU (gpus_per_site 0.3, tiny model, 2+2 rounds)",
                     f"{minutes:.1f} min, per-site AUC " + ", ".join(f"{k} {v:.2f}" for k, v in aucs.items() if v is not None),
                     "ok"])
    else:
        tail = (proc.stdout + proc.stderr)[-1500:]
        print(tail)
        rows.append(["simulation", "cmvim-sim, 3 sites on one GPU", f"{minutes:.1f} min",
                     f"failed (exit {proc.returncode}): {tail[-160:]!r}"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "gpu.md")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "cmvim-gpu")
    parser.add_argument("--quick", action="store_true", help="one shape, the small model only")
    parser.add_argument("--skip", nargs="*", default=[], choices=["kernels", "throughput", "simulation"])
    parser.add_argument("--dry-run-on-cpu", action="store_true",
                        help="run every part on the CPU (the numbers mean nothing): checks the script without a GPU")
    args = parser.parse_args()
    global DEVICE
    if args.dry_run_on_cpu:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here; nothing measured")
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "none (a dry run on the CPU)"
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30 if DEVICE == "cuda" else 0
    header = (f"GPU: **{name}** ({memory:.0f} GiB), "
              f"torch {torch.__version__} (CUDA {torch.version.cuda}), mamba-ssm {_version('mamba-ssm')}, "
              f"causal-conv1d {_version('causal-conv1d')}; {time.strftime('%Y-%m-%d')}")
    print(header, flush=True)
    rows: list = []
    for part, fn in (("kernels", kernels), ("throughput", throughput), ("simulation", simulation)):
        if part in args.skip:
            continue
        start = time.perf_counter()
        try:
            fn(rows, args.quick, args.workdir) if part == "simulation" else fn(rows, args.quick)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            rows.append([part, "", "", f"failed: {exc!r}"[:200]])
        print(f"{part}: done [{time.perf_counter() - start:.0f}s]", flush=True)
    from cmvim.tables import format_table
    table = format_table(["part", "what", "result", "status"], rows)
    text = (f"# GPU check (`benchmarks/gpu.py`)\n\n{header}\n\n"
            f"`PYTHONPATH=. python benchmarks/gpu.py{' --quick' if args.quick else ''}`\n\n{table}\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print("\n" + text)
    return 0 if all(r[3] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
