"""The model a run hands over: `DIR/model/` = model.safetensors + config.json, all that scoring new
subjects needs (`cmvim-client predict`), without checkpoints, pickles or the run's code paths.

    model.safetensors   the fine-tuned classifier's state dict (safetensors: tensors only, no code
                        runs on load, unlike a torch pickle)
    config.json         schema_version, the model config, the preprocessing, the inputs it reads
                        (reports or not), the label map, the decision threshold and score calibration
                        fitted on validation (cmvim.calibration), how site folders are split and read
                        (seed, split fractions, BIDS keys: predict marks which subjects were test
                        subjects), and a fingerprint of the training run (run config + weights)
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from .calibration import Calibration
from .config import ConfigError, to_dict
from .run_config import RunConfig, run_config

SCHEMA_VERSION = 2
# version 1 (before preprocess.spatial existed) scored scans already in template space: read as
# spatial none, so an older model keeps scoring new subjects exactly as it was trained
READABLE_VERSIONS = (1, 2)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# the run config sections a model's scores depend on: what predict rebuilds
SCORING_KEYS = ("model", "preprocess", "use_reports", "seed", "split_fractions", "bids")


class ModelFileError(ConfigError):
    """An exported model folder that cannot be used; the message names the file and what is wrong."""


def label_names(num_classes: int) -> list[str]:
    return ["CN", "MCI", "AD"] if num_classes == 3 else ["CN", "AD"]


def weights_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def export_model(out_dir: Path, cfg: RunConfig, state: Mapping[str, torch.Tensor], calibration: Calibration,
                 run_fingerprint: str, extra: dict | None = None) -> Path:
    """Write `out_dir` (model.safetensors + config.json); the classifier's full state dict in `state`."""
    from safetensors.torch import save_file

    from . import __version__
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt", "cmvim_schema": str(SCHEMA_VERSION)})
    settings = to_dict(cfg)
    config = {
        "schema_version": SCHEMA_VERSION,
        "cmvim_version": __version__,
        "task": "AD vs CN" if cfg.model.num_classes == 2 else "CN / MCI / AD",
        "labels": label_names(cfg.model.num_classes),          # class index -> name; the score is P(last class)
        "positive_label": "AD",
        "decision": calibration.to_dict(),
        "run": {key: settings[key] for key in SCORING_KEYS if key in settings},
        "fingerprint": {"run": run_fingerprint, "weights_sha256": weights_fingerprint(tensors)},
        **(extra or {}),
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    return out_dir


@dataclass
class PortableModel:
    model: torch.nn.Module             # the classifier, eval mode, on the CPU
    cfg: RunConfig                     # the scoring settings (model, preprocessing, inputs, splits)
    calibration: Calibration
    labels: list[str]
    meta: dict                         # config.json as read


def load_model(model_dir: str | Path) -> PortableModel:
    """The exported model, checked: schema version, weights that match the config's model exactly,
    and the weights' fingerprint."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from . import __version__
    from .model import CMViMClassifier
    model_dir = Path(model_dir)
    config_path, weights_path = model_dir / CONFIG_FILE, model_dir / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ModelFileError(f"{path}: not found (a model folder holds {CONFIG_FILE} and {WEIGHTS_FILE}, "
                                 "as a run writes them in its results' model/)")
    try:
        meta = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{config_path}: not readable JSON ({exc})") from None
    version = meta.get("schema_version") if isinstance(meta, dict) else None
    if version not in READABLE_VERSIONS:
        raise ModelFileError(f"{config_path}: schema_version {version!r}; this cmvim ({__version__}) reads "
                             f"versions {', '.join(map(str, READABLE_VERSIONS))}")
    try:
        settings = dict(meta["run"])
        if version == 1:
            settings["preprocess"] = {"spatial": "none", **dict(settings.get("preprocess") or {})}
        cfg = run_config(settings)
        calibration = Calibration.from_dict(dict(meta["decision"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{config_path}: {exc}") from None
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(f"{weights_path}: not a safetensors file ({exc})") from None
    expected = meta.get("fingerprint", {}).get("weights_sha256")
    if expected and weights_fingerprint(state) != expected:
        raise ModelFileError(f"{weights_path}: its weights do not match the fingerprint in {CONFIG_FILE} (a file "
                             "from another run, or damaged)")
    model = CMViMClassifier(cfg.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ModelFileError(f"{weights_path}: the weights do not fit the model in {CONFIG_FILE}: {first}") from None
    model.eval()
    return PortableModel(model, cfg, calibration, list(meta.get("labels", label_names(cfg.model.num_classes))), meta)
