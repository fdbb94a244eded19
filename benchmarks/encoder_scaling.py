"""Vim encoder vs a ViT encoder of the same width and depth as the token count grows.

The point of Vim for 3D: its cost is linear in tokens, attention's is quadratic.
Prints a markdown table: fwd+bwd seconds and peak memory of both, and the ratios.
Each (model, tokens) point runs in a fresh subprocess so peak memory is its own.

    python benchmarks/encoder_scaling.py [--tokens 64 256 1024 4096 8192] [--width 192] [--depth 4]
"""
from __future__ import annotations

import sys
sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("benchmarks")]   # benchmarks/ssl.py must not shadow the ssl module
import argparse
import importlib.util
import json
import os
import subprocess
import time
from pathlib import Path

# benchmarks/scan.py's measuring helpers, loaded by path (opacus installs a package named
# "benchmarks", so the folder cannot be imported by that name)
_spec = importlib.util.spec_from_file_location("cmvim_benchmark_scan", Path(__file__).with_name("scan.py"))
_scan = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_scan)
_cpu_model, _reset_peak, _status_kib = _scan._cpu_model, _scan._reset_peak, _scan._status_kib


def measure(kind: str, tokens: int, width: int, depth: int, repeats: int, threads: int, backend: str | None) -> dict:
    """Runs inside the child process."""
    import torch
    from torch import nn
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)

    class ViTBlock(nn.Module):
        def __init__(self, dim, heads):
            super().__init__()
            self.heads = heads
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

        def forward(self, x):
            b, n, d = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
            return x + self.mlp(self.norm2(x))

    if kind == "vim":
        from cmvim.model import VimEncoder
        model = VimEncoder(width, depth, scan_backend=backend)
    else:
        model = nn.Sequential(*[ViTBlock(width, max(1, width // 64)) for _ in range(depth)], nn.LayerNorm(width))
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, tokens, width)

    def step():
        model.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()

    step()                                  # warm-up (JIT, allocator)
    baseline = _status_kib("VmRSS")
    _reset_peak()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "peak_mb": max(0.0, (_status_kib("VmHWM") - baseline) / 1024), "params": params}


def run_point(kind, tokens, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(tokens), "--width", str(args.width), "--depth",
           str(args.depth), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    if args.backend:
        cmd += ["--backend", args.backend]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), NUMBA_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} at {tokens} tokens failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024, 2048, 4096, 8192])
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default=None, help="scan backend for Vim (default: automatic)")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, tokens = args.child
        print(json.dumps(measure(kind, int(tokens), args.width, args.depth, args.repeats, args.threads,
                                 args.backend)))
        return

    import torch
    from cmvim.ssm import resolve_backend
    backend = args.backend or resolve_backend(torch.device("cpu"))
    print(f"machine: {_cpu_model()}, {args.threads} threads; torch {torch.__version__}; "
          f"Vim scan backend: {backend}")
    print(f"encoders: width {args.width}, depth {args.depth}, batch 1, fwd+bwd, best of {args.repeats}\n")
    rows = []
    for tokens in args.tokens:
        vim, vit = run_point("vim", tokens, args), run_point("vit", tokens, args)
        rows.append((tokens, vim, vit))
        if len(rows) == 1:
            print(f"parameters: Vim {vim['params'] / 1e6:.2f}M, ViT {vit['params'] / 1e6:.2f}M\n")
            print("| tokens | Vim s | ViT s | ViT/Vim time | Vim peak MB | ViT peak MB | ViT/Vim memory |")
            print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        print(f"| {tokens} | {vim['seconds']:.4f} | {vit['seconds']:.4f} | {vit['seconds'] / vim['seconds']:.2f}x "
              f"| {vim['peak_mb']:.0f} | {vit['peak_mb']:.0f} | "
              f"{vit['peak_mb'] / max(vim['peak_mb'], 1):.2f}x |", flush=True)


if __name__ == "__main__":
    main()
