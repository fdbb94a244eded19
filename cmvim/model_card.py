"""`model/README.md`: the model card a run writes beside its exported model (cmvim.portable), from
what config.json records: intended use, how and on what it was trained, what it scored (with
CIs), its decision rule, its inputs, how to check and load the files, and its known limits.
Aggregates only: no subject ids, nothing a site did not already send."""
from __future__ import annotations

import math

from .run_config import RunConfig
from .tables import format_table


def _number(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _ci(entry: dict) -> str:
    low, high = (entry.get("auc_ci") or [None, None])[:2]
    return f"{_number(low)}-{_number(high)}" if low is not None and high is not None else "-"


def _metrics_table(evaluation: dict) -> str:
    rows = []
    for name, entry in sorted((evaluation.get("sites") or {}).items()):
        if entry.get("suppressed"):
            rows.append([name, entry.get("n_test", 0), "suppressed by the site's min_cell_count", "", "", "", ""])
            continue
        rows.append([name, entry.get("n_test", 0), _number(entry.get("auc")), _ci(entry), _number(entry.get("acc")),
                     _number(entry.get("sensitivity")), _number(entry.get("specificity"))])
    pooled = evaluation.get("pooled") or {}
    if pooled.get("n_test"):
        rows.append(["pooled", pooled["n_test"], _number(pooled.get("auc")), _ci(pooled), "", "", ""])
    if not rows:
        return "No site released test metrics.\n"
    return format_table(["site", "n test", "AUC", "95% CI", "acc", "sens", "spec"], rows, markdown=True) + "\n"


def model_card(config: dict, cfg: RunConfig) -> str:
    training, evaluation = config.get("training") or {}, config.get("evaluation") or {}
    decision, inputs, program = config["decision"], config["inputs"], config.get("program") or {}
    sites = training.get("finetune_sites") or []
    examples = training.get("finetune_examples") or {}
    trained_on = ", ".join(f"{s} ({examples[s]} visits)" if s in examples else s for s in sites) or "-"
    simulated = (f"a simulation on the cohort folder `{cfg.cohort.path.rstrip('/').rsplit('/', 1)[-1]}` (the run's "
                 f"config.yaml `cohort` section describes it; the built-in cohort is synthetic, made by "
                 f"cmvim.simulations)" if cfg.cohort.path else "the sites' own data, which never left them")
    lines = [
        f"# Model card: cmvim {config['task']} classifier",
        "",
        f"**Intended use:** {config['intended_use']}.",
        "",
        "**Not for clinical diagnosis.** Its scores have not been validated prospectively or on any population but "
        "the sites' test splits below.",
        "",
        "## Model",
        "",
        f"- CMViM classifier (a bidirectional Vision-Mamba encoder, self-supervised pretraining then fine-tuning): "
        f"{cfg.model.summary()}; modalities {', '.join(cfg.model.modalities)}",
        f"- cmvim {config['cmvim_version']}; labels {config['labels']} (the score is P({config['positive_label']}))",
        "",
        "## Training",
        "",
        f"- federated: pretraining {training.get('pretrain_rounds_aggregated', '?')} of "
        f"{training.get('pretrain_rounds', '?')} rounds aggregated site updates; fine-tuning "
        f"{training.get('finetune_rounds_aggregated', '?')} of {training.get('finetune_rounds', '?')}",
        f"- fine-tuned on the updates of: {trained_on}",
        f"- data: {simulated}",
        "",
        "## Evaluation (each site's held-out test split)",
        "",
        _metrics_table(evaluation),
        "AUC CIs: 95% bootstrap at each site; pooled: the sites' summed score histograms, each class redrawn from "
        "its histogram. Accuracy, sensitivity and specificity are at the decision threshold below.",
    ]
    baselines = evaluation.get("baselines") or {}
    if baselines:
        lines += ["", "Baselines on the same data and splits (mean per-site AUC): "
                  + ", ".join(f"{name} {_number(b.get('mean_auc'))}" for name, b in baselines.items())]
    lines += [
        "",
        "## Decision",
        "",
        f"- threshold {_number(decision.get('threshold'))} on the "
        f"{'Platt-calibrated' if decision.get('calibrated') else 'uncalibrated'} P({config.get('positive_label', 'AD')}) "
        + (f"(rule `{decision.get('rule')}`, fitted on {decision['n_val']} validation subjects)" if decision.get("n_val")
           else f"(rule `{decision.get('rule')}`; no validation fit)"),
        f"- {decision.get('note', '')}",
        "",
        "## Inputs",
        "",
        format_table(["key", "what"], [[k, v] for k, v in inputs["batch"].items()], markdown=True),
        "",
        f"- output: {inputs['output']}",
        f"- score: {inputs['score']}",
        f"- preprocessing: {inputs['preprocessing']}",
        "",
        "## Files",
        "",
        "- `model.safetensors`: the weights (tensors only; `cmvim.portable.load_model` or "
        "`cmvim-client predict --model DIR`)",
    ]
    if program.get("file"):
        lines += [f"- `{program['file']}`: the same classifier as a {program['format']} program, any batch size, "
                  f"logits within {program['max_abs_logit_difference']:.1e} of cmvim's. Without cmvim:",
                  "", "```python", "import torch",
                  f"model = torch.export.load('{program['file']}').module()",
                  "p_ad = torch.softmax(model(batch), dim=-1)[:, -1]   # batch: the Inputs above", "```", ""]
    else:
        lines.append(f"- no plain-PyTorch program: {program.get('error', 'not exported')}")
    lines += [
        "- `config.json`: everything above, machine-readable",
        "- check a copy: `sha256sum -c SHA256SUMS`",
        "",
        "## Known limits",
        "",
        "- The validation splits that set the threshold and calibration are small; the operating point carries "
        "their noise. A site can re-threshold `predict`'s scores on its own validation subjects.",
        "- Trained on the sites above only: scanners, protocols and populations unlike theirs are untested.",
        "- FDG PET only; other tracers are refused when data is read. MCI subjects get one of the two labels.",
        f"- Preprocessing must be cmvim's (`{cfg.preprocess.spatial}`): scores on volumes prepared any other way are "
        "not the model's.",
        "- A synthetic cohort (cmvim's generator) can flatter a model; judge it on real, unseen sites.",
        "",
    ]
    return "\n".join(lines)
