"""What one evaluation may release from a site, on a grid the site fixes (issue #30, docs/privacy.md).

The coordinator chooses everything in an evaluation request: the model, the calibration (a, b),
the threshold, the histogram resolution, the run key. Whatever it chooses, an evaluation's reply
is a function of

* the site's score grid: counts of each class in `site_bins` equal bins of the model's own P(AD)
  on [0, 1] (and, for a calibration pass, of its logit on [-LOGIT_RANGE, LOGIT_RANGE]). A run may
  ask for fewer bins only where its edges are among the site's (a divisor of `site_bins`), and
  the calibration only relabels the edges: it never moves what is counted;
* the ranks of the scores (AUC and its bootstrap CI), and every number rounded to the site's
  `digits` (decimals for numbers in [0, 1], significant digits for the rest).

The threshold a request names is applied at the site grid's edge nearest to it, so the
sensitivity, specificity and accuracy it gives are counts the grid already holds. That bounds
what N evaluations can tell a coordinator by N times `release_bits` (below), and a recursive
zoom of the calibration sees nothing finer than the site's bins (tests/test_release.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .calibration import Calibration, logit_histograms
from .metrics import binary_metrics, score_histograms
from .protocol import LOGIT_NEG, LOGIT_POS, NUM_EXAMPLES, SUPPRESSED

UNIT_METRICS = ("auc", "acc", "sensitivity", "specificity")      # and auc_ci: numbers in [0, 1]
COUNTS = (NUM_EXAMPLES, "n", "n_pos", "n_neg", SUPPRESSED)


@dataclass(frozen=True)
class ReleaseGrid:
    """The site's own resolution for what an evaluation releases (its policy, never the run's)."""
    site_bins: int | None = 50          # the finest score histogram any run gets (policy max_histogram_bins);
                                        # None: no site grid (a simulated site: nothing to protect)
    digits: int | None = 3              # rounding of every released number (None: as computed)

    def bins_for(self, requested: int) -> int:
        """The run's histogram resolution if its edges are the site's (a divisor of site_bins),
        else ValueError naming the ones it may ask for."""
        if self.site_bins is None:
            return requested
        if requested < 1 or self.site_bins % requested:
            allowed = ", ".join(str(b) for b in range(1, self.site_bins + 1) if self.site_bins % b == 0)
            raise ValueError(f"the site's score histograms have {self.site_bins} bins; a run may ask for "
                             f"{allowed} (coarser grids share the site's edges), not {requested}")
        return requested


AS_COMPUTED = ReleaseGrid(site_bins=None, digits=None)     # a simulated site: nothing to protect


def snapped_threshold(calibration: Calibration, site_bins: int) -> float:
    """The edge of the site's P(AD) grid whose calibrated value lies nearest the requested
    threshold: predicted AD is P(AD) at or above it."""
    edges = np.linspace(0.0, 1.0, site_bins + 1)
    calibrated = calibration.apply(np.clip(edges, 1e-12, 1 - 1e-12))
    return float(edges[int(np.argmin(np.abs(calibrated - calibration.threshold)))])


def check_calibration(calibration: Calibration) -> None:
    """A calibration must keep the model's ranking (a > 0, finite): ValueError otherwise."""
    if calibration.calibrated and not (math.isfinite(calibration.a) and math.isfinite(calibration.b)
                                       and calibration.a > 0):
        raise ValueError(f"a calibration must keep the model's ranking (a > 0, finite a and b); got a "
                         f"{calibration.a!r}, b {calibration.b!r}")
    if not math.isfinite(calibration.threshold):
        raise ValueError("the calibration's threshold is not a finite number")


def rounded(metrics: dict, digits: int | None) -> dict:
    """Every released number at the site's resolution: counts as they are, numbers in [0, 1]
    (UNIT_METRICS, auc_ci) to `digits` decimals, any other to `digits` significant digits."""
    if digits is None:
        return dict(metrics)

    def significant(x: float) -> float:
        return x if not math.isfinite(x) or x == 0 else float(f"{x:.{digits - 1}e}")

    out = {}
    for key, value in metrics.items():
        if key in COUNTS or isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            out[key] = value
        elif isinstance(value, (list, tuple)):
            if all(isinstance(v, (int, np.integer)) for v in value):
                out[key] = list(value)          # histograms: counts
            else:
                out[key] = [round(float(v), digits) if key == "auc_ci" and math.isfinite(v) else significant(float(v))
                            for v in value]
        elif key in UNIT_METRICS:
            out[key] = round(float(value), digits) if math.isfinite(value) else value
        else:
            out[key] = significant(float(value))
    return out


def _log2_histograms(n: int, bins: int) -> float:
    """log2 of the number of ways `n` subjects fall into `bins` bins."""
    return math.log2(math.comb(n + bins - 1, bins - 1)) if n > 0 else 0.0


def release_bits(n_pos: int, n_neg: int, grid: ReleaseGrid, other_numbers: int = 1, calibrating: bool = True) -> float:
    """An upper bound, in bits, on what one evaluation of a split with n_pos AD and n_neg CN subjects
    can tell whoever chose its model and calibration: the split's size, the site-grid histograms
    of both classes (the released ones are coarsenings of them, the threshold's counts read off
    them), again on the logit grid when it is a calibration pass, the AUC and its two CI bounds
    at the site's decimals, and `other_numbers` more at its significant digits (the work's seconds)."""
    digits = grid.digits if grid.digits is not None else 17
    bits = math.log2(n_pos + 1) + math.log2(n_neg + 1)
    bits += (2 if calibrating else 1) * (_log2_histograms(n_pos, grid.site_bins) + _log2_histograms(n_neg, grid.site_bins))
    bits += 3 * math.log2(10 ** digits + 1)                                      # auc, auc_ci
    bits += other_numbers * math.log2(2 * 9 * 10 ** (digits - 1) * 632 + 3)     # sign, mantissa, float64 decades
    return bits


def evaluation_release(binary: np.ndarray, positive: np.ndarray, calibration: Calibration | None, bins: int,
                       grid: ReleaseGrid, bootstrap: int, seed: int, logits: bool = False) -> tuple[dict, tuple]:
    """What a site reports of a model on a split's labelled subjects (`binary` is AD, `positive`
    the model's P(AD)): metrics at the calibration's threshold (snapped to the site's grid), with
    their count as "n", the logit histograms with `logits`, and the score histograms (on the
    model's own P(AD): a calibration relabels edges, it never moves what is counted)."""
    calibration = calibration or Calibration()
    check_calibration(calibration)
    bins = grid.bins_for(bins)
    if grid.site_bins is None:                   # the threshold as asked, on the calibrated scores
        metrics = binary_metrics(binary, calibration.apply(positive), threshold=calibration.threshold,
                                 bootstrap=bootstrap, seed=seed)
    else:
        metrics = binary_metrics(binary, positive, threshold=snapped_threshold(calibration, grid.site_bins),
                                 bootstrap=bootstrap, seed=seed)
    if logits:
        metrics[LOGIT_POS], metrics[LOGIT_NEG] = logit_histograms(binary, positive, bins)
    return rounded(metrics, grid.digits), score_histograms(binary, positive, bins)
