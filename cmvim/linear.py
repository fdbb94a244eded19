"""Linear read-outs, the yardsticks every deep result is read against.

- The **linear baseline**: a logistic regression on each subject's regional means (the
  preprocessed volumes averaged over a coarse grid of blocks, per modality). No deep model at
  all: if CMViM does not beat this, it has not earned its place.
- The **linear probe**: the same logistic regression on a frozen encoder's features (what the
  classifier's head reads), the direct measure of what pretraining put into the representation.

Both fit scikit-learn's LogisticRegressionCV (L2, the strength chosen by stratified k-fold
cross-validation on log-loss, which keeps the scores calibrated enough for a 0.5 threshold;
AUC alone picks the strongest penalty and leaves every score near 0.5) behind a standard
scaler, in `fit_logistic`: one recipe, two inputs.
"""
from __future__ import annotations

import warnings
from typing import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .run_config import LinearConfig


def regional_means(batch: Mapping[str, torch.Tensor], grid: int) -> np.ndarray:
    """(b, 2 * grid^3 + 1): MRI block means, PET block means (NaN where the PET is absent, for the
    imputer) and whether the PET is present."""
    parts = []
    for modality in ("mri", "pet"):
        means = F.adaptive_avg_pool3d(batch[modality].float(), grid).flatten(1)        # (b, grid^3)
        present = batch[f"{modality}_present"].bool()
        means[~present] = float("nan")
        parts.append(means)
    parts.append(batch["pet_present"].float()[:, None])
    return torch.cat(parts, dim=1).numpy()


def collect(batches: Iterable[Mapping[str, torch.Tensor]], features) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, f), labels (n,)) over batches; `features(batch)` -> (b, f) array."""
    xs, ys = [], []
    for batch in batches:
        xs.append(np.asarray(features(batch), dtype=np.float64))
        ys.append(batch["label"].numpy())
    if not xs:
        return np.zeros((0, 0)), np.zeros(0, dtype=int)
    return np.concatenate(xs), np.concatenate(ys)


def encoder_features(model: torch.nn.Module):
    """features(batch) of a frozen classifier's encoder: its mean-pooled tokens (what the head reads)."""
    @torch.no_grad()
    def features(batch):
        model.eval()
        return model.features(batch).float().numpy()
    return features


def fit_logistic(x: np.ndarray, y: np.ndarray, cfg: LinearConfig | None = None, seed: int = 0):
    """A fitted scikit-learn pipeline: mean imputation, standardisation, L2 logistic regression
    with its strength chosen by cross-validated log-loss. `predict_proba(x)[:, 1]` scores the last class."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cfg = cfg or LinearConfig()
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"the linear model needs two classes to fit, got {len(y)} subject(s) of {len(classes)}")
    folds = int(min(cfg.folds, counts.min()))
    if folds < 2:
        raise ValueError(f"the linear model needs at least 2 subjects of each class, got {dict(zip(classes, counts))}")
    model = make_pipeline(
        SimpleImputer(strategy="mean", keep_empty_features=True),
        StandardScaler(),
        LogisticRegressionCV(Cs=cfg.strengths, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                             scoring="neg_log_loss", max_iter=5000))
    with warnings.catch_warnings():
        # scikit-learn 1.8 announces API changes in LogisticRegressionCV that do not change this fit
        warnings.simplefilter("ignore", FutureWarning)
        model.fit(x, y)
    return model


def positive_scores(model, x: np.ndarray) -> np.ndarray:
    """P(last class) per row: the score the AUC reads."""
    if len(x) == 0:
        return np.zeros(0)
    return model.predict_proba(x)[:, -1]
