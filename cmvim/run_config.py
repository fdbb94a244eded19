"""The run config: one YAML file, parsed and validated once (`run_config`) into the dataclasses
below; an unknown key or a bad value is a ConfigError that names it. Torch-free, so that reading a
config (the coordinator's `min_nodes`, a site's policy check) loads neither torch nor Opacus.

Every site receives the run config with each message (cmvim.protocol.RUN_CONFIG), so a
hospital's SuperNode needs no copy of its own; its site policy checks it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, Sequence

from .config import apply_overrides, from_dict, load_yaml, to_dict
from .model_config import MODALITIES, ModelConfig, model_config, model_mapping
from .names import LABELS, NORMALIZER_NAMES, Phase, PrecisionName


def check_device_spec(spec: str) -> str:
    """`spec`, normalised, if it names a device cmvim accepts (checked without touching a GPU:
    cmvim.device resolves it on the machine that computes)."""
    text = str(spec).strip().lower()
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise ValueError(f"device {spec!r}: choose auto, cpu, cuda or cuda:N")

SPLIT_FRACTIONS = (0.7, 0.1, 0.2)         # train / val / test for subjects the manifest gives no split
# what simulations.baselines.run_baselines trains beside the federated model (docs/science.md)
BASELINES = ("local", "centralized", "linear", "cnn3d", "cnn3d_centralized")


def check_split_fractions(fractions) -> None:
    """ValueError unless `fractions` are three non-negative numbers (train, val, test) summing to 1."""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split_fractions must be three non-negative numbers summing to 1, got {fractions}")


@dataclass
class RegistrationConfig:
    """`spatial: template` (cmvim.data.registration, docs/preprocessing.md): how scans are brought
    into template space and when a registration counts as failed."""
    bias_correction: bool = True                      # N4 on the T1 before registering it
    brain_margin_mm: float | None = 4.0               # brain extraction: the template's brain mask dilated this much (null: none)
    # quality control: a visit outside these is a bad row naming the scan and the measure
    min_t1_similarity: float = 0.6                    # registered T1 vs template T1, correlation inside the brain
    min_pet_similarity: float = 0.4                   # registered PET vs template grey matter, correlation
    head_scale_range: tuple[float, float] = (0.75, 1.35)   # the affine's scale factors (head size vs template)

    def __post_init__(self):
        if self.brain_margin_mm is not None and self.brain_margin_mm < 0:
            raise ValueError(f"registration.brain_margin_mm must be 0 or more, got {self.brain_margin_mm}")
        low, high = self.head_scale_range
        if not 0 < low < 1 < high:
            raise ValueError(f"registration.head_scale_range must satisfy 0 < low < 1 < high, got {self.head_scale_range}")
        for name in ("min_t1_similarity", "min_pet_similarity"):
            if not -1 <= getattr(self, name) <= 1:
                raise ValueError(f"registration.{name} is a correlation: between -1 and 1, got {getattr(self, name)}")


@dataclass
class PreprocessConfig:
    # template: scans as scanners write them (skull on, head anywhere, PET not co-registered) are
    # registered to the MNI152 template at the site (T1 affine, PET rigid to its T1, brain extracted,
    # checked); none: scans already in template space, resampled in world coordinates as they are
    spatial: Literal["template", "none"] = "template"
    shape: int = 64                                   # cubic model input, shape^3 voxels
    voxel_size: float | None = 3.0                    # mm; None keeps the reference's own grid (template: 2 mm)
    reference: Literal["mri", "pet"] = "mri"          # spatial none: whose grid the others are resampled onto
    # FDG as SUVR (the field's reading); percentile clipping scored at chance (docs/science.md)
    normalize: dict[str, str] = field(default_factory=lambda: {"mri": "zscore", "pet": "suvr"})
    percentiles: tuple[float, float] = (0.5, 99.5)    # for "percentile": clip and scale to [0, 1]
    foreground: float = 0.1                           # "zscore", "suvr": brain mask = voxels > foreground * p99
    min_overlap: float = 0.5                          # spatial none: warn when MRI/PET boxes overlap less than this
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)

    def __post_init__(self):
        if self.spatial not in ("template", "none"):
            raise ValueError(f"spatial: choose template (scans as scanners write them) or none (already in "
                             f"template space), got {self.spatial!r}")
        for modality, method in self.normalize.items():
            if modality not in MODALITIES:
                raise ValueError(f"normalize: unknown modality {modality!r}")
            if method not in NORMALIZER_NAMES:
                raise ValueError(f"normalize.{modality}: unknown method {method!r}; "
                                 f"choose one of {', '.join(NORMALIZER_NAMES)}")
        if self.shape < 8:
            raise ValueError(f"shape must be at least 8 voxels, got {self.shape}")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")

    def fingerprint(self) -> str:
        """Changes whenever any setting changes: part of every cache key."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class AugmentConfig:
    flip: float = 0.5             # probability of a left-right flip
    rotate_deg: float = 8.0       # max rotation about each axis
    scale: float = 0.08           # max relative zoom
    translate: float = 0.04       # max shift, as a fraction of the field of view
    intensity: float = 0.1        # max relative scale / shift of intensities
    noise: float = 0.02           # Gaussian noise std, relative to the volume's std


@dataclass
class LinearConfig:
    grid: int = 6             # regional means on a grid^3 of blocks per modality (6: 8^3-voxel blocks at 48^3)
    folds: int = 5            # cross-validation folds that choose the L2 strength
    strengths: int = 10       # candidate strengths, log-spaced 1e-4..1e4 (scikit-learn's Cs)

    def __post_init__(self):
        if self.grid < 1:
            raise ValueError(f"linear.grid must be at least 1, got {self.grid}")
        if self.folds < 2:
            raise ValueError(f"linear.folds must be at least 2, got {self.folds}")


@dataclass
class PrivacyConfig:
    enabled: bool = False
    noise_multiplier: float | None = None   # sigma; or leave None and give target_epsilon
    target_epsilon: float | None = None     # sigma chosen so the planned run spends this at each site
    max_grad_norm: float = 1.0              # per-sample clipping bound C
    delta: float | None = None              # default 1 / (10 n), n the site's training subjects
    epsilon_budget: float | None = None     # stop training at a site past this (default: target_epsilon)

    def __post_init__(self):
        if self.enabled and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("privacy: give exactly one of noise_multiplier and target_epsilon")
        for name in ("noise_multiplier", "target_epsilon", "delta", "epsilon_budget"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"privacy.{name} must be positive, got {value}")
        if self.max_grad_norm <= 0:
            raise ValueError("privacy.max_grad_norm must be positive")

    def budget(self) -> float | None:
        return self.epsilon_budget if self.epsilon_budget is not None else self.target_epsilon


# participants.tsv / sessions.tsv values -> class, compared case-insensitively; BIDS writes a
# missing value as "n/a" (unlabelled without any entry here)
DEFAULT_BIDS_LABEL_MAP = {
    "cn": "CN", "hc": "CN", "nc": "CN", "control": "CN", "controls": "CN", "healthy control": "CN",
    "normal": "CN", "mci": "MCI", "emci": "MCI", "lmci": "MCI",
    "ad": "AD", "dementia": "AD", "alzheimer's": "AD", "alzheimers": "AD", "alzheimer's disease": "AD",
}


@dataclass
class BidsConfig:
    """How a site folder that is a BIDS dataset gives labels and splits (cmvim.data.bids,
    docs/bids.md). Sites whose folder holds a manifest.csv ignore it.

    `label_map` entries are added to the defaults above (an entry overrides the default of the
    same value; a value mapped to null makes it unlabelled); a value the map lacks is that
    subject's problem, named with the file and line. `sessions_labels`: a
    sub-X/sub-X_sessions.tsv with `label_column` gives a session's label, winning over
    participants.tsv for that session (the diagnosis can change between visits).
    `accept_tracers`: the PET tracers (the sidecar's TracerName) read as the model's PET (any
    spelling of FDG is FDG); `pet_window_min`: the minutes after injection whose frames make a
    dynamic PET static (duration-weighted; FDG: 30-60, docs/bids.md)."""
    label_column: str = "diagnosis"
    label_map: dict[str, str | None] = field(default_factory=dict)
    split_column: str = "split"
    sessions_labels: bool = True
    accept_tracers: list[str] = field(default_factory=lambda: ["FDG"])
    pet_window_min: list[float] = field(default_factory=lambda: [30.0, 60.0])

    def __post_init__(self):
        merged = dict(DEFAULT_BIDS_LABEL_MAP)
        for value, label in self.label_map.items():
            label = (str(label).strip().upper() or None) if label is not None else None
            if label is not None and label not in LABELS:
                raise ValueError(f"bids.label_map: {value!r} maps to {label!r}; map values to "
                                 f"{', '.join(LABELS)} or null (unlabelled)")
            merged[str(value).strip().lower()] = label
        self.label_map = merged
        if not self.label_column.strip() or not self.split_column.strip():
            raise ValueError("bids.label_column and bids.split_column must name a column")
        if not self.accept_tracers:
            raise ValueError("bids.accept_tracers: name at least one tracer (FDG is the model's)")
        window = [float(v) for v in self.pet_window_min] if len(self.pet_window_min) == 2 else []
        if not (window and all(math.isfinite(v) for v in window) and 0 <= window[0] < window[1]):
            raise ValueError(f"bids.pet_window_min {self.pet_window_min!r}: give [start, end] minutes after "
                             "injection, 0 <= start < end")
        self.pet_window_min = window

    def label_of(self, value: str) -> str | None:
        """The class a table value means (None: unlabelled); KeyError when the map lacks it."""
        text = value.strip()
        if text.lower() in ("", "n/a"):
            return None
        return self.label_map[text.lower()]


@dataclass
class CohortSpec:
    """Where the sites' data comes from: an existing folder of site folders, or a synthetic cohort."""
    path: str | None = None               # a folder of site folders (manifest.csv or BIDS); None = synthetic
    sites: int = 3
    subjects: int = 40
    shape: int = 64
    seed: int = 0
    effect_scale: float = 1.0
    subtypes: bool = False                # synthetic: AD/MCI subjects get an AD subtype (docs/cohort.md)
    visits: int = 1                       # synthetic: visits per subject, a year apart, the disease progressing
    # synthetic: template (MNI space, brain only) or scanner (skull on, heads posed, PET apart from its
    # T1: what a hospital's archive holds; cmvim.simulations.scanner)
    space: Literal["template", "scanner"] = "template"
    site_names: list[str] | None = None   # use only these sites (default: every site folder under path)

    def site_folders(self) -> dict[str, Path]:
        """The run's sites, name -> folder: `site_names` under `path`, else every folder there
        holding a manifest.csv or a BIDS dataset_description.json (cmvim.data.bids; sorted: a
        simulated node's partition id indexes this order)."""
        if not self.path:
            raise ValueError("cohort.path is not set: no site folders to find")
        root = Path(self.path)
        names = self.site_names or sorted(p.name for p in root.iterdir()
                                          if (p / "manifest.csv").exists() or (p / "dataset_description.json").exists())
        return {name: root / name for name in names}


@dataclass
class PhaseConfig:
    rounds: int = 3
    local_epochs: int = 1
    max_steps: int | None = None          # cap on local steps per round (None: whole epochs)
    lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 8


@dataclass
class FinetuneConfig(PhaseConfig):
    """Fine-tuning as LP-FT (linear probing, then fine-tuning: Kumar et al., ICLR 2022).

    The first `probe_rounds` rounds train the head alone on the frozen encoder's features
    (`probe_epochs` passes over features computed once, at `probe_lr`), so the head fits the
    pretrained features before any gradient reaches them; the remaining rounds fine-tune
    everything at `lr`, each Vim block's lr scaled by `layer_decay` per block above it. Measured
    (docs/science.md): fine-tuning a pretrained encoder under a random head undid what pretraining
    had learned. Under DP-SGD a probe round trains the head alone for `local_epochs`, on the
    privacy plan of every other round.

    `select`: which round's model is final: "last", or "best_val" (early stopping on the
    validation split: the round with the best mean per-site validation AUC, the latest of equals;
    needs evaluation.every_round).

    `probe_inputs`: what the probe's features are computed from: each training subject's real
    scans ("real"), or the inputs fine-tuning then trains on ("finetuning": PROBE_DRAWS draws a
    subject with the run's modality_dropout, so the head has seen PET missing as often as
    fine-tuning will show it; docs/science.md, "the switch").
    """
    probe_rounds: int = 0
    probe_epochs: int = 100
    probe_lr: float = 1e-3
    probe_inputs: Literal["real", "finetuning"] = "real"
    layer_decay: float = 1.0
    select: Literal["last", "best_val"] = "last"

    def __post_init__(self):
        if not 0 <= self.probe_rounds <= self.rounds:
            raise ValueError(f"finetune.probe_rounds must lie between 0 and finetune.rounds ({self.rounds}), "
                             f"got {self.probe_rounds}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"finetune.layer_decay must lie in (0, 1], got {self.layer_decay}")
        if self.probe_epochs < 1 or not self.probe_lr > 0:
            raise ValueError("finetune.probe_epochs must be at least 1 and finetune.probe_lr positive")

    def probing(self, round_: int) -> bool:
        """Whether (absolute, 1-based) fine-tuning round `round_` trains the head alone."""
        return round_ <= self.probe_rounds


@dataclass
class StrategyConfig:
    """How the server combines the sites' updates, and how far it trusts them. The robust
    aggregators are Flower's: fedmedian (coordinate-wise median), fedtrimmedavg (drops the
    `trim_beta` share of the highest and lowest values per coordinate), krum / multikrum (the
    update(s) closest to their neighbours; n >= 2 * num_malicious + 3) and bulyan (n >=
    4 * num_malicious + 3). Whatever the aggregator, the server's guard first drops replies it
    cannot use (cmvim.server.strategy.Guarded) and bounds what one site can weigh."""
    name: Literal["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum",
                  "bulyan"] = "fedavg"
    proximal_mu: float = 0.01             # FedProx
    eta: float = 1e-2                     # FedAdam server learning rate
    eta_l: float = 1e-2
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    # quorum and deadlines: a phase waits at most wait_for_sites seconds for min_nodes sites to be
    # connected (then stops, naming how many are missing); a round waits at most round_timeout
    # seconds for replies, then aggregates what arrived if at least min_nodes valid updates did
    # (else the global model stays as it was)
    min_nodes: int = 2
    round_timeout: float = 3600.0
    wait_for_sites: float = 600.0
    trim_beta: float = 0.2                # fedtrimmedavg: the share cut at each end
    num_malicious: int = 1                # krum, multikrum, bulyan: the sites assumed hostile
    multikrum_select: int = 2             # multikrum: how many updates it averages
    # what one site can weigh: "examples" (its num-examples, capped at what it reported in its
    # first round of the phase and at max_examples) or "equal" (every site alike)
    weighting: Literal["examples", "equal"] = "examples"
    max_examples: int = 100_000
    # an update whose distance from the global model is above norm_bound x the round's (lower)
    # median distance is rejected ("reject") or scaled back to the bound ("clip"); null: no bound
    norm_bound: float | None = 5.0
    norm_action: Literal["reject", "clip"] = "reject"

    def __post_init__(self):
        if not 0.0 <= self.trim_beta < 0.5:
            raise ValueError(f"strategy.trim_beta must lie in [0, 0.5), got {self.trim_beta}")
        if self.norm_bound is not None and self.norm_bound <= 1.0:
            raise ValueError(f"strategy.norm_bound must be above 1 (a multiple of the median update), got {self.norm_bound}")
        if self.max_examples < 1:
            raise ValueError(f"strategy.max_examples must be positive, got {self.max_examples}")
        need = {"krum": 2 * self.num_malicious + 3, "multikrum": 2 * self.num_malicious + 3,
                "bulyan": 4 * self.num_malicious + 3}.get(self.name)
        if need is not None and self.min_nodes < need:
            raise ValueError(f"strategy {self.name} with num_malicious {self.num_malicious} needs at least {need} sites "
                             f"a round (min_nodes is {self.min_nodes}); use fedmedian or fedtrimmedavg with fewer")


@dataclass
class CentralDPConfig:
    """User-level (site-level) DP at the server: Flower's fixed-clipping wrappers and accountant.

    Each round every site's whole update (its new weights minus the global ones) is clipped to
    `clipping_norm` (at the server, or at the site before it leaves), the updates are averaged
    with equal weights, and Gaussian noise of std noise_multiplier * clipping_norm / n_sites is
    added to the average. Flower's RDP accountant composes one release per round, without
    amplification (every site trains every round): epsilon is for a whole site's data.
    """
    clipping: Literal["off", "server", "client"] = "off"
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    delta: float = 1e-5
    max_epsilon: float | None = None      # no further training round once the next would pass it

    @property
    def enabled(self) -> bool:
        return self.clipping != "off"

    def __post_init__(self):
        if self.clipping not in ("off", "server", "client"):
            raise ValueError(f"central_dp.clipping must be off, server or client, got {self.clipping!r}")
        for name in ("noise_multiplier", "clipping_norm", "max_epsilon"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"central_dp.{name} must be positive, got {value}")
        if not 0 < self.delta < 1:
            raise ValueError(f"central_dp.delta must lie strictly between 0 and 1, got {self.delta}")


@dataclass
class SecureAggregationConfig:
    """Flower's SecAgg+ for training rounds: the server learns only the (weighted) sum of the
    sites' models, never one site's. Each site scales its weights by num-examples / max_weight,
    clips them to +-clipping_range, quantizes them to quantization_range levels and masks them.
    """
    enabled: bool = False
    num_shares: float = 1.0               # > 2: a count of key shares; <= 1: a fraction of the round's sites
    reconstruction_threshold: float = 0.67   # > 1: a count; <= 1: a fraction of num_shares
    max_weight: float = 1000.0            # >= any site's num-examples (a larger one overflows, a much larger one loses precision)
    clipping_range: float = 8.0           # every weight x num-examples / max_weight must lie within +-this
    quantization_range: int = 4194304     # 2**22 levels over [-clipping_range, clipping_range]
    timeout: float | None = None          # seconds to wait in each protocol stage (None: the round timeout)

    def __post_init__(self):
        if self.num_shares <= 0 or 1 < self.num_shares <= 2:
            raise ValueError("secure_aggregation.num_shares must be a fraction in (0, 1] or a count above 2")
        if self.reconstruction_threshold <= 0:
            raise ValueError("secure_aggregation.reconstruction_threshold must be positive")
        for name in ("max_weight", "clipping_range"):
            if not getattr(self, name) > 0:
                raise ValueError(f"secure_aggregation.{name} must be positive")
        if not 1 < self.quantization_range < 2 ** 32:
            raise ValueError("secure_aggregation.quantization_range must lie between 2 and 2**32")

    def flower_args(self) -> dict:
        """SecAggPlusWorkflow's arguments: counts as int, fractions as float (Flower reads the type)."""
        def count_or_fraction(value: float):
            return int(value) if value > 1 else float(value)
        return {"num_shares": count_or_fraction(self.num_shares),
                "reconstruction_threshold": count_or_fraction(self.reconstruction_threshold),
                "max_weight": self.max_weight, "clipping_range": self.clipping_range,
                "quantization_range": self.quantization_range}


@dataclass
class CheckpointConfig:
    keep_last: int | None = 2             # checkpoints kept per phase (None: every round's)

    def __post_init__(self):
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"checkpoints.keep_last must be at least 1 (or null: keep all), got {self.keep_last}")


@dataclass
class EvaluationConfig:
    bootstrap: int = 1000                 # resamples for the AUC's 95 % CI
    histogram_bins: int = 50              # score histograms shared for the pooled AUC
    every_round: bool = True              # validation metrics after each fine-tuning round
    # round r's validation travels in round r+1's training message (the site scores the model it
    # receives before training it): one exchange a round instead of two, the same numbers; the
    # last round's validation is an exchange of its own. Not with secure aggregation.
    carry_validation: bool = True
    # the decision threshold stored with the model, chosen on the sites' validation splits
    # (cmvim.calibration): youden (Youden's J), sensitivity (the highest threshold reaching
    # target_sensitivity) or fixed (0.5); calibration platt rescales the scores so 0.5 is even odds
    threshold_rule: Literal["youden", "sensitivity", "fixed"] = "youden"
    target_sensitivity: float = 0.85
    calibration: Literal["platt", "none"] = "platt"

    def __post_init__(self):
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise ValueError(f"evaluation.target_sensitivity must be in (0, 1], got {self.target_sensitivity}")


@dataclass
class ExampleSubject:
    """One subject's scans on the coordinator's own disk (synthetic, or a subject who consented):
    the reconstruction figure shows them. The scans stay there; the paths travel with the run
    config, which every site receives. Give absolute paths: the ServerApp that reads them runs
    where the SuperLink started it, not necessarily where the config file lies."""
    mri: str
    pet: str | None = None


@dataclass
class FiguresConfig:
    """The run's figures (cmvim.reconstruction). `example_subject`: whose scans the pretrained model
    reconstructs in reconstruction.png; null: the first subject-visit of the first site folder
    under cohort.path when the run has one (cmvim-sim's synthetic cohort), else no such figure."""
    example_subject: ExampleSubject | None = None


@dataclass
class RunConfig:
    seed: int = 0
    cohort: CohortSpec = field(default_factory=CohortSpec)
    model: ModelConfig = field(default_factory=lambda: model_config("tiny"))   # a preset plus overrides in YAML
    preprocess: PreprocessConfig = field(default_factory=lambda: PreprocessConfig(shape=model_config("tiny").img_size))
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)     # pretraining augmentations
    # where fine-tuning starts: "pretrained" (the encoder this run pretrained: the method), "fresh"
    # (a new encoder: the control), or a file of CMViM weights pretrained elsewhere, e.g. on public
    # data (a state dict or a cmvim checkpoint .pt, read as plain tensors), for a run whose
    # pretrain.rounds is 0
    finetune_init: str = "pretrained"
    modality_dropout: float = 0.3          # fine-tuning: hide a present PET this often (see ModalityDropout)
    # fine-tuning rounds' spatial augmentation (the probe rounds' features are computed once, unaugmented):
    # null, none; else small random moves of MRI and PET together, against residual misregistration
    # (measured: docs/preprocessing.md)
    finetune_augment: AugmentConfig | None = None
    pretrain: PhaseConfig = field(default_factory=lambda: PhaseConfig(rounds=3))
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(rounds=3, lr=5e-4))
    # the 3D CNN baseline's own schedule (baselines: cnn3d, cnn3d_centralized; cmvim/cnn3d.py): its
    # rounds, local_epochs, lr, batch_size, weight_decay, max_steps, every round training the whole
    # network, the round chosen by finetune.select as the run's. The default was chosen for it on the
    # tuning cohort's validation splits (30 rounds x 3 epochs at lr 3e-3, batch 8: benchmarks/
    # cnn_schedule.py, docs/science.md). null: the run's fine-tuning schedule, which a network from
    # scratch does not learn on (docs/science.md)
    cnn3d: PhaseConfig | None = field(default_factory=lambda: PhaseConfig(rounds=30, local_epochs=3, lr=3e-3,
                                                                         weight_decay=0.05, batch_size=8))
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    split_fractions: tuple[float, float, float] = SPLIT_FRACTIONS   # train/val/test where the manifest is silent
    bids: BidsConfig = field(default_factory=BidsConfig)   # labels and splits of sites whose folder is BIDS
    personalize: Literal["none", "head", "norm", "head+norm"] = "none"
    use_reports: bool = True
    threads_per_site: int = 1
    # where each site computes: auto (its CUDA GPU when it has one, else the CPU), cpu, cuda, cuda:N;
    # a site's own `cmvim-client --device` wins over the run's choice. precision: auto (bf16 autocast
    # on GPUs that support it, fp16 on older ones, fp32 on CPUs), fp32, bf16 or fp16 (cmvim.device)
    device: str = "auto"
    precision: PrecisionName = "auto"
    gpus_per_site: float = 0.0             # cmvim-sim: the share of a GPU each simulated site gets (Flower's num_gpus)
    baselines: list[str] = field(default_factory=list)     # "local", "centralized", "linear", "cnn3d", "cnn3d_centralized"
    linear: LinearConfig = field(default_factory=LinearConfig)   # the linear baseline's features and fit
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)   # sample-level DP-SGD at every site
    central_dp: CentralDPConfig = field(default_factory=CentralDPConfig)   # site-level DP at the server
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)   # SecAgg+
    figures: FiguresConfig = field(default_factory=FiguresConfig)   # what the results folder's figures show

    def __post_init__(self):
        check_split_fractions(self.split_fractions)
        check_device_spec(self.device)
        if not 0.0 <= self.gpus_per_site:
            raise ValueError(f"gpus_per_site must be 0 or more (a share of one GPU, or several), got {self.gpus_per_site}")
        unknown = set(self.baselines) - set(BASELINES)
        if unknown:
            raise ValueError(f"baselines: unknown {sorted(unknown)}; choose from {', '.join(map(repr, BASELINES))}")
        if self.central_dp.enabled:
            if self.strategy.name not in ("fedavg", "fedprox"):
                raise ValueError(f"central_dp needs strategy fedavg or fedprox, not {self.strategy.name}: Flower's "
                                 "accountant requires FedAvg's aggregation of the clipped updates")
            if self.strategy.fraction_train != 1.0:
                raise ValueError("central_dp needs strategy.fraction_train 1.0: the accountant assumes every site "
                                 "trains every round (no amplification by sampling)")
        if self.secure_aggregation.enabled:
            if self.strategy.name != "fedavg":
                raise ValueError(f"secure_aggregation needs strategy fedavg, not {self.strategy.name}: the server "
                                 "sees only the sum of the sites' models")
            if self.central_dp.enabled:
                raise ValueError("secure_aggregation with central_dp is not supported: Flower 1.42's SecAgg+ runs on "
                                 "its legacy strategies, its accountant on the new ones (docs/privacy.md)")
        if self.finetune.select == "best_val" and not self.evaluation.every_round:
            raise ValueError("finetune.select: best_val needs evaluation.every_round: true (the validation AUC of "
                             "every round is what it selects by)")
        if self.model.img_size != self.preprocess.shape:
            raise ValueError(f"preprocess.shape ({self.preprocess.shape}) must equal the model's img_size "
                             f"({self.model.img_size})")

    def phase(self, name: Phase) -> PhaseConfig | FinetuneConfig:
        return {"pretrain": self.pretrain, "finetune": self.finetune}[name]

    def to_json(self) -> str:
        return json.dumps(to_dict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        return run_config(json.loads(text))


def run_config(spec: str | Path | Mapping | None = None, **overrides) -> RunConfig:
    """A RunConfig from a YAML file or a mapping; unknown keys are errors that name them."""
    data = load_yaml(spec) if isinstance(spec, (str, Path)) else dict(spec or {})
    data.update(overrides)
    data["model"] = model_config(data.get("model"))      # a preset name plus overrides -> one parsed ModelConfig
    return from_dict(RunConfig, data, "run")


def overridden(data: Mapping, pairs: Sequence) -> dict:
    """The run config mapping `data` (read from YAML) with overrides applied: a command line's
    `--set KEY=VALUE` strings or typed (KEY, value) pairs (cmvim.config.apply_overrides, the one
    override implementation), before `run_config` parses and checks it; a model section written
    as a preset name (`model: small`) opens up for `model.depth=2`."""
    return apply_overrides(data, pairs, short_forms={"model": model_mapping})
