"""`cmvim-sim`: the whole federated run on one machine.

Until the federated runner lands (issue #5), this runs what exists honestly:
a short LOCAL CMViM pretraining on synthetic tensors (no Flower, no sites),
showing progress and the loss terms falling.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from cmvim.engine import make_optimizer, pretrain_losses, pretrain_step
from cmvim.model import CMViM, model_config
from cmvim.ssm import resolve_backend

from .toy import synthetic_batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cmvim-sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="model config: a preset name (tiny/small/base) or a YAML file")
    parser.add_argument("--out", type=Path, default=Path("runs/sim"), help="results folder")
    parser.add_argument("--resume", type=Path, help="not available yet: resuming arrives with the federated run")
    parser.add_argument("--steps", type=int, default=60, help="local pretraining steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.resume:
        parser.error("--resume needs the federated runner, which is not there yet (issue #5)")

    print("cmvim-sim: the federated simulation is not built yet (issue #5).\n"
          "Running a short LOCAL CMViM pretraining on synthetic tensors instead.", flush=True)
    torch.manual_seed(args.seed)
    cfg = model_config(args.config or "tiny")
    model = CMViM(cfg)
    batches = [synthetic_batch(cfg, args.batch_size, seed=args.seed * 1000 + i, pet_missing=0.1) for i in range(4)]
    held_out = [synthetic_batch(cfg, args.batch_size, seed=args.seed * 1000 + 999, pet_missing=0.1)]
    optimizer = make_optimizer(model, lr=1e-3)
    backend = resolve_backend(torch.device("cpu"))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model {cfg.img_size}^3, patch {cfg.patch_size}, width {cfg.embed_dim}, depth {cfg.depth}, "
          f"{params / 1e6:.2f}M trainable parameters; scan backend: {backend}", flush=True)

    before = pretrain_losses(model, held_out)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        terms = pretrain_step(model, batches[step % len(batches)], optimizer)
        if step % 10 == 0 or step == args.steps:
            elapsed = time.perf_counter() - start
            eta = elapsed / step * (args.steps - step)
            print(f"step {step:4d}/{args.steps}  loss {terms['loss']:.4f}  "
                  f"recon_mri {terms['recon_mri']:.4f}  recon_pet {terms['recon_pet']:.4f}  "
                  f"elapsed {elapsed:5.1f}s  ETA {eta:5.1f}s", flush=True)
    after = pretrain_losses(model, held_out)

    print("\nheld-out synthetic batch, fixed maskings:")
    print(f"{'term':<10} {'before':>9} {'after':>9}")
    for key in before:
        print(f"{key:<10} {before[key]:9.4f} {after[key]:9.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"kind": "local-pretraining-on-synthetic-tensors", "steps": args.steps,
               "losses_before": before, "losses_after": after, "scan_backend": backend}
    (args.out / "pretrain_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {args.out / 'pretrain_summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
