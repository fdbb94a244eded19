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
    max_evaluations: 200        # evaluation releases per run (validation rounds and the final test)
    max_histogram_bins: 50      # the score histograms' resolution a run may ask for
    max_bootstrap: 2000         # the AUC CI's bootstrap resamples a run may ask for
    approved_apps: installed    # run only app bundles that carry no code and name the cmvim ClientApp
                                # installed here (cmvim.client.approved_app); sha256: only the pinned ones
    approved_fab_sha256: []     # app bundle hashes this site accepts (with `installed`: a stricter pin)

A simulated site (cmvim-sim, `flwr run .`: synthetic data) runs SIMULATED_SITE_POLICY, the
defaults without small-cell suppression or an evaluation limit.

Every request from the server is checked before any data is read; one outside the policy is
refused with a message naming the rule and the requested value (config values only: nothing
from the site's data), and the server reports the site as having refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cmvim.config import from_dict, load_yaml
from cmvim.run_config import RunConfig

Phase = Literal["pretrain", "finetune", "evaluate"]


class PolicyRefusal(Exception):
    """A request outside the site policy; the message is public (it names rules and config values)."""


@dataclass
class SitePolicy:
    allowed_phases: list[Phase] = field(default_factory=lambda: ["pretrain", "finetune", "evaluate"])
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
    max_histogram_bins: int = 50
    max_bootstrap: int = 2000
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
        if cfg.use_reports and not self.use_reports:
            raise PolicyRefusal("site policy does not allow the use of reports (use_reports: false); "
                                "the run asks for them (use_reports: true)")
        if not training:
            ev = cfg.evaluation
            _at_most(ev.histogram_bins, self.max_histogram_bins, "score histogram bins", "evaluation.histogram_bins")
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


def _at_most(requested, limit, what: str, key: str) -> None:
    if requested > limit:
        raise PolicyRefusal(f"site policy allows at most {limit} {what}; the run asks for {requested} ({key})")


# synthetic sites: nothing to protect, and a researcher reads every split's numbers
SIMULATED_SITE_POLICY = SitePolicy(min_cell_count=0, max_evaluations=None)


def load_policy(path: str | Path | None) -> SitePolicy:
    """The site's policy from YAML (unknown keys are errors that name them); None: the defaults."""
    if path is None or str(path) == "":
        return SitePolicy()
    data = load_yaml(Path(path)) or {}
    policy = from_dict(SitePolicy, data, "site policy")
    if policy.max_local_epochs < 1 or policy.max_batch_size < 1:
        raise ValueError("site policy: max_local_epochs and max_batch_size must be at least 1")
    if policy.max_epsilon is not None and policy.max_epsilon <= 0:
        raise ValueError("site policy: max_epsilon must be positive")
    if policy.max_delta is not None and not 0 < policy.max_delta < 1:
        raise ValueError("site policy: max_delta must be between 0 and 1")
    if policy.min_noise_multiplier < 0:
        raise ValueError("site policy: min_noise_multiplier must not be negative")
    if policy.min_cell_count < 0 or policy.max_histogram_bins < 2 or policy.max_bootstrap < 0:
        raise ValueError("site policy: min_cell_count, max_bootstrap >= 0 and max_histogram_bins >= 2")
    if policy.max_evaluations is not None and policy.max_evaluations < 1:
        raise ValueError("site policy: max_evaluations must be at least 1 (or null: no limit)")
    return policy
