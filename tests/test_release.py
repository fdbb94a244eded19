"""A release budget that bounds information (issue #30, finding 4): whatever model, calibration,
threshold, histogram resolution, run key and split fractions a coordinator sends, what an
evaluation releases is a function of the site's score grid, the scores' ranks and numbers at the
site's resolution (cmvim.release), on splits the site fixed. Each leak the issue found is tried here."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from cmvim.calibration import LOGIT_RANGE, Calibration
from cmvim.client import app as client_app
from cmvim.client.policy import PolicyRefusal, SitePolicy, load_policy
from cmvim.protocol import (ARRAYS, CALIBRATE, CALIBRATION, CONFIG, HIST_NEG, HIST_POS, LOGIT_NEG, LOGIT_POS, METRICS,
                            NUM_EXAMPLES, PHASE, ROUND, RUN_CONFIG, RUN_KEY, SITE, SPLIT, WORK_SECONDS)
from cmvim.release import AS_COMPUTED, ReleaseGrid, evaluation_release, release_bits
from cmvim.run_config import run_config
from cmvim.simulations.cohort import CohortConfig, cached_cohort
from cmvim.weights import initial_state

GRID = ReleaseGrid(site_bins=10, digits=3)        # a strict site: 10 bins, 3 digits


def release(scores, labels, calibration, bins=10, grid=GRID, logits=True):
    metrics, histograms = evaluation_release(np.asarray(labels), np.asarray(scores), calibration, bins, grid,
                                             bootstrap=0, seed=0, logits=logits)
    return json.dumps([metrics, histograms], sort_keys=True, default=float)


def within_bins(scores: np.ndarray, bins: int) -> np.ndarray:
    """Other scores in the same cells of the site's two grids (P(AD) and its logit) with the same
    ranks: within each cell the scores are spread evenly again, in their order."""
    logit_edges = np.linspace(-LOGIT_RANGE, LOGIT_RANGE, bins + 1)
    edges = np.unique(np.r_[np.linspace(0, 1, bins + 1), 1 / (1 + np.exp(-logit_edges))])
    cell = np.searchsorted(edges, scores, side="right") - 1
    moved = scores.copy()
    for c in np.unique(cell):
        members = np.flatnonzero(cell == c)
        members = members[np.argsort(scores[members])]
        spots = edges[c] + (edges[c + 1] - edges[c]) * (np.arange(len(members)) + 0.5) / len(members)
        moved[members] = spots
    assert (np.searchsorted(edges, moved, side="right") - 1 == cell).all()
    assert (np.argsort(moved, kind="stable") == np.argsort(scores, kind="stable")).all()
    return moved


def zoom_attack(site, bins_allowed=(10, 5, 2)) -> list[str]:
    """Issue #30's attack: a calibration (a, b) that maps a narrow window of the model's logit onto
    the inner bins, refined recursively (each step halves the window around where subjects were
    seen), with thresholds inside it and every histogram resolution the site allows. `site`:
    (calibration, bins) -> the released text. Returns every release the attack saw."""
    seen, centre, width = [], 0.0, 8.0
    for _ in range(12):
        a = 4.0 / width                       # the window [centre - width/2, centre + width/2] -> logits -2..2
        cal = Calibration(a=a, b=-a * centre, calibrated=True, threshold=0.5)
        for bins in bins_allowed:
            seen.append(site(cal, bins))
        for t in (0.3, 0.45, 0.55, 0.7):
            seen.append(site(Calibration(a=a, b=-a * centre, calibrated=True, threshold=t), 10))
        centre += width / 8
        width /= 2
    return seen


def test_a_recursive_calibration_zoom_sees_nothing_finer_than_the_sites_bins():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(21, int), np.zeros(21, int)]
    scores = np.clip(np.r_[rng.beta(5, 2, 21), rng.beta(2, 5, 21)], 0.001, 0.999)
    other = within_bins(scores, GRID.site_bins)
    assert np.abs(other - scores).max() > 0.02                  # really other data, same bins and ranks
    ours = zoom_attack(lambda cal, bins: release(scores, labels, cal, bins))
    theirs = zoom_attack(lambda cal, bins: release(other, labels, cal, bins))
    assert ours == theirs, "the attack told apart two sites whose scores share bins and ranks"
    # the same attack on a site without a grid (as every site was before) tells them apart
    bare = zoom_attack(lambda cal, bins: release(scores, labels, cal, bins, AS_COMPUTED))
    bare_other = zoom_attack(lambda cal, bins: release(other, labels, cal, bins, AS_COMPUTED))
    assert bare != bare_other


def test_the_histograms_count_the_models_own_scores_whatever_the_calibration():
    labels = np.r_[np.ones(5, int), np.zeros(5, int)]
    scores = np.linspace(0.05, 0.95, 10)
    plain = evaluation_release(labels, scores, None, 10, GRID, 0, 0, logits=True)
    zoomed = evaluation_release(labels, scores, Calibration(a=40.0, b=-3.0, calibrated=True), 10, GRID, 0, 0,
                                logits=True)
    assert plain[1] == zoomed[1]
    assert plain[0][LOGIT_POS] == zoomed[0][LOGIT_POS] and len(plain[0][LOGIT_POS]) == 10   # the run's bins
    assert plain[0]["auc"] == zoomed[0]["auc"]
    with pytest.raises(ValueError, match="keep the model's ranking"):
        evaluation_release(labels, scores, Calibration(a=-1.0, calibrated=True), 10, GRID, 0, 0)
    with pytest.raises(ValueError, match="have 10 bins; a run may ask for 1, 2, 5, 10"):
        evaluation_release(labels, scores, None, 7, GRID, 0, 0)


def test_the_threshold_is_applied_at_the_nearest_edge_of_the_sites_grid():
    labels = np.r_[np.ones(4, int), np.zeros(4, int)]
    scores = np.array([0.91, 0.72, 0.56, 0.53, 0.47, 0.44, 0.21, 0.05])
    at = {t: json.loads(release(scores, labels, Calibration(threshold=t), logits=False))[0]["sensitivity"]
          for t in (0.52, 0.54, 0.56, 0.58)}
    # 0.52 and 0.54 snap to the edge 0.5 (all four AD at or above it), 0.56 and 0.58 to 0.6 (two):
    # a threshold between two edges tells nothing the grid's counts do not
    assert at == {0.52: 1.0, 0.54: 1.0, 0.56: 0.5, 0.58: 0.5}


def test_every_released_number_is_at_the_sites_resolution():
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(13, int), np.zeros(17, int)]
    metrics, _ = evaluation_release(labels, rng.uniform(size=30), Calibration(a=1.3, b=0.2, calibrated=True,
                                                                             threshold=0.41), 5, GRID, 200, 3)
    for key in ("auc", "acc", "sensitivity", "specificity", *("auc_ci",) * 2):
        values = metrics[key] if isinstance(metrics[key], list) else [metrics[key]]
        assert all(round(v, 3) == v for v in values), (key, values)


def test_the_bound_in_bits_counts_grid_histograms_and_rounded_numbers():
    """docs/privacy.md's numbers: a 21/21 validation split under a 10-bin, 3-digit policy."""
    one = release_bits(21, 21, GRID, calibrating=True)
    histograms = 2 * 2 * math.log2(math.comb(30, 9))
    assert one == pytest.approx(2 * math.log2(22) + histograms + 3 * math.log2(1001) + math.log2(2 * 9 * 100 * 632 + 3))
    assert round(one) == 154 and round(release_bits(21, 21, GRID, calibrating=False)) == 106   # as documented
    assert release_bits(21, 21, ReleaseGrid(site_bins=50, digits=3)) > one > release_bits(21, 21, GRID, False)


def test_the_policy_refuses_grids_the_site_does_not_share_and_oversized_runs():
    cfg = run_config({"model": {"preset": "tiny"}, "preprocess": {"spatial": "none", "shape": 32},
                      "evaluation": {"histogram_bins": 49}})
    with pytest.raises(PolicyRefusal, match=r"a run may ask for 1, 2, 5, 10, 25, 50 .*not 49 \(evaluation.histogram_bins\)"):
        SitePolicy().check(cfg, "finetune", training=False, split="val")
    SitePolicy().check(run_config({"model": {"preset": "tiny"}, "preprocess": {"spatial": "none", "shape": 32},
                                   "evaluation": {"histogram_bins": 25}}), "finetune", training=False, split="val")
    big = run_config({"model": {"preset": "tiny", "img_size": 160}, "preprocess": {"spatial": "none", "shape": 160}})
    with pytest.raises(PolicyRefusal, match=r"at most 128 voxels a side.*asks for 160 \(preprocess.shape\)"):
        SitePolicy().check(big, "pretrain", training=True)
    with pytest.raises(PolicyRefusal, match="at most 1000 model parameters; the run asks for 5000"):
        SitePolicy(max_model_parameters=1000).check_model_size(5000)


@pytest.mark.parametrize("line, named", [("split_fractions: [0, 1]", "split_fractions must be three"),
                                         ("split_fractions: null", "split_fractions must be three"),
                                         ("release_digits: 0", "release_digits"),
                                         ("max_histogram_bins: null", "max_histogram_bins")])
def test_a_policy_file_names_its_bad_release_settings(tmp_path, line, named):
    path = tmp_path / "policy.yaml"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=named):
        load_policy(path)


# -- through the site's ClientApp, deployed ------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = cached_cohort(CohortConfig(sites=1, subjects=40, shape=32, seed=5, effect_scale=3.0, pet_missing=0.0),
                         root=tmp_path_factory.mktemp("release-cohort"))
    return root / "A"


def ask(cfg, context, arrays, split: str, run_key: str = "r1", **extra) -> dict:
    config = ConfigRecord({RUN_CONFIG: cfg.to_json(), PHASE: "finetune", ROUND: 0, "server-round": 1,
                           RUN_KEY: run_key, SPLIT: split, **extra})
    metadata = Metadata(run_id=1, message_id=f"m{time.monotonic_ns()}", src_node_id=1, dst_node_id=7,
                        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600.0,
                        message_type=MessageType.EVALUATE)
    reply = client_app.evaluate(Message(content=RecordDict({ARRAYS: ArrayRecord(arrays), CONFIG: config}),
                                        metadata=metadata), context)
    assert "error" not in reply.content[SITE], reply.content[SITE]["error"]
    return dict(reply.content[METRICS].items())


def test_a_deployed_site_scores_its_own_splits_and_releases_on_its_grid(site, tmp_path):
    """The run config's split_fractions [0, 1, 0] would put every subject into val (issue #30): a
    deployed site splits by its policy's seed and fractions. Every released number is at the
    policy's resolution, every histogram on its bins, and the bound counts every key released."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("min_cell_count: 0\nmax_histogram_bins: 10\nsplit_fractions: [0.5, 0.25, 0.25]\n")
    context = Context(run_id=1, node_id=7, node_config={"site": "A", "data-dir": str(site), "policy": str(policy),
                                                        "state-dir": str(tmp_path / "state")},
                      state=RecordDict(), run_config={})
    greedy = run_config({"model": {"preset": "tiny"}, "preprocess": {"spatial": "none", "shape": 32},
                         "split_fractions": [0.0, 1.0, 0.0], "evaluation": {"histogram_bins": 10, "bootstrap": 100}})
    weights = initial_state(greedy, "finetune")
    val = ask(greedy, context, weights, "val", **{CALIBRATE: 1})
    own = client_app.site_data(greedy, site, (0, (0.5, 0.25, 0.25)))
    labelled = [r for r in own.records if r.entry.label in ("AD", "CN")]
    assert val[NUM_EXAMPLES] == sum(r.split == "val" for r in labelled) < len(labelled) / 2, \
        "the site's 25 % of its subjects, not the run's 100 %"
    assert len(val[HIST_POS]) == len(val[HIST_NEG]) == len(val[LOGIT_POS]) == len(val[LOGIT_NEG]) == 10
    zoom = Calibration(a=30.0, b=-2.0, calibrated=True, threshold=0.5).to_dict()
    test = ask(greedy, context, weights, "test", run_key="r2", **{CALIBRATION: json.dumps(zoom)})
    assert len(test[HIST_POS]) == 10 and sum(test[HIST_POS]) + sum(test[HIST_NEG]) == test[NUM_EXAMPLES] > 0
    for metrics in (val, test):
        accounted = {NUM_EXAMPLES, "n_pos", "n_neg", HIST_POS, HIST_NEG, LOGIT_POS, LOGIT_NEG, "auc", "auc_ci",
                     "acc", "sensitivity", "specificity", WORK_SECONDS}
        assert set(metrics) <= accounted, set(metrics) - accounted
        for key in ("auc", "acc", "sensitivity", "specificity"):
            assert math.isnan(metrics[key]) or round(metrics[key], 3) == metrics[key]
        assert float(f"{metrics[WORK_SECONDS]:.2e}") == metrics[WORK_SECONDS]
    releases = json.loads((tmp_path / "state" / "releases.json").read_text())
    assert releases == {"runs": {"r1": 1, "r2": 1}, "total": 2}       # one log for every run key
