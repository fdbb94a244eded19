"""The decision threshold and the score calibration a run stores with its model, both fitted on
the sites' validation splits without a single subject's score leaving a site.

Each site sends, for the final model on its validation subjects, two histograms of the model's
logit (log-odds of P(AD)) on fixed edges (`logit_histograms`): counts per bin of its AD and CN
subjects, as it already sends score histograms for the pooled ROC. The coordinator sums them and
fits (`fit_calibration`):

- Platt scaling: P = sigmoid(a * logit + b), a logistic regression on the bin centres weighted by
  their counts (scikit-learn), so that 0.5 means even odds on validation subjects. A fit that
  would flip the ranking (a <= 0) or cannot be made (one class) leaves the scores as they are and
  says so (`calibrated` False).
- the threshold on the calibrated score: Youden's J (the largest sensitivity + specificity - 1 on
  validation; where several thresholds tie, as across a gap between the classes, the middle one), or the highest threshold reaching a target sensitivity; candidates are the bin
  edges, so the threshold falls between validation subjects' scores, never on one.

Torch-free: the coordinator, the sites and `cmvim-client predict` share it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

LOGIT_RANGE = 12.0           # logits beyond +-12 (P within 6e-6 of 0 or 1) fall in the end bins
LOGIT_BINS = 96              # a quarter logit per bin: finer than any validation split resolves
RULES = ("youden", "sensitivity", "fixed")


def logit_edges(bins: int = LOGIT_BINS) -> np.ndarray:
    return np.linspace(-LOGIT_RANGE, LOGIT_RANGE, bins + 1)


def logit(probabilities) -> np.ndarray:
    p = np.clip(np.asarray(probabilities, dtype=float), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def logit_histograms(labels, probabilities, bins: int = LOGIT_BINS) -> tuple[list[int], list[int]]:
    """Counts of positive and negative subjects per logit bin (the end bins take what lies beyond)."""
    labels = np.asarray(labels, dtype=int)
    z = np.clip(logit(probabilities), -LOGIT_RANGE, LOGIT_RANGE)
    edges = logit_edges(bins)
    pos, _ = np.histogram(z[labels == 1], bins=edges)
    neg, _ = np.histogram(z[labels == 0], bins=edges)
    return pos.astype(int).tolist(), neg.astype(int).tolist()


@dataclass(frozen=True)
class Calibration:
    """What turns the model's P(AD) into the score and label a run reports and `predict` writes."""
    a: float = 1.0                   # calibrated P = sigmoid(a * logit(P) + b); identity: a 1, b 0
    b: float = 0.0
    threshold: float = 0.5           # on the calibrated score: AD at or above
    rule: str = "fixed"              # how the threshold was chosen (RULES)
    calibrated: bool = False         # whether a and b were fitted (else the scores are the model's own)
    n_val: int = 0                   # validation subjects the fit saw
    val_sensitivity: float = float("nan")
    val_specificity: float = float("nan")
    note: str = "threshold 0.5 on uncalibrated scores (no validation fit)"

    def apply(self, probabilities) -> np.ndarray:
        """Calibrated scores, in [0, 1], ranked as the model ranks them."""
        probabilities = np.asarray(probabilities, dtype=float)
        if not self.calibrated:
            return probabilities
        with np.errstate(over="ignore"):           # a steep calibration: exp overflows to inf, P to 0
            return 1.0 / (1.0 + np.exp(-(self.a * logit(probabilities) + self.b)))

    def predict(self, probabilities) -> np.ndarray:
        """1 (AD) where the calibrated score reaches the threshold."""
        return (self.apply(probabilities) >= self.threshold).astype(int)

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("val_sensitivity", "val_specificity"):
            if known.get(key) is None:
                known.pop(key, None)
        return cls(**known)


def fit_calibration(pos, neg, rule: str = "youden", target_sensitivity: float = 0.85, platt: bool = True
                    ) -> Calibration:
    """Platt scaling and the threshold from summed validation logit histograms (see the module doc)."""
    if rule not in RULES:
        raise ValueError(f"threshold rule {rule!r}: choose from {', '.join(RULES)}")
    pos, neg = np.asarray(pos, dtype=float), np.asarray(neg, dtype=float)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0 or (rule == "fixed" and not platt):
        why = ("evaluation.threshold_rule: fixed, calibration: none" if rule == "fixed" and (n_pos and n_neg)
               else f"the validation splits hold {n_pos} AD and {n_neg} CN subjects: nothing to fit")
        return Calibration(n_val=n_pos + n_neg, note=f"threshold 0.5 on uncalibrated scores ({why})")
    edges = logit_edges(len(pos))                   # the bins the sites sent
    centres = (edges[:-1] + edges[1:]) / 2
    a, b, calibrated, note = 1.0, 0.0, False, "scores not calibrated (evaluation.calibration: none)"
    if platt:
        a, b = _platt(centres, pos, neg)
        calibrated = a > 0
        note = ("scores Platt-calibrated on the validation splits" if calibrated else
                "scores not calibrated: the validation fit would reverse the model's ranking")
        if not calibrated:
            a, b = 1.0, 0.0
    calibration = Calibration(a=a, b=b, calibrated=calibrated)
    # threshold candidates: the calibrated values of the bin edges; predicted AD = bins above the edge
    candidates = calibration.apply(1.0 / (1.0 + np.exp(-edges)))
    tpr = np.r_[np.cumsum(pos[::-1])[::-1], 0.0] / n_pos        # share of AD at or above edge i
    fpr = np.r_[np.cumsum(neg[::-1])[::-1], 0.0] / n_neg
    if rule == "fixed":                             # 0.5 on the calibrated scores
        i = int(np.flatnonzero(candidates >= 0.5).min()) if (candidates >= 0.5).any() else len(candidates) - 1
        chosen = "evaluation.threshold_rule: fixed"
    elif rule == "youden":
        j = tpr - fpr
        best = np.flatnonzero(j >= j.max() - 1e-12)
        i = int(best[len(best) // 2])               # ties (a gap between the classes): its middle, not an end
        chosen = f"Youden's J {tpr[i] - fpr[i]:.2f}"
    else:
        reaching = np.flatnonzero(tpr >= target_sensitivity)
        i = int(reaching.max())                     # the highest threshold that keeps the sensitivity
        chosen = f"target sensitivity {target_sensitivity:g}"
    threshold = 0.5 if rule == "fixed" else float(np.clip(candidates[i], 0.0, 1.0))
    return Calibration(a=float(a), b=float(b), threshold=threshold, rule=rule, calibrated=calibrated,
                       n_val=n_pos + n_neg, val_sensitivity=float(tpr[i]), val_specificity=float(1 - fpr[i]),
                       note=f"{note}; threshold {threshold:.3f} ({chosen} on {n_pos + n_neg} validation subjects)")


def _platt(centres: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression
    keep_pos, keep_neg = pos > 0, neg > 0
    x = np.r_[centres[keep_pos], centres[keep_neg]].reshape(-1, 1)
    y = np.r_[np.ones(keep_pos.sum()), np.zeros(keep_neg.sum())]
    w = np.r_[pos[keep_pos], neg[keep_neg]]
    # a light L2 keeps a perfectly separated validation set from an infinite slope
    model = LogisticRegression(C=10.0).fit(x, y, sample_weight=w)
    return float(model.coef_[0, 0]), float(model.intercept_[0])
