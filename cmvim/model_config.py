"""Model configs: `tiny` (CPU tests), `small` (CPU simulation), `base` (the paper)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping

from .config import ConfigError, from_dict, load_yaml
from .names import LABELS

MODALITIES = ("mri", "pet")


@dataclass
class LossConfig:
    recon: float = 1.0                 # per modality: recon_mri + recon_pet
    intra: float = 0.05                # two maskings, online vs momentum encoder
    inter: float = 0.05                # MRI vs PET of the same subject
    report: float = 0.05               # image vs report, where reports exist
    temperature: float = 0.07
    norm_pix_loss: bool = False        # per-patch normalised reconstruction targets


@dataclass
class ReportConfig:
    enabled: bool = True
    encoder: Literal["bytes-vim"] = "bytes-vim"
    max_bytes: int = 256               # UTF-8 bytes kept per report
    dim: int = 64
    depth: int = 2


@dataclass
class ModelConfig:
    img_size: int = 32                 # cubic input volumes, img_size^3 voxels
    patch_size: int = 8
    modalities: tuple[str, ...] = MODALITIES
    embed_dim: int = 64
    depth: int = 2
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    merge: Literal["mean", "sum"] = "mean"   # how forward and backward scans combine
    scan_backend: Literal["ref", "torch", "cpu", "cuda"] | None = None   # None: automatic (cmvim.ssm)
    drop_path: float = 0.0
    pos_embed: Literal["sincos", "learned"] = "sincos"
    decoder_dim: int = 48
    decoder_depth: int = 1
    mask_ratio: float = 0.75
    proj_dim: int = 64                 # contrastive projection width
    momentum: float = 0.999            # EMA of the momentum encoder
    num_classes: int = 2               # 2: CN vs `positive`; 3: CN / MCI / AD
    # the binary task's positive class against CN: AD (the default task) or MCI (CN vs MCI, the
    # harder, earlier question); subjects of the third label have no class in the task
    positive: Literal["AD", "MCI"] = "AD"
    # what the classifier's linear head reads: "mean" (the paper: the mean of every token's
    # features), "tokens" (every token's features in place, a weight per position: disease shows
    # in regions, and a whole-brain mean dilutes them; docs/science.md) or "factorized" (every
    # token in place through a low-rank head: each token's features projected onto `head_rank`
    # learned directions, then a weight per position and direction, so a few labelled subjects fit
    # L * head_rank spatial weights instead of L * width)
    readout: Literal["mean", "tokens", "factorized"] = "mean"
    head_rank: int = 2
    loss: LossConfig = field(default_factory=LossConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown or not self.modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {self.modalities}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.head_rank < 1:
            raise ValueError(f"head_rank must be at least 1, got {self.head_rank}")
        if self.num_classes not in (2, 3):
            raise ValueError(f"num_classes must be 2 (CN/AD) or 3 (CN/MCI/AD), got {self.num_classes}")
        if self.num_classes == 3 and self.positive != "AD":
            raise ValueError(f"positive: {self.positive} names a binary task; num_classes 3 is CN / MCI / AD")
        self.modalities = tuple(self.modalities)

    def summary(self) -> str:
        """One line for a report: what a reader needs to tell two models apart."""
        return (f"{self.img_size}³ input, patch {self.patch_size}, width {self.embed_dim}, depth {self.depth}, "
                f"readout {self.readout}" + (f" (rank {self.head_rank})" if self.readout == "factorized" else ""))

    @property
    def classes(self) -> tuple[str, ...]:
        """The task's labels in class order; the score a run reports is P(last class)."""
        return LABELS if self.num_classes == 3 else ("CN", self.positive)

    @property
    def task(self) -> str:
        """The task as results and the model card name it: "AD vs CN", "MCI vs CN", "CN / MCI / AD"."""
        return " / ".join(LABELS) if self.num_classes == 3 else f"{self.positive} vs CN"

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 3

    @property
    def patch_voxels(self) -> int:
        return self.patch_size ** 3


PRESETS: dict[str, dict] = {
    "tiny": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, decoder_dim=48, decoder_depth=1,
                 proj_dim=64, report=dict(dim=48, depth=1, max_bytes=192)),
    "small": dict(img_size=48, patch_size=12, embed_dim=96, depth=4, decoder_dim=64, decoder_depth=1,
                  proj_dim=96, report=dict(dim=64, depth=2, max_bytes=256)),
    "base": dict(img_size=128, patch_size=16, embed_dim=768, depth=12, decoder_dim=384, decoder_depth=4,
                 proj_dim=256, drop_path=0.1, report=dict(dim=256, depth=4, max_bytes=512)),
}


def model_mapping(spec: str | Path | Mapping | None) -> dict:
    """The model section as a mapping: a preset name -> {"preset": name}, a YAML file -> its
    contents, nothing -> the default preset (tiny)."""
    if spec is None:
        return {"preset": "tiny"}
    if isinstance(spec, Mapping):
        return dict(spec)
    if isinstance(spec, Path) or str(spec).endswith((".yaml", ".yml")):
        return load_yaml(spec)
    return {"preset": str(spec)}


def model_config(spec: str | Path | Mapping | ModelConfig | None = None, **overrides) -> ModelConfig:
    """A ModelConfig from a preset name, a YAML file, or a mapping.

    A mapping (or YAML) may name a preset under `preset:` and override any key
    on top of it, e.g. ``{"preset": "tiny", "depth": 4}``.
    """
    if isinstance(spec, ModelConfig):
        return dataclasses.replace(spec, **overrides) if overrides else spec
    data = model_mapping(spec)
    data.update(overrides)
    preset = data.pop("preset", None)
    merged: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[preset].items()}
    for key, value in data.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return from_dict(ModelConfig, merged, "model")
