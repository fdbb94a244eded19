"""Classification metrics: per-site AUC with bootstrap CI, accuracy, sensitivity, specificity,
and a pooled AUC computed from per-site score histograms (no subject-level predictions leave a site).

AUCs and ROC curves come from scikit-learn; the pooled AUC is scikit-learn's AUC of the
histogram bins weighted by their counts.
"""
from __future__ import annotations

import math

import numpy as np

# scikit-learn is imported where an AUC is computed: a training message never loads it


def roc_auc_score(*args, **kwargs) -> float:
    from sklearn.metrics import roc_auc_score as auc
    return auc(*args, **kwargs)


def roc_curve(*args, **kwargs):
    from sklearn.metrics import roc_curve as curve
    return curve(*args, **kwargs)


def auc_or_nan(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """ROC AUC of 0/1 labels; NaN where it is undefined (one class only)."""
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores, sample_weight=weights))


def binary_metrics(labels, scores, threshold: float = 0.5, bootstrap: int = 1000, seed: int = 0) -> dict:
    """labels 0/1, scores = P(positive). NaN where undefined (e.g. a test split with one class)."""
    labels = np.asarray(labels, dtype=int)
    scores = np.asarray(scores, dtype=float)
    predicted = scores >= threshold
    positives, negatives = labels == 1, labels == 0
    out = {
        "n": int(len(labels)), "n_pos": int(positives.sum()), "n_neg": int(negatives.sum()),
        "auc": auc_or_nan(labels, scores),
        "acc": float((predicted == positives).mean()) if len(labels) else float("nan"),
        "sensitivity": float(predicted[positives].mean()) if positives.any() else float("nan"),
        "specificity": float((~predicted[negatives]).mean()) if negatives.any() else float("nan"),
    }
    out["auc_ci"] = bootstrap_auc_ci(labels, scores, bootstrap, seed) if not math.isnan(out["auc"]) else [
        float("nan"), float("nan")]
    return out


def bootstrap_auc_ci(labels: np.ndarray, scores: np.ndarray, resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> list[float]:
    """Percentile bootstrap CI of the AUC, resampling subjects; resamples with one class are redrawn."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    aucs = []
    attempts = 0
    while len(aucs) < resamples and attempts < resamples * 10:
        attempts += 1
        idx = rng.integers(0, n, n)
        if labels[idx].min() == labels[idx].max():
            continue
        aucs.append(roc_auc_score(labels[idx], scores[idx]))
    if not aucs:
        return [float("nan"), float("nan")]
    alpha = (1 - level) / 2
    return [float(np.quantile(aucs, alpha)), float(np.quantile(aucs, 1 - alpha))]


def _stratified_ci(labels: np.ndarray, scores: tuple, resamples: int, seed: int, level: float,
                   auc_of) -> list[float]:
    """The stratified bootstrap both CI functions share: positives and negatives redrawn apart
    (`resamples` times, from `seed`), `auc_of(score index, positives, negatives)` the AUC of one
    score array on one redraw; the interval of AUC(scores[0]), or of the paired difference."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if len(pos) == 0 or len(neg) == 0 or len(scores) not in (1, 2):
        return [float("nan"), float("nan")]
    values = np.empty(resamples)
    for r in range(resamples):
        p, q = rng.choice(pos, len(pos)), rng.choice(neg, len(neg))
        aucs = [auc_of(i, p, q) for i in range(len(scores))]
        values[r] = aucs[0] - aucs[1] if len(aucs) == 2 else aucs[0]
    alpha = (1 - level) / 2
    return [float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))]


def stratified_auc_ci(labels: np.ndarray, *scores: np.ndarray, resamples: int = 2000, seed: int = 0,
                      level: float = 0.95) -> list[float]:
    """CI of AUC(scores[0]) or, given two score arrays, of AUC(scores[0]) - AUC(scores[1]) over the
    same redrawn subjects (paired); positives and negatives redrawn apart, so every redraw keeps
    the class sizes (small test splits never lose a class).

    Each redraw's AUC is the Mann-Whitney count over its (positive, negative) pairs, ties half,
    read from the subjects' pairwise comparison table built once: what roc_auc_score computes,
    without its per-call cost (the same redraws as `stratified_auc_ci_reference`, which calls it;
    tests/test_predict.py holds them equal)."""
    wins = []
    for s in scores:
        s = np.asarray(s, dtype=float)
        wins.append((s[:, None] > s[None, :]) + 0.5 * (s[:, None] == s[None, :]))   # [i, j]: i ranks above j
    return _stratified_ci(labels, scores, resamples, seed, level, lambda i, p, q: wins[i][np.ix_(p, q)].mean())


def stratified_auc_ci_reference(labels: np.ndarray, *scores: np.ndarray, resamples: int = 2000, seed: int = 0,
                                level: float = 0.95) -> list[float]:
    """stratified_auc_ci as first written, scikit-learn's roc_auc_score on every redraw (the same
    redraws): the reference the fast path is held to."""
    labels = np.asarray(labels)

    def auc_of(i, p, q):
        idx = np.r_[p, q]
        return roc_auc_score(labels[idx], np.asarray(scores[i])[idx])
    return _stratified_ci(labels, scores, resamples, seed, level, auc_of)


def score_histograms(labels, scores, bins: int = 50) -> tuple[list[int], list[int]]:
    """Counts of positive and negative subjects per score bin on [0, 1]: what a site may share."""
    labels = np.asarray(labels, dtype=int)
    edges = np.linspace(0.0, 1.0, bins + 1)
    pos, _ = np.histogram(np.asarray(scores)[labels == 1], bins=edges)
    neg, _ = np.histogram(np.asarray(scores)[labels == 0], bins=edges)
    return pos.astype(int).tolist(), neg.astype(int).tolist()


def _histogram_samples(pos, neg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos, neg = np.asarray(pos, dtype=float), np.asarray(neg, dtype=float)
    centres = (np.arange(len(pos)) + 0.5) / len(pos)
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    scores = np.r_[centres, centres]
    weights = np.r_[pos, neg]
    keep = weights > 0
    return labels[keep], scores[keep], weights[keep]


def auc_from_histograms(pos, neg) -> float:
    """AUC of binned scores (ties inside a bin count one half), e.g. the sum of every site's histograms."""
    labels, scores, weights = _histogram_samples(pos, neg)
    return auc_or_nan(labels, scores, weights)


def _binned_auc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUC of binned scores along the last axis (ties inside a bin count one half): P(a positive's
    bin is above a negative's) + P(same bin) / 2."""
    below = np.cumsum(neg, axis=-1) - neg                       # negatives in lower bins
    wins = (pos * (below + 0.5 * neg)).sum(axis=-1)
    return wins / (pos.sum(axis=-1) * neg.sum(axis=-1))


def auc_ci_from_histograms(pos, neg, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> list[float]:
    """A percentile bootstrap CI of the binned AUC: the positives and the negatives each redrawn,
    with replacement, from their own histogram (class sizes kept, as a stratified bootstrap of
    subjects would). Counts only: what the sites sent for the pooled ROC."""
    pos, neg = np.asarray(pos, dtype=float), np.asarray(neg, dtype=float)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    aucs = _binned_auc(rng.multinomial(n_pos, pos / n_pos, size=resamples).astype(float),
                       rng.multinomial(n_neg, neg / n_neg, size=resamples).astype(float))
    alpha = (1 - level) / 2
    return [float(np.quantile(aucs, alpha)), float(np.quantile(aucs, 1 - alpha))]


def calibration_from_histograms(pos, neg, transform=None, groups: int = 10) -> dict:
    """Brier score, expected calibration error and the reliability curve of binned scores: each
    bin's subjects at the bin's centre (`transform` maps the model's P(AD) to the reported score,
    e.g. a Platt calibration), regrouped into `groups` equal-width bins of the reported score for
    ECE and the curve. Counts only (the sites' score histograms); a bin of width w puts each score
    within w/2 of its centre before `transform`."""
    pos, neg = np.asarray(pos, dtype=float), np.asarray(neg, dtype=float)
    n = pos.sum() + neg.sum()
    if n == 0:
        return {"brier": float("nan"), "ece": float("nan"), "reliability": []}
    centres = (np.arange(len(pos)) + 0.5) / len(pos)
    score = np.asarray(transform(centres) if transform is not None else centres, dtype=float)
    brier = float((pos * (1 - score) ** 2 + neg * score ** 2).sum() / n)
    group = np.minimum((score * groups).astype(int), groups - 1)
    ece, curve = 0.0, []
    for g in range(groups):
        members = group == g
        count = pos[members].sum() + neg[members].sum()
        if count == 0:
            continue
        predicted = float((score[members] * (pos[members] + neg[members])).sum() / count)
        observed = float(pos[members].sum() / count)
        ece += count / n * abs(predicted - observed)
        curve.append([predicted, observed, int(count)])
    return {"brier": brier, "ece": float(ece), "reliability": curve}


def roc_from_histograms(pos, neg) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the binned scores, for plots."""
    labels, scores, weights = _histogram_samples(pos, neg)
    if len(np.unique(labels)) < 2:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    fpr, tpr, _ = roc_curve(labels, scores, sample_weight=weights)
    return fpr, tpr
