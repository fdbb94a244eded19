"""The reconstruction figure, for a person: what the pretrained model makes of one subject's
masked scans (reconstruction.png). It builds the model and reads scans, so it stands above the
model and the data pipeline, apart from the round-history curves (cmvim.figures) that a
coordinator draws without either.

    reconstruction.png    per modality, three middle slices of the input, the masked input and the
                          reconstruction (visible patches from the input, masked ones from the decoder)

Matplotlib (the [server] and [sim] extras) draws; without it a function says so in one line and
draws nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .results import pyplot
from .run_config import RunConfig

RECONSTRUCTION_FIGURE = "reconstruction.png"
VIEWS = ("axial", "coronal", "sagittal")


@dataclass
class Reconstruction:
    """What reconstruction_figure drew, in numbers, per modality present."""
    path: Path | None
    masked_fraction: dict[str, float] = field(default_factory=dict)    # share of patches masked
    masked_mse: dict[str, float] = field(default_factory=dict)         # on the masked voxels
    baseline_mse: dict[str, float] = field(default_factory=dict)       # masked voxels := mean of visible ones


def example_subject(cfg: RunConfig, say: Callable[[str], None] = print) -> tuple[Path, Path | None, str] | None:
    """The scans the reconstruction figure shows: (mri, pet or None, where from), or None, saying
    why. figures.example_subject when set; else the first subject-visit of the first site folder
    under cohort.path (cmvim-sim's synthetic cohort at the coordinator)."""
    chosen = cfg.figures.example_subject
    if chosen is not None:
        return Path(chosen.mri).expanduser(), Path(chosen.pet).expanduser() if chosen.pet else None, \
            "figures.example_subject"
    if not cfg.cohort.path:
        say("reconstruction figure: no example subject; set figures.example_subject: {mri: PATH, pet: PATH} "
            "(a synthetic or consenting subject on the coordinator's disk) to get reconstruction.png")
        return None
    from .data import read_site_folder
    try:
        folders = cfg.cohort.site_folders()
        name, folder = next(iter(folders.items()))
        manifest = read_site_folder(folder, cfg.bids)
        entry = manifest.entries[0]
    except StopIteration:
        say(f"reconstruction figure skipped: no site folder (manifest.csv or BIDS) under cohort.path {cfg.cohort.path}")
        return None
    except IndexError:
        say(f"reconstruction figure skipped: site {name}'s folder has no usable subject-visit")
        return None
    except Exception as exc:  # noqa: BLE001 - an unreadable site folder: no figure, said
        say(f"reconstruction figure skipped: the first site folder under cohort.path could not be read "
            f"({type(exc).__name__}); set figures.example_subject to choose the scans")
        return None
    return entry.mri, entry.pet, f"site {name}'s first subject-visit"


def _middle_slices(volume: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal middle slices of a RAS+ volume, oriented to be shown with
    origin="lower": left-right across, anterior (axial) or superior (coronal, sagittal) up."""
    x, y, z = (s // 2 for s in volume.shape)
    return [volume[:, :, z].T, volume[:, y, :].T, volume[x, :, :].T]


def reconstruction_figure(cfg: RunConfig, pretrained_state: dict, mri_path: str | Path,
                          pet_path: str | Path | None, out_path: str | Path, seed: int = 0,
                          say: Callable[[str], None] = print) -> Reconstruction:
    """One masked forward pass of the pretraining model (cmvim.weights.build_model(cfg,
    "pretrain") with `pretrained_state` loaded) on one subject's scans, read and preprocessed as
    the sites do (the run's preprocess pipeline), drawn to `out_path`: per modality, the middle
    slices of the input, of the input with the masked patches blanked (grey), and of the
    reconstruction (visible patches from the input, masked ones from the decoder). The masking
    is the model's own (mask_ratio), drawn from `seed`. Returns the numbers drawn; `path` is None
    where matplotlib is missing."""
    import torch

    from .data import Volume, build_pipeline, load_volume
    from .model.patch import patchify, unpatchify
    from .weights import build_model

    model_cfg = cfg.model
    files = {"mri": Path(mri_path)}
    if pet_path is not None and "pet" in model_cfg.modalities:
        files["pet"] = Path(pet_path)
    sample = {"files": files, **{m: Volume(*load_volume(path, m)) for m, path in files.items()}}
    sample = build_pipeline(cfg.preprocess)(sample)
    shape = (1, 1) + (cfg.preprocess.shape,) * 3
    batch = {}
    for m in model_cfg.modalities:
        present = sample.get(m) is not None
        data = torch.from_numpy(np.ascontiguousarray(sample[m].data, dtype=np.float32)).reshape(shape) if present \
            else torch.zeros(shape)
        batch[m], batch[f"{m}_present"] = data, torch.tensor([present])

    model = build_model(cfg, "pretrain")
    model.load_state_dict(pretrained_state, strict=True)
    model.eval()
    with torch.no_grad():
        out = model(batch, torch.Generator().manual_seed(seed))

    p, grid = model_cfg.patch_size, (model_cfg.grid,) * 3
    result = Reconstruction(path=None)
    panels: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for m in model_cfg.modalities:
        if not bool(batch[f"{m}_present"]):
            continue
        target = patchify(batch[m], p)                                     # (1, n, p^3)
        mask = out.masks[m][..., None].expand_as(target)                   # (1, n, p^3), 1 = masked
        pred = out.predictions[m].float()
        if model_cfg.loss.norm_pix_loss:
            # the decoder predicts each patch normalised; shown in the input's units with the true
            # patch's mean and spread (as MAE's own visualisation does)
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        masked = mask.bool()
        visible_mean = target[~masked].mean()
        result.masked_fraction[m] = float(out.masks[m].mean())
        result.masked_mse[m] = float(((pred - target)[masked] ** 2).mean())
        result.baseline_mse[m] = float(((visible_mean - target)[masked] ** 2).mean())
        blanked = torch.where(masked, torch.full_like(target, float("nan")), target)
        recon = torch.where(masked, pred, target)
        panels[m] = tuple(unpatchify(v, p, grid)[0, 0].numpy() for v in (target, blanked, recon))

    plt = pyplot("the reconstruction figure", say)
    if plt is None:
        return result
    import matplotlib

    cmap = matplotlib.colormaps["gray"].with_extremes(bad="#4a6fa5")      # bad: the masked patches
    n_cols = 3 * len(panels)
    fig, axes = plt.subplots(len(VIEWS), n_cols, figsize=(1.9 * n_cols, 1.9 * len(VIEWS) + 0.9), squeeze=False)
    for col0, (m, volumes) in enumerate(panels.items()):
        lo, hi = np.percentile(volumes[0], [1, 99])                        # one scale for the modality's panels
        titles = (f"{m.upper()} input", f"masked ({result.masked_fraction[m]:.0%} of patches)",
                  f"reconstruction\nMSE {result.masked_mse[m]:.3g} (visible-mean fill {result.baseline_mse[m]:.3g})")
        for k, (volume, title) in enumerate(zip(volumes, titles)):
            for row, image in enumerate(_middle_slices(volume)):
                ax = axes[row, 3 * col0 + k]
                ax.imshow(np.ma.masked_invalid(image), cmap=cmap, vmin=lo, vmax=hi, origin="lower",
                          interpolation="nearest")
                ax.set(xticks=[], yticks=[])
                if row == 0:
                    ax.set_title(title, fontsize=8)
                if col0 == 0 and k == 0:
                    ax.set_ylabel(VIEWS[row], fontsize=8)
    missing = [m for m in model_cfg.modalities if m not in panels]
    note = f"; no {', '.join(m.upper() for m in missing)} for this subject" if missing else ""
    fig.suptitle(f"pretrained CMViM: masked-patch reconstruction of one subject (mask ratio "
                 f"{model_cfg.mask_ratio:g}, MSE on masked voxels){note}", fontsize=9)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    result.path = out_path
    return result


def draw_reconstruction(cfg: RunConfig, pretrained_state: dict, out_dir: Path,
                        say: Callable[[str], None] = print) -> Reconstruction | None:
    """reconstruction.png in `out_dir` from the pretrained weights on the example subject
    (`example_subject`), one line said either way; an earlier run's figure in the folder is
    removed first. Names no subject and no file of a site's (the run's log may travel)."""
    out_path = Path(out_dir) / RECONSTRUCTION_FIGURE
    out_path.unlink(missing_ok=True)
    if cfg.pretrain.rounds == 0:
        say("reconstruction figure: not drawn, this run did not pretrain (pretrain.rounds: 0)")
        return None
    subject = example_subject(cfg, say)
    if subject is None:
        return None
    mri, pet, source = subject
    from .data import DataError
    try:
        result = reconstruction_figure(cfg, pretrained_state, mri, pet, out_path, seed=cfg.seed, say=say)
    except DataError as err:
        # a cohort's scan: what is wrong, not which subject (the message names the file)
        detail = str(err) if cfg.figures.example_subject is not None else err.public_message()
        say(f"reconstruction figure skipped: {source}'s scans could not be read: {detail}")
        return None
    if result.path is not None:
        numbers = ", ".join(f"{m} {result.masked_mse[m]:.3g} (filling with the visible voxels' mean: "
                            f"{result.baseline_mse[m]:.3g})" for m in result.masked_mse)
        say(f"reconstruction figure: {result.path} ({source}; MSE on the masked voxels: {numbers})")
    return result
