"""Does CMViM pretraining pay off? Label fraction x pretraining ablation, fine-tuned and linear-
probed, centralized and federated, beside the linear baseline. Writes docs/science.md and
docs/science_label_fraction.png.

    PYTHONPATH=. python benchmarks/ssl.py                        # the table in docs/science.md
    PYTHONPATH=. python benchmarks/ssl.py --quick --out /tmp/ssl # a few minutes: a smoke run

What it runs, all through the product's code (cmvim.site_task.SiteTask: the one training loop
the federated client and the baselines use; cmvim.linear for the probe and the baseline):

- a benchmark cohort built for it (default: 3 sites x 200 subjects, literature-size effects,
  a seed no other config uses, 40 % of each site's subjects in its test split), preprocessed
  with the run config's preprocessing;
- per seed and pretraining variant (fresh: none; mae: reconstruction only; +intra; +intra+inter;
  cmvim: + the report term), pretraining centralized (all sites' non-test subjects pooled) and
  federated (FedAvg over the sites' rounds in this process: each site trains from the global
  weights, the average is weighted by subjects, as Flower's FedAvg does; no Flower transport);
- per seed, the cohort split the seed's way (the test subjects differ between seeds);
- per label fraction (of each site's labelled train and validation subjects, stratified, drawn
  per seed; the others keep their scans for pretraining and lose their label), the run
  config's fine-tuning (LP-FT) in the same mode as the pretraining, the linear probe of the
  pretrained encoder, and the linear baseline, each scored on every site's test split.

Reported: mean per-site test AUC, mean +- sd over seeds; and for the claims, the paired
difference (pretrained minus fresh, same seed, same test subjects) with a bootstrap 95 % CI that
resamples each site's test subjects.
"""
from __future__ import annotations

import sys
sys.path[:] = [p for p in sys.path if not p.rstrip("/").endswith("benchmarks")]   # this file must not shadow the ssl module

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cmvim.config import load_yaml
from cmvim.data import SiteData, make_loader
from cmvim.run_config import CohortSpec, RunConfig, run_config
from cmvim.linear import collect, encoder_features, fit_logistic, positive_scores, regional_means
from cmvim.model import CMViMClassifier, LossConfig
from cmvim.site_task import SiteTask
from cmvim.weights import initial_state
from cmvim.tables import format_table
from cmvim.simulations.baselines import train_rounds
from cmvim.simulations.cohort import CohortConfig, cached_cohort

CONTRASTIVE = ("intra", "inter", "report")
PAPER = LossConfig()        # the paper's weights ("paper" below), whatever the run config's own are
VARIANTS = {                # contrastive weights (intra, inter, report) per pretraining variant
    "fresh": None,
    "mae": (0.0, 0.0, 0.0),
    "mae+intra": ("paper", 0.0, 0.0),
    "mae+intra+inter": ("paper", "paper", 0.0),
    "cmvim": ("paper", "paper", "paper"),
}


def say(text: str) -> None:
    print(text, flush=True)


# -- data ------------------------------------------------------------------------------------------

def load_sites(cfg: RunConfig, cohort: CohortConfig) -> dict[str, SiteData]:
    folders = CohortSpec(path=str(cached_cohort(cohort))).site_folders()
    return {n: SiteData.for_run(folder, cfg) for n, folder in folders.items()}


LABELLED_SPLITS = ("train", "val")      # where the label fraction applies: every label a model may use


def with_label_fraction(site: SiteData, fraction: float, seed: int) -> SiteData:
    """The site with only `fraction` of its labelled train and validation subjects keeping their
    label (stratified by split and label, drawn by seed); the others stay for pretraining,
    unlabelled. Fine-tuning (train to fit, validation to choose its round), the probe and the
    linear baseline (both fitted on train + validation) then spend the same labels."""
    rng = np.random.default_rng(seed)
    hidden = set()
    for split in LABELLED_SPLITS:
        for label in ("CN", "MCI", "AD"):
            subjects = sorted({r.entry.subject_id for r in site.records if r.split == split and r.entry.label == label})
            keep = max(1, int(round(fraction * len(subjects)))) if subjects else 0
            hidden |= set(rng.permutation(subjects)[keep:].tolist())
    records = [dataclasses.replace(r, entry=dataclasses.replace(r.entry, label=None))
               if r.entry.subject_id in hidden else r for r in site.records]
    return SiteData(site.site_dir, site.cfg, records, site.summary, site.cache)


# -- training --------------------------------------------------------------------------------------

def train_phase(cfg: RunConfig, tasks: list[SiteTask], phase: str, state: dict) -> dict:
    """The phase's rounds: one task (centralized) or FedAvg over one task per site (federated)."""
    return train_rounds(cfg, tasks, phase, state)[0]


def tasks_for(cfg: RunConfig, sites: dict[str, SiteData], mode: str) -> list[SiteTask]:
    if mode == "centralized":
        return [SiteTask(cfg, list(sites.values()), "pooled")]
    return [SiteTask(cfg, [site], name) for name, site in sites.items()]


def variant_config(cfg: RunConfig, variant: str) -> RunConfig:
    weights = VARIANTS[variant]
    if weights is None:
        return cfg
    loss = {n: (getattr(PAPER, n) if w == "paper" else w) for n, w in zip(CONTRASTIVE, weights)}
    data = json.loads(cfg.to_json())
    data["model"] = {**data["model"], "loss": {**data["model"].get("loss", {}), **loss}}
    data["use_reports"] = bool(weights[2])
    return run_config(data)


# -- scoring ---------------------------------------------------------------------------------------

def test_scores(cfg: RunConfig, sites: dict[str, SiteData], score_batch) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per site: (labels 0/1, scores) of its labelled test subjects."""
    num_classes = cfg.model.num_classes
    out = {}
    for name, site in sites.items():
        loader = make_loader(site.dataset("test", labeled=True, classes=cfg.model.classes), 16, False)
        s, y = collect(loader, score_batch)
        out[name] = ((y == num_classes - 1).astype(int), s.reshape(-1))
    return out


def mean_site_auc(scores: dict, resample: dict | None = None) -> float:
    from sklearn.metrics import roc_auc_score
    aucs = []
    for name, (y, s) in scores.items():
        idx = resample[name] if resample else slice(None)
        if len(set(y[idx])) == 2:
            aucs.append(roc_auc_score(y[idx], s[idx]))
    return float(np.mean(aucs)) if aucs else float("nan")


def paired_difference(a: dict, b: dict, resamples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean per-site AUC of a minus b on the same test subjects, with a bootstrap 95 % CI that
    resamples each site's subjects (the same draw for both)."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        draw = {n: rng.integers(0, len(y), len(y)) for n, (y, _) in a.items()}
        diffs.append(mean_site_auc(a, draw) - mean_site_auc(b, draw))
    diffs = np.array(diffs)[np.isfinite(diffs)]
    return mean_site_auc(a) - mean_site_auc(b), float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))


def classifier_scores(cfg: RunConfig, state: dict):
    model = CMViMClassifier(cfg.model)
    model.load_state_dict(state)
    model.eval()

    @torch.no_grad()
    def score(batch):
        return torch.softmax(model(batch), dim=-1)[:, -1].numpy()
    return score


def probe_scores(cfg: RunConfig, sites: dict[str, SiteData], pretrained: dict | None, seed: int) -> dict:
    """The linear probe: logistic regression on the frozen encoder's features (the classifier's
    readout) of the labelled train + val subjects, scored on each site's test split."""
    torch.manual_seed(cfg.seed)
    model = CMViMClassifier(cfg.model)
    if pretrained is not None:
        model.load_pretrained(pretrained)
    features = encoder_features(model)
    return linear_scores(cfg, sites, features, seed)


def linear_scores(cfg: RunConfig, sites: dict[str, SiteData], features, seed: int) -> dict:
    num_classes = cfg.model.num_classes
    batches = (b for site in sites.values() for split in ("train", "val")
               for b in make_loader(site.dataset(split, labeled=True, classes=cfg.model.classes), 16, False))
    x, y = collect(batches, features)
    model = fit_logistic(x, (y == num_classes - 1).astype(int), cfg.linear, seed=seed)
    return test_scores(cfg, sites, lambda batch: positive_scores(model, features(batch)))


# -- the benchmark ---------------------------------------------------------------------------------

# settings that change how a federated run's messages travel, not what this benchmark computes (it
# runs its rounds in process): left out of the recipe key, so adding one keeps the rows measured
NOT_RECIPE = {("evaluation", "carry_validation")}
# sections this benchmark never reads (the CNN baseline's schedule): left out too
NOT_READ = ("seed", "cnn3d")
# what a pretraining variant sets itself (variant_config: its contrastive weights and reports) and
# fine-tuning never reads, so the run config's own value does not change what a row measures;
# hashed at the paper's values
PER_VARIANT = {**{("model", "loss", n): getattr(PAPER, n) for n in CONTRASTIVE}, ("use_reports",): True}


# how rows are measured beyond the config (issue #32): each seed splits the cohort its own way (the
# rows before shared one test split across seeds), and the label fraction applies to train and
# validation alike (before, the probe and the baseline also fitted every validation label)
PROTOCOL = {"splits": "per seed", "label fraction": "train + val"}


def recipe_key(cfg: RunConfig, cohort: CohortConfig) -> str:
    """What a row was measured under: the run config (its seed aside: each row names its own; and the
    CNN baseline's schedule, never read here) and the benchmark cohort. Rows of another recipe are
    never mixed into a table or taken as done."""
    config = {k: v for k, v in json.loads(cfg.to_json()).items() if k not in NOT_READ}
    for section, key in NOT_RECIPE:
        config.get(section, {}).pop(key, None)
    for path, value in PER_VARIANT.items():
        *parents, key = path
        node = config
        for name in parents:
            node = node.setdefault(name, {})
        node[key] = value
    text = json.dumps({"config": config, "cohort": repr(cohort), "protocol": PROTOCOL}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def read_rows(out: Path, recipe: str) -> list[dict]:
    """The rows measured so far under `recipe` (one JSON object a line in <out>/benchmarks/ssl_rows.jsonl);
    rows of another recipe are left out, and counted."""
    path = out / "benchmarks" / "ssl_rows.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    other = [r for r in rows if r.get("recipe") != recipe]
    if other:
        say(f"{len(other)} row(s) in {path} were measured under another recipe (run config or cohort; "
            f"this one is {recipe}): left out")
    return [r for r in rows if r.get("recipe") == recipe]


def run(cfg: RunConfig, cohort: CohortConfig, seeds: list[int], fractions: list[float], variants: list[str],
        modes: list[str], out: Path) -> list[dict]:
    recipe = recipe_key(cfg, cohort)
    rows_path = out / "benchmarks" / "ssl_rows.jsonl"
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    done = {(row["seed"], row["variant"], row["mode"], row["fraction"]): row
            for row in read_rows(out, recipe)}     # resume: keep what an earlier run measured
    rows = list(done.values())
    for seed in seeds:
        base = run_config({**json.loads(cfg.to_json()), "seed": seed})
        sites = load_sites(base, cohort)          # the seed's own split (preprocessing comes from the cache)
        counts = {n: sum(len(s.subset(split, True)) for split in LABELLED_SPLITS) for n, s in sites.items()}
        tests = {n: len(s.subset("test", True)) for n, s in sites.items()}
        say(f"seed {seed}: benchmark cohort {cohort}; labelled train + val {counts}, test {tests}")
        for mode in modes:
            for variant in variants:
                if all((seed, variant, mode, f) in done for f in fractions):
                    continue
                vcfg = variant_config(base, variant)
                start = time.perf_counter()
                pretrained = None
                if VARIANTS[variant] is not None:
                    torch.manual_seed(seed)
                    pretrained = train_phase(vcfg, tasks_for(vcfg, sites, mode), "pretrain",
                                             initial_state(vcfg, "pretrain"))
                pre_s = time.perf_counter() - start
                for fraction in fractions:
                    if (seed, variant, mode, fraction) in done:
                        continue
                    start = time.perf_counter()
                    labelled = {n: with_label_fraction(s, fraction, seed) for n, s in sites.items()}
                    state = train_phase(base, tasks_for(base, labelled, mode), "finetune",
                                        initial_state(base, "finetune", pretrained))
                    tuned = test_scores(base, sites, classifier_scores(base, state))
                    probed = probe_scores(base, labelled, pretrained, seed)
                    row = {"seed": seed, "variant": variant, "mode": mode, "fraction": fraction, "recipe": recipe,
                           "finetuned": mean_site_auc(tuned), "probe": mean_site_auc(probed),
                           "scores": {"finetuned": _plain(tuned), "probe": _plain(probed)},
                           "labelled": sum(len(s.subset(split, True)) for s in labelled.values()
                                           for split in LABELLED_SPLITS),
                           "seconds": {"pretrain": round(pre_s, 1), "finetune": round(time.perf_counter() - start, 1)}}
                    if variant == variants[0] and mode == modes[0]:
                        grid = base.linear.grid
                        linear = linear_scores(base, labelled, lambda b: regional_means(b, grid), seed)
                        row["linear"] = mean_site_auc(linear)
                        row["scores"]["linear"] = _plain(linear)
                    rows.append(row)
                    with rows_path.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    say(f"seed {seed} {mode:11s} {variant:15s} labels {fraction:4.0%}: fine-tuned "
                        f"{row['finetuned']:.3f}, probe {row['probe']:.3f}"
                        + (f", linear {row['linear']:.3f}" if "linear" in row else "")
                        + f" [{row['seconds']['pretrain']:.0f}+{row['seconds']['finetune']:.0f}s]")
    return rows


def _plain(scores: dict) -> dict:
    """Per-subject scores as stored: full precision (rounding to 5 decimals made 33 of 240 stored
    AUCs disagree with the stored scores by up to 0.070: ties that the model did not make)."""
    return {n: [y.tolist(), [float(v) for v in s]] for n, (y, s) in scores.items()}


def _arrays(scores: dict) -> dict:
    return {n: (np.array(y), np.array(s)) for n, (y, s) in scores.items()}


# -- the report ------------------------------------------------------------------------------------

def tables(rows: list[dict], fractions: list[float], variants: list[str], modes: list[str]) -> list[str]:
    def cell(values):
        values = [v for v in values if v is not None and np.isfinite(v)]
        if not values:
            return "-"
        if len(values) == 1:
            return f"{values[0]:.3f}"                     # one seed: no spread to show
        return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"

    def pick(**match):
        return [r for r in rows if all(r[k] == v for k, v in match.items())]

    out = []
    for mode in modes:
        headers = ["pretraining"] + [f"{f:.0%} labels" for f in fractions]
        body = []
        for kind in ("finetuned", "probe"):
            for variant in variants:
                body.append([f"{variant} ({'fine-tuned' if kind == 'finetuned' else 'linear probe'})"]
                            + [cell([r[kind] for r in pick(mode=mode, variant=variant, fraction=f)])
                               for f in fractions])
        body.append(["linear baseline (regional means)"]
                    + [cell([r["linear"] for r in pick(mode=mode, fraction=f) if "linear" in r]) for f in fractions])
        seeds = sorted({r["seed"] for r in pick(mode=mode)})
        out.append(f"### {mode} (seeds {', '.join(map(str, seeds))}: mean ± sd over seeds)\n\n"
                   + format_table(headers, body))
    return out


def differences(rows: list[dict], fractions: list[float], variants: list[str], modes: list[str]) -> str:
    """Paired differences against fresh fine-tuning and against the linear baseline, pooled over
    seeds (the mean of the per-seed differences, the CI from bootstrapping each seed's test set)."""
    headers = ["mode", "comparison"] + [f"{f:.0%} labels" for f in fractions]
    body = []
    linear_rows = {(r["seed"], r["fraction"]): r for r in rows if "linear" in r}
    for mode in modes:
        for variant in variants:
            if variant == "fresh":
                continue
            line = [mode, f"{variant} - fresh (fine-tuned)"]
            for fraction in fractions:
                line.append(_pooled_diff(rows, mode, fraction, variant, "finetuned", "fresh", "finetuned"))
            body.append(line)
        best = [v for v in variants if v != "fresh"]
        for variant in best[-1:]:
            line = [mode, f"{variant} (fine-tuned) - linear baseline"]
            for fraction in fractions:
                pairs = []
                for r in rows:
                    if r["mode"] == mode and r["variant"] == variant and r["fraction"] == fraction:
                        lin = linear_rows.get((r["seed"], fraction))
                        if lin:
                            pairs.append((_arrays(r["scores"]["finetuned"]), _arrays(lin["scores"]["linear"])))
                line.append(_diff_cell(pairs))
            body.append(line)
    return format_table(headers, body)


def _pooled_diff(rows, mode, fraction, variant, kind, other, other_kind) -> str:
    pairs = []
    by_seed = {(r["seed"], r["variant"]): r for r in rows if r["mode"] == mode and r["fraction"] == fraction}
    for (seed, v), r in by_seed.items():
        if v == variant and (seed, other) in by_seed:
            pairs.append((_arrays(r["scores"][kind]), _arrays(by_seed[(seed, other)]["scores"][other_kind])))
    return _diff_cell(pairs)


def _diff_cell(pairs) -> str:
    if not pairs:
        return "-"
    results = [paired_difference(a, b, seed=i) for i, (a, b) in enumerate(pairs)]
    mean = np.mean([d for d, _, _ in results])
    lo = np.mean([lo for _, lo, _ in results])
    hi = np.mean([hi for _, _, hi in results])
    mark = "" if lo <= 0 <= hi else " *"
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]{mark}"


def plot(rows: list[dict], fractions: list[float], variants: list[str], modes: list[str], path: Path) -> None:
    """Test AUC against label fraction: a panel per mode, fine-tuned (top) and linear probe
    (bottom), the linear baseline dashed; error bars are the sd over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = [("finetuned", "fine-tuned"), ("probe", "linear probe of the frozen encoder")]
    fig, axes = plt.subplots(len(kinds), len(modes), figsize=(5.2 * len(modes), 4.0 * len(kinds)), sharey=True,
                             squeeze=False)
    colours = dict(zip(VARIANTS, ["#7f8c8d", "#2980b9", "#27ae60", "#8e44ad", "#c0392b"]))
    xs = [100 * f for f in fractions]
    for row, (kind, title) in enumerate(kinds):
        for ax, mode in zip(axes[row], modes):
            for variant in variants:
                means, sds = [], []
                for f in fractions:
                    values = [r[kind] for r in rows if r["mode"] == mode and r["variant"] == variant
                              and r["fraction"] == f]
                    means.append(np.mean(values) if values else np.nan)
                    sds.append(np.std(values) if values else np.nan)
                ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, label=variant, color=colours.get(variant))
            lin = [np.mean([r["linear"] for r in rows if "linear" in r and r["mode"] == mode and r["fraction"] == f]
                           or [np.nan]) for f in fractions]
            ax.plot(xs, lin, ls="--", color="k", label="linear baseline")
            ax.set(title=f"{mode}: {title}", xlabel="labelled training subjects (%)", xscale="log",
                   xticks=xs, xticklabels=[f"{f:.0%}" for f in fractions])
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel("mean per-site test AUC (AD vs CN)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


BEGIN, END = "<!-- benchmarks/ssl.py: begin -->", "<!-- benchmarks/ssl.py: end -->"


def write_report(path: Path, tables_text: str, command: str, cohort: CohortConfig, cfg: RunConfig) -> None:
    """The generated block of docs/science.md (between its markers); the prose around it stays."""
    block = "\n".join([
        BEGIN, "",
        f"`{command}`", "",
        f"Benchmark cohort: {cohort.sites} sites x {cohort.subjects} subjects, effect_scale {cohort.effect_scale}, "
        f"cohort seed {cohort.seed}; splits {list(cfg.split_fractions)} (train / val / test); input "
        f"{cfg.preprocess.shape}³ at {cfg.preprocess.voxel_size:g} mm; model "
        f"{cfg.model.summary()}; pretraining {cfg.pretrain.rounds} rounds x "
        f"{cfg.pretrain.local_epochs} epochs; fine-tuning {cfg.finetune.rounds} rounds ({cfg.finetune.probe_rounds} "
        f"probe). Mean per-site test AUC, mean ± sd over seeds.", "",
        "![test AUC against label fraction](science_label_fraction.png)", "",
        tables_text, "", END])
    text = path.read_text() if path.exists() else "# Does pretraining pay off?\n\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "benchmarks" / "configs" / "ssl_recipe.yaml"),
                        help="the run config whose preprocessing, model and schedule every row uses (default: the "
                             "recipe the tables in docs/science.md were measured under; quick.yaml for today's)")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--subjects", type=int, default=200, help="per site")
    parser.add_argument("--cohort-seed", type=int, default=11)
    parser.add_argument("--effect-scale", type=float, default=1.0)
    parser.add_argument("--test-fraction", type=float, default=0.4)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.1, 0.25, 0.5, 1.0])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--modes", nargs="*", default=["centralized", "federated"])
    parser.add_argument("--shape", type=int, default=32,
                        help="input size S: S^3 voxels over the run config's field of view, 4^3 tokens per "
                             "modality as in the default (32: half the default's compute)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 2 fractions, tiny schedule")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--report-only", action="store_true",
                        help="write the tables and the plot from the rows already measured (a run in parts)")
    parser.add_argument("--recipe", action="store_true",
                        help="print the recipe key rows are measured under (run config + cohort) and stop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_yaml(args.config)
    data.pop("cohort", None)
    data.pop("baselines", None)
    val = data.get("split_fractions", [0.6, 0.1, 0.3])[1]
    data["split_fractions"] = [round(1 - args.test_fraction - val, 6), val, args.test_fraction]
    preprocess = data.setdefault("preprocess", {})
    field_of_view = preprocess.get("shape", 48) * preprocess.get("voxel_size", 4.0)
    preprocess.update(shape=args.shape, voxel_size=field_of_view / args.shape)
    data["model"] = {**data.get("model", {}), "img_size": args.shape, "patch_size": args.shape // 4}
    if args.quick:
        args.seeds, args.fractions = args.seeds[:1], [0.25, 1.0]
        data["pretrain"] = {**data.get("pretrain", {}), "rounds": 2}
        data["finetune"] = {**data.get("finetune", {}), "rounds": 2, "probe_rounds": 1}
        args.subjects = min(args.subjects, 60)
    cfg = run_config(data)
    cohort = CohortConfig(sites=args.sites, subjects=args.subjects, shape=64, seed=args.cohort_seed,
                          effect_scale=args.effect_scale)
    if args.recipe:
        print(recipe_key(cfg, cohort))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.report_only:                   # the tables from the rows measured so far; nothing is trained
        rows = read_rows(args.out, recipe_key(cfg, cohort))
    else:
        rows = run(cfg, cohort, args.seeds, args.fractions, args.variants, args.modes, args.out)
    rows = [r for r in rows if r["seed"] in args.seeds and r["fraction"] in args.fractions
            and r["variant"] in args.variants and r["mode"] in args.modes]
    plot(rows, args.fractions, args.variants, args.modes, args.out / "science_label_fraction.png")
    report = tables(rows, args.fractions, args.variants, args.modes)
    diff = differences(rows, args.fractions, args.variants, args.modes)
    text = "\n\n".join(report + ["### paired differences (mean per-site test AUC; * = 95 % CI excludes 0)\n\n" + diff])
    command = "PYTHONPATH=. python benchmarks/ssl.py " + " ".join(a for a in sys.argv[1:] if a != "--report-only")
    write_report(args.out / "science.md", text, command, cohort, cfg)
    say("\n" + text)
    say(f"\nbenchmark finished in {(time.perf_counter() - start) / 60:.1f} min; rows in {args.out / 'benchmarks' / 'ssl_rows.jsonl'}")


if __name__ == "__main__":
    main()
