"""The model a run hands over: `DIR/model/`, all that scoring new subjects needs (`cmvim-client
predict`, or plain PyTorch), without checkpoints, pickles or the run's code paths. Only a model
that fine-tuning trained is written (the runner decides; `load_model` refuses one that does not
say so).

    model.safetensors   the fine-tuned classifier's state dict (safetensors: tensors only, no code
                        runs on load, unlike a torch pickle)
    model.pt2           the same classifier as a `torch.export` program (the portable torch scan,
                        any batch size): `torch.export.load(path).module()(batch)` without cmvim
    config.json         schema_version, the model config, the preprocessing, the input
                        specification, the label map, the decision threshold and score calibration
                        fitted on validation (cmvim.calibration), how site folders are split and read
                        (seed, split fractions, BIDS keys: predict marks which subjects were test
                        subjects), how the model was trained (rounds that aggregated updates, sites),
                        what it scored (per-site and pooled test metrics with CIs), the SHA-256 of
                        each file and a fingerprint of the run (run config) and of the tensors
    README.md           the model card: intended use, training data, metrics, decision, inputs, limits
    SHA256SUMS          `sha256sum -c SHA256SUMS` checks a copied folder
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

SCHEMA_VERSION = 3
# versions 1-2 did not record whether fine-tuning trained the model (an untrained one was
# exported as readily as a trained one): refused; `--resume` on the finished run exports it again
READABLE_VERSIONS = (3,)
WEIGHTS_FILE = "model.safetensors"
PROGRAM_FILE = "model.pt2"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
SUMS_FILE = "SHA256SUMS"
PROGRAM_TOLERANCE = 1e-5           # max |logit difference| between model.pt2 and cmvim's own model
INTENDED_USE = ("research: {task} classification from T1 MRI (and FDG PET where present) in federated studies; "
                "not for clinical diagnosis or any decision about a patient")
# the run config sections a model's scores depend on: what predict rebuilds
SCORING_KEYS = ("model", "preprocess", "use_reports", "seed", "split_fractions", "bids")


class ModelFileError(ConfigError):
    """An exported model folder that cannot be used; the message names the file and what is wrong."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_spec(cfg: RunConfig) -> dict:
    """What the classifier takes and gives, for a person or a program that calls it without cmvim."""
    size, positive = cfg.model.img_size, cfg.model.classes[-1]
    batch = {}
    for modality in cfg.model.modalities:
        batch[modality] = f"float32 (B, 1, {size}, {size}, {size}): the preprocessed {modality.upper()} volume"
        batch[f"{modality}_present"] = f"bool (B,): False where the visit has no {modality.upper()} (its volume is ignored)"
    return {"batch": batch,
            "output": f"float32 (B, {cfg.model.num_classes}) logits; P({positive}) = softmax(logits)[:, -1]",
            "score": f"calibrated P({positive}) = sigmoid(a * logit(P({positive})) + b) with decision.a, decision.b "
                     f"when decision.calibrated; {positive} at score >= decision.threshold",
            "preprocessing": f"cmvim.data with run.preprocess (spatial {cfg.preprocess.spatial!r}, {size}^3 voxels "
                             f"of {cfg.preprocess.voxel_size} mm, normalisation {cfg.preprocess.normalize}): "
                             "cmvim-client predict applies it"}


def _example_batch(cfg: RunConfig, n: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    size, batch = cfg.model.img_size, {}
    for modality in cfg.model.modalities:
        batch[modality] = torch.randn(n, 1, size, size, size, generator=generator)
        batch[f"{modality}_present"] = torch.ones(n, dtype=torch.bool)
    if "pet_present" in batch:
        batch["pet_present"][-1] = False                   # a visit without PET is part of the contract
    return batch


def export_program(cfg: RunConfig, tensors: Mapping[str, torch.Tensor], path: Path) -> dict:
    """`path` (model.pt2): the classifier as a torch.export program on the torch scan backend
    (the default CPU kernel is numba, which torch.export cannot trace), any batch size, checked
    against cmvim's own model within PROGRAM_TOLERANCE. Returns what config.json records."""
    import time

    from .model import CMViMClassifier
    start = time.perf_counter()
    reference, portable = CMViMClassifier(cfg.model), CMViMClassifier(cfg.model, scan_backend="torch")
    for model in (reference, portable):
        model.load_state_dict(tensors, strict=True)
        model.eval()
    example = _example_batch(cfg)
    batch_dim = torch.export.Dim("batch", min=1, max=4096)
    shapes = ({name: {0: batch_dim} for name in example},)
    with torch.no_grad():
        program = torch.export.export(portable, (example,), dynamic_shapes=shapes)
        torch.export.save(program, str(path))
        check = _example_batch(cfg, 3)
        difference = float((torch.export.load(str(path)).module()(check) - reference(check)).abs().max())
    if not difference <= PROGRAM_TOLERANCE:
        path.unlink()
        raise ValueError(f"the exported program's logits differ from cmvim's by {difference:.2e} "
                         f"(> {PROGRAM_TOLERANCE:g})")
    return {"file": PROGRAM_FILE, "format": f"torch.export (torch {torch.__version__.split('+')[0]})",
            "max_abs_logit_difference": difference, "seconds": round(time.perf_counter() - start, 1)}


def weights_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def export_model(out_dir: Path, cfg: RunConfig, state: Mapping[str, torch.Tensor], calibration: Calibration,
                 run_fingerprint: str, training: dict | None = None, evaluation: dict | None = None,
                 program: bool = True) -> Path:
    """Write `out_dir` (see the module doc); the classifier's full state dict in `state`. `training`:
    how fine-tuning trained it (the runner's record; a model without one is not loadable),
    `evaluation`: what it scored. `program`: also model.pt2 (a failure is recorded, not raised)."""
    from safetensors.torch import save_file

    from . import __version__
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (PROGRAM_FILE, CARD_FILE, SUMS_FILE):
        (out_dir / stale).unlink(missing_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt", "cmvim_schema": str(SCHEMA_VERSION)})
    exported = None
    if program:
        try:
            exported = export_program(cfg, tensors, out_dir / PROGRAM_FILE)
        except Exception as exc:  # noqa: BLE001 - the safetensors model stands; the record says why there is no program
            exported = {"file": None, "error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"}
    files = [WEIGHTS_FILE] + ([PROGRAM_FILE] if exported and exported.get("file") else [])
    digests = {name: file_sha256(out_dir / name) for name in files}       # each file read once
    settings = to_dict(cfg)
    config = {
        "schema_version": SCHEMA_VERSION,
        "cmvim_version": __version__,
        "task": cfg.model.task,
        "intended_use": INTENDED_USE.format(task=cfg.model.task),
        "labels": list(cfg.model.classes),          # class index -> name; the score is P(last class)
        "positive_label": cfg.model.classes[-1],
        "inputs": input_spec(cfg),
        "decision": calibration.to_dict(),
        "run": {key: settings[key] for key in SCORING_KEYS if key in settings},
        "training": training,
        "evaluation": evaluation,
        "program": exported,
        "files": digests,
        "fingerprint": {"run": run_fingerprint, "tensors_sha256": weights_fingerprint(tensors)},
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    from .model_card import model_card
    (out_dir / CARD_FILE).write_text(model_card(config, cfg))
    listed = {**digests, **{name: file_sha256(out_dir / name) for name in (CONFIG_FILE, CARD_FILE)}}
    sums = "".join(f"{digest}  {name}\n" for name, digest in listed.items())
    (out_dir / SUMS_FILE).write_text(sums)
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
    if version in (1, 2):
        raise ModelFileError(f"{config_path}: schema_version {version}, written before cmvim recorded whether a model "
                             "was trained at all; `cmvim-server --resume` (or `cmvim-sim --resume`) on the finished run "
                             "exports it again")
    if version not in READABLE_VERSIONS:
        raise ModelFileError(f"{config_path}: schema_version {version!r}; this cmvim ({__version__}) reads "
                             f"versions {', '.join(map(str, READABLE_VERSIONS))}")
    training = meta.get("training") or {}
    if not isinstance(training, dict) or not training.get("finetune_rounds_aggregated"):
        raise ModelFileError(f"{config_path}: the model does not say fine-tuning trained it (training."
                             "finetune_rounds_aggregated is missing or 0): an untrained classifier scores nothing "
                             "meaningful, so it is not used")
    recorded = (meta.get("files") or {}).get(WEIGHTS_FILE)
    if recorded and file_sha256(weights_path) != recorded:
        raise ModelFileError(f"{weights_path}: its SHA-256 is not the one in {CONFIG_FILE} (a file from another run, "
                             "or damaged)")
    try:
        settings = dict(meta["run"])
        cfg = run_config(settings)
        calibration = Calibration.from_dict(dict(meta["decision"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{config_path}: {exc}") from None
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(f"{weights_path}: not a safetensors file ({exc})") from None
    expected = meta.get("fingerprint", {}).get("tensors_sha256")
    if expected and not recorded and weights_fingerprint(state) != expected:      # the file's digest covers it
        raise ModelFileError(f"{weights_path}: its weights do not match the fingerprint in {CONFIG_FILE} (a file "
                             "from another run, or damaged)")
    model = CMViMClassifier(cfg.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ModelFileError(f"{weights_path}: the weights do not fit the model in {CONFIG_FILE}: {first}") from None
    model.eval()
    return PortableModel(model, cfg, calibration, list(meta.get("labels", cfg.model.classes)), meta)
