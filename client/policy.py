"""Site policy: what a hospital allows a federated run to do with its data.

A YAML file the hospital controls (passed as `cmvim-client --policy FILE`), e.g.

    allowed_phases: [pretrain, finetune, evaluate]
    max_local_epochs: 5
    max_batch_size: 16
    use_reports: false          # free-text reports stay out of training
    dp_required: false          # true: refuse any training without differential privacy
    min_noise_multiplier: 0.5   # with dp_required: the least noise a DP round may add
    max_epsilon: 8.0            # the most privacy budget (epsilon) this site spends over EVERY run (its
                                # ledger): a run asking for more is refused, training stops at it, and
                                # a run without DP is refused (its epsilon is unbounded)
    max_delta: 0.001            # the largest delta a run may use (default: 1/n, n the site's subjects)
    secure_aggregation_required: false   # true: send weights only masked by SecAgg+ (the server
                                         # then learns only the sum over the sites)
    min_cell_count: 10          # an evaluation split with fewer subjects of a class releases nothing
    max_evaluations: 200        # evaluation releases at this site over EVERY run (its release log, like the
                                # privacy ledger): validation rounds, calibration passes and final tests
    max_histogram_bins: 50      # the site's score grid: every histogram an evaluation releases has these bins
                                # or a divisor of them (the same edges, coarser), whatever the calibration
    release_digits: 3           # every released number rounded: decimals for AUC, CI, accuracy, sensitivity
                                # and specificity, significant digits for the rest (docs/privacy.md's bound)
    max_bootstrap: 2000         # the AUC CI's bootstrap resamples a run may ask for
    split_fractions: [0.7, 0.1, 0.2]   # train/val/test for subjects the manifest gives no split, drawn
    split_seed: 0                      # with this seed: the site's, never the run config's
    max_model_parameters: 200000000    # the largest model the site trains or scores (the base preset: 127 M)
    max_input_shape: 128               # the largest model grid (preprocess.shape, voxels a side)
    approved_apps: installed    # run only app bundles that carry no code and name the cmvim ClientApp
                                # installed here (cmvim.client.approved_app); sha256: only the pinned ones
    approved_fab_sha256: []     # app bundle hashes this site accepts (with `installed`: a stricter pin)

A simulated site (cmvim-sim, `flwr run .`: synthetic data) runs SIMULATED_SITE_POLICY, the
defaults without small-cell suppression, an evaluation limit, a release grid or its own splits
(the run config's).

Every request from the server is checked before any data is read; one outside the policy is
refused with a message naming the rule and the requested value (config values only: nothing
from the site's data), and the server reports the site as having refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cmvim.config import from_dict, load_yaml
from cmvim.names import RUN_PHASES, RunPhase
from cmvim.release import AS_COMPUTED, ReleaseGrid
from cmvim.run_config import SPLIT_FRACTIONS, RunConfig, check_split_fractions


class PolicyRefusal(Exception):
    """A request outside the site policy; the message is public (it names rules and config values)."""


@dataclass
class SitePolicy:
    allowed_phases: list[RunPhase] = field(default_factory=lambda: list(RUN_PHASES))
    max_local_epochs: int = 10
    max_batch_size: int = 64
    use_reports: bool = True
    dp_required: bool = False
    min_noise_multiplier: float = 0.5
    max_epsilon: float | None = None
    max_delta: float | None = None
    secure_aggregation_required: bool = False
    min_cell_count: int = 10
    max_evaluations: int | None = 200
    max_histogram_bins: int | None = 50      # None: no site grid (simulated sites only; a policy file needs one)
    release_digits: int | None = 3
    max_bootstrap: int = 2000
    split_fractions: list[float] | None = field(default_factory=lambda: list(SPLIT_FRACTIONS))
    split_seed: int = 0
    max_model_parameters: int = 200_000_000
    max_input_shape: int = 128
    approved_apps: Literal["installed", "sha256"] = "installed"
    approved_fab_sha256: list[str] = field(default_factory=list)

    def check(self, cfg: RunConfig, phase: str, training: bool, split: str | None = None,
              masked: bool = False) -> None:
        """Raise PolicyRefusal if the server's request is outside this policy. Scoring the test
        split is the `evaluate` phase; validation during a phase belongs to that phase. `masked`:
        this training request arrived through SecAgg+ (set by the site's own mod, not the server)."""
        wanted = "evaluate" if not training and split == "test" else phase
        if wanted not in self.allowed_phases:
            raise PolicyRefusal(f"site policy does not allow the {wanted} phase "
                                f"(allowed_phases: {', '.join(self.allowed_phases) or 'none'})")
        _at_most(cfg.preprocess.shape, self.max_input_shape, "voxels a side of the model grid", "preprocess.shape")
        if cfg.use_reports and not self.use_reports:
            raise PolicyRefusal("site policy does not allow the use of reports (use_reports: false); "
                                "the run asks for them (use_reports: true)")
        if not training:
            ev = cfg.evaluation
            if self.max_histogram_bins is not None:
                _at_most(ev.histogram_bins, self.max_histogram_bins, "score histogram bins", "evaluation.histogram_bins")
            try:
                self.release_grid().bins_for(ev.histogram_bins)
            except ValueError as err:
                raise PolicyRefusal(f"{err} (evaluation.histogram_bins)") from None
            _at_most(ev.bootstrap, self.max_bootstrap, "bootstrap resamples", "evaluation.bootstrap")
            return
        pc = cfg.phase(phase)
        _at_most(pc.local_epochs, self.max_local_epochs, "local epochs", f"{phase}.local_epochs")
        _at_most(pc.batch_size, self.max_batch_size, "subjects per batch", f"{phase}.batch_size")
        if self.secure_aggregation_required and not masked:
            raise PolicyRefusal("site policy requires secure aggregation (secure_aggregation_required: true); this "
                                "training request would send the site's weights unmasked")
        privacy = cfg.privacy
        if self.dp_required and not privacy.enabled:
            raise PolicyRefusal("site policy requires differential privacy (dp_required: true); "
                                "this run trains without it (privacy.enabled: false)")
        if self.max_epsilon is not None and not privacy.enabled:
            raise PolicyRefusal(f"site policy caps the privacy budget (max_epsilon {self.max_epsilon:g}); this run "
                                "trains without differential privacy, whose epsilon is unbounded")
        if privacy.enabled and self.max_delta is not None and privacy.delta is not None and privacy.delta > self.max_delta:
            raise PolicyRefusal(f"site policy allows delta at most {self.max_delta:g} (max_delta); the run asks for "
                                f"{privacy.delta:g}")
        if (self.dp_required and privacy.enabled and privacy.noise_multiplier is not None
                and privacy.noise_multiplier < self.min_noise_multiplier):
            raise PolicyRefusal(f"site policy requires a noise multiplier of at least {self.min_noise_multiplier:g} "
                                f"(min_noise_multiplier); the run asks for {privacy.noise_multiplier:g}")
        budget = privacy.budget()
        if privacy.enabled and self.max_epsilon is not None and budget is not None and budget > self.max_epsilon:
            raise PolicyRefusal(f"site policy allows a privacy budget of at most epsilon {self.max_epsilon:g}; "
                                f"the run asks for {budget:g}")


    def release_grid(self) -> ReleaseGrid:
        """The site's grid for what evaluations release (cmvim.release)."""
        if self.max_histogram_bins is None and self.release_digits is None:
            return AS_COMPUTED
        return ReleaseGrid(site_bins=self.max_histogram_bins, digits=self.release_digits)

    def check_model_size(self, parameters: int) -> None:
        """Refuse shared weights larger than the site allows (counted from the message's arrays)."""
        _at_most(parameters, self.max_model_parameters, "model parameters", "the weights sent")


def _at_most(requested, limit, what: str, key: str) -> None:
    if requested > limit:
        raise PolicyRefusal(f"site policy allows at most {limit} {what}; the run asks for {requested} ({key})")


# synthetic sites: nothing to protect, and a researcher reads every split's numbers
SIMULATED_SITE_POLICY = SitePolicy(min_cell_count=0, max_evaluations=None, split_fractions=None,
                                   max_histogram_bins=None, release_digits=None)


def load_policy(path: str | Path | None) -> SitePolicy:
    """The site's policy from YAML (unknown keys are errors that name them); None: the defaults."""
    if path is None or str(path) == "":
        return SitePolicy()
    data = load_yaml(Path(path)) or {}
    policy = from_dict(SitePolicy, data, "site policy")
    if policy.max_histogram_bins is None:
        raise ValueError("site policy: max_histogram_bins must be a number of bins (the site's score grid)")
    if policy.max_local_epochs < 1 or policy.max_batch_size < 1:
        raise ValueError("site policy: max_local_epochs and max_batch_size must be at least 1")
    if policy.max_epsilon is not None and policy.max_epsilon <= 0:
        raise ValueError("site policy: max_epsilon must be positive")
    if policy.max_delta is not None and not 0 < policy.max_delta < 1:
        raise ValueError("site policy: max_delta must be between 0 and 1")
    if policy.min_noise_multiplier < 0:
        raise ValueError("site policy: min_noise_multiplier must not be negative")
    if policy.min_cell_count < 0 or policy.max_histogram_bins < 1 or policy.max_bootstrap < 0:
        raise ValueError("site policy: min_cell_count, max_bootstrap >= 0 and max_histogram_bins >= 1")
    if policy.release_digits is not None and not 1 <= policy.release_digits <= 15:
        raise ValueError("site policy: release_digits must be between 1 and 15 (or null: numbers as computed)")
    try:
        check_split_fractions(policy.split_fractions or [])
    except ValueError as err:
        raise ValueError(f"site policy: {err}") from None
    if policy.max_model_parameters < 1 or policy.max_input_shape < 8:
        raise ValueError("site policy: max_model_parameters must be positive and max_input_shape at least 8")
    if policy.max_evaluations is not None and policy.max_evaluations < 1:
        raise ValueError("site policy: max_evaluations must be at least 1 (or null: no limit)")
    return policy
