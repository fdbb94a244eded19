"""Where the default run's fine-tuning stands against the linear baseline: every fine-tuning
round's global model scored on each site's validation and test split, over seeds, and what each
way of choosing the final round would have given.

    PYTHONPATH=. python benchmarks/finetune_rounds.py [--seeds 0 1 2 3 4 5] [--set KEY=VALUE ...]
        [--init pretrained|fresh] [--readout encoder|embedding] [--cache runs/finetune-rounds] [--report-only]

The rounds are the default run's (quick.yaml, or --config), in process (FedAvg of the sites'
SiteTask rounds weighted by subjects: simulations.baselines.train_rounds, as
`benchmarks/default_run.py --inprocess`), so with no --set its best-validation row is that
benchmark's number. Each seed's pretrained encoder and linear baseline are cached under --cache
(keyed by everything in the config that shapes them), so fine-tuning variants of the same seeds
cost ~1 min a seed instead of ~4; two processes with different --seeds share the cache, and
--report-only prints the table from it.

`--readout embedding` is a diagnostic, not a product option: the head reads the patch
embeddings (each token RMS-normalised, as the encoder's output is), the Vim blocks skipped; with
`--init pretrained` the embeddings are the pretrained ones. It asks what the encoder's blocks add
on top of the tokenizer that pretraining trained.

The rules compared (all but the last could run at the server, from what sites report):
  mean per-site val AUC   the default run's rule (finetune.select: best_val), the latest of equals
  pooled val AUC          the AUC of all sites' validation subjects together (the server has their
                          score histograms; computed here from the scores), the latest of equals
  pooled val log-loss     the lowest cross-entropy over all validation subjects
  last round / last probe round
  best probe round by val AUC    the default rule, among the probe rounds alone (what the run
                          would give had it stopped after probing)
  oracle                  the round with the best test AUC: not a rule, the ceiling of selection;
                          among the probe rounds alone: the best probing could have done
"""
from __future__ import annotations

import sys
sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("benchmarks")]   # benchmarks/ssl.py must not shadow the ssl module
import argparse
import contextlib
import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cmvim.config import load_yaml
from cmvim.metrics import auc_or_nan
from cmvim.run_config import overridden
from cmvim.tables import format_table
from cmvim.simulations.assembly import config_path

FINETUNE_ONLY = ("finetune", "finetune_init", "baselines", "modality_dropout")   # what pretraining never reads
WINDOW = 6              # the rounds over which the round-to-round change is read (the default's fine-tuning rounds)
RULES = ("mean per-site val AUC (default)", "pooled val AUC", "pooled val log-loss", "last round",
         "last probe round", "best probe round by val AUC", "oracle (best test round)",
         "oracle among probe rounds (best test)")


def key(data: dict, *drop: str) -> str:
    kept = {k: v for k, v in data.items() if k not in drop}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def seed_data(data: dict, seed: int) -> dict:
    return {**data, "seed": seed, "baselines": []}


def rounds_path(cache: Path, data: dict, seed: int, readout: str) -> Path:
    """Where one seed's scored rounds of this config and readout are cached."""
    return cache / f"rounds-{key({**seed_data(data, seed), 'readout': readout})}-seed{seed}.json"


def site_mean_auc(split: dict) -> float:
    """Mean over sites of the per-site AUC; `split`: {site: [labels, scores]}."""
    aucs = [auc_or_nan(*v) for v in split.values()]
    aucs = [a for a in aucs if np.isfinite(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def _pooled(split: dict) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([np.asarray(v[0], dtype=float) for v in split.values()]),
            np.concatenate([np.asarray(v[1], dtype=float) for v in split.values()]))


def pooled_auc(split: dict) -> float:
    return auc_or_nan(*_pooled(split))


def pooled_log_loss(split: dict) -> float:
    labels, scores = _pooled(split)
    scores = np.clip(scores, 1e-6, 1 - 1e-6)
    return float(-np.mean(labels * np.log(scores) + (1 - labels) * np.log(1 - scores)))


def _latest_best(scores: list[float]) -> int:
    """Index of the highest score, the latest of equals (as server.checkpoints.BestModel keeps it); NaN never wins."""
    best = None
    for i, score in enumerate(scores):
        if np.isfinite(score) and (best is None or score >= scores[best]):
            best = i
    return best if best is not None else len(scores) - 1


def selections(rounds: list[dict], probe_rounds: int) -> dict[str, int]:
    """{rule: index of the round it makes final}; `rounds`: [{"val": split, "test": split}, ...]."""
    losses = [pooled_log_loss(r["val"]) for r in rounds]
    probed = rounds[:probe_rounds] or rounds
    return {
        RULES[0]: _latest_best([site_mean_auc(r["val"]) for r in rounds]),
        RULES[1]: _latest_best([pooled_auc(r["val"]) for r in rounds]),
        RULES[2]: int(np.argmin(losses)),
        RULES[3]: len(rounds) - 1,
        RULES[4]: min(probe_rounds, len(rounds)) - 1 if probe_rounds else len(rounds) - 1,
        RULES[5]: _latest_best([site_mean_auc(r["val"]) for r in probed]),
        RULES[6]: _latest_best([site_mean_auc(r["test"]) for r in rounds]),
        RULES[7]: _latest_best([site_mean_auc(r["test"]) for r in probed]),
    }


@contextlib.contextmanager
def embedding_readout():
    """The classifier's head reads the RMS-normalised patch embeddings; the Vim blocks are skipped."""
    import torch
    from torch import nn

    from cmvim.model import cmvim as model_module
    cls = model_module.CMViMClassifier
    saved = cls.__init__, cls.features

    def __init__(self, cfg, scan_backend=None):
        saved[0](self, cfg, scan_backend)
        if cfg.readout == "mean":
            raise ValueError("--readout embedding needs a per-token readout (model.readout: tokens or factorized)")
        self.embedding_norm = nn.RMSNorm(cfg.embed_dim, eps=1e-5, elementwise_affine=False)

    def features(self, batch):
        tokens = torch.cat([self.image.tokens(batch, m) for m in self.cfg.modalities], dim=1)
        return self.embedding_norm(tokens).flatten(1)

    cls.__init__, cls.features = __init__, features
    try:
        yield
    finally:
        cls.__init__, cls.features = saved


def run_seed(data: dict, seed: int, readout: str, cache: Path) -> dict:
    """Every fine-tuning round's val/test scores for one seed (cached), with the linear baseline."""
    import torch

    from cmvim.run_config import run_config
    from cmvim.site_task import SiteTask
    from cmvim.weights import initial_state
    from cmvim.simulations.baselines import run_baselines, train_rounds
    from cmvim.simulations.assembly import prepare_sites
    from cmvim.simulations.cohort import prepare_cohort

    torch.set_num_threads(1)
    out_path = rounds_path(cache, data, seed, readout)
    data = seed_data(data, seed)
    pretrain_key = key(data, *FINETUNE_ONLY)
    if out_path.exists():
        return json.loads(out_path.read_text())
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):            # the cohort's and the sites' load lines
        cfg = prepare_cohort(run_config(data))
        sites = prepare_sites(cfg)
    tasks = [SiteTask(cfg, [site], name) for name, site in sites.items()]
    linear_path = cache / f"linear-{pretrain_key}-seed{seed}.json"
    if not linear_path.exists():
        linear_path.write_text(json.dumps(run_baselines(cfg, sites, ["linear"], say=lambda *_: None)["linear"]["mean_auc"]))
    pretrained = None
    if cfg.finetune_init != "fresh":
        encoder_path = cache / f"pretrained-{pretrain_key}-seed{seed}.pt"
        if encoder_path.exists():
            pretrained = torch.load(encoder_path, weights_only=True)
        else:
            pretrained, _ = train_rounds(cfg, tasks, "pretrain", initial_state(cfg, "pretrain"))
            torch.save(pretrained, encoder_path)
        print(f"  seed {seed}: pretrained encoder ready [{(time.perf_counter() - start) / 60:.1f} min]", flush=True)
    rounds: list[dict] = []

    def score(round_: int, shared: dict, local: dict) -> None:
        rounds.append({split: {t.name: [v.tolist() for v in t.predict(shared, local[t.name], split)] for t in tasks}
                       for split in ("val", "test")})

    cfg.finetune.select = "last"            # every round is scored here; the rules choose afterwards
    with embedding_readout() if readout == "embedding" else contextlib.nullcontext():
        train_rounds(cfg, tasks, "finetune", initial_state(cfg, "finetune", pretrained), after_round=score)
    result = {"seed": seed, "linear": json.loads(linear_path.read_text()), "probe_rounds": cfg.finetune.probe_rounds,
              "rounds": rounds, "minutes": round((time.perf_counter() - start) / 60, 2)}
    out_path.write_text(json.dumps(result))
    return result


def report(results: list[dict]) -> str:
    tests = [[site_mean_auc(x["test"]) for x in r["rounds"]] for r in results]
    chosen = [selections(r["rounds"], r["probe_rounds"]) for r in results]
    lines = [f"seed {r['seed']} (linear {r['linear']:.3f}) test AUC by round: " + " ".join(f"{t:.3f}" for t in test)
             for r, test in zip(results, tests)]
    steps = np.concatenate([np.abs(np.diff(test[-(WINDOW + 1):])) for test in tests])
    if len(steps):
        lines.append(f"test AUC from one round to the next over the last {WINDOW} rounds: mean change {steps.mean():.3f}, "
                     f"largest {steps.max():.3f}")
    rows = []
    for rule in RULES:
        picked = [c[rule] for c in chosen]
        aucs = np.array([test[i] for test, i in zip(tests, picked)])
        gaps = aucs - np.array([r["linear"] for r in results])
        sd = gaps.std(ddof=1) if len(gaps) > 1 else 0.0
        rows.append([rule, f"{aucs.mean():.3f}", f"{gaps.mean():+.3f} ± {sd:.3f}", int((gaps >= -0.03).sum()),
                     " ".join(f"{a:.3f}" for a in aucs), " ".join(str(i + 1) for i in picked)])
    headers = ["final round chosen by", "mean test AUC", "minus linear (mean ± sd)", "seeds within 0.03",
               "per seed", "round chosen"]
    return "\n".join(lines) + "\n\n" + format_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="quick.yaml")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting over the config's, as cmvim-sim --set (repeatable)")
    parser.add_argument("--init", choices=["pretrained", "fresh"], default="pretrained")
    parser.add_argument("--readout", choices=["encoder", "embedding"], default="encoder")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "finetune-rounds")
    parser.add_argument("--report-only", action="store_true", help="print the table from the seeds already cached")
    args = parser.parse_args()
    data = {**overridden(load_yaml(config_path(args.config)), args.set), "finetune_init": args.init}
    results = []
    for seed in args.seeds:
        if args.report_only:
            path = rounds_path(args.cache, data, seed, args.readout)
            if path.exists():
                results.append(json.loads(path.read_text()))
            continue
        results.append(run_seed(data, seed, args.readout, args.cache))
        print(f"seed {seed}: {len(results[-1]['rounds'])} rounds scored [{results[-1]['minutes']} min]", flush=True)
    if not results:
        sys.exit(f"no cached seeds under {args.cache} for this config")
    settings = " ".join(args.set) or "none"
    print(f"\nconfig {args.config}, --set {settings}, init {args.init}, readout {args.readout}; "
          f"seeds {' '.join(str(r['seed']) for r in results)}\n")
    print(report(results))


if __name__ == "__main__":
    main()
