"""A BIDS PET image read as its `_pet.json` sidecar describes it (docs/bids.md, "PET").

    TracerName            which tracer: only FDG (any spelling) is read unless the run accepts others
    FrameTimesStart       per frame, seconds from TimeZero (InjectionStart, also from TimeZero,
    FrameDuration         is subtracted to get time after injection)
    Units                 Bq/mL, kBq/mL, SUV...: shown, not converted (cmvim normalises intensities)

A dynamic (4D) PET becomes one static image: the duration-weighted mean of the frames inside a
late window, each frame counting by its overlap with the window. The FDG default, 30-60 min
after injection, is the window static clinical FDG brain PET uses (EANM procedure guidelines
for brain PET imaging using [18F]FDG, version 3: Guedj et al. 2022, Eur J Nucl Med Mol Imaging
49:632-651) and the one ADNI acquires as 6 x 5 min frames. `PetReading` is what was decided for
one image; `read_pet` makes it, or raises a `DataError` naming the file and what is wrong.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib

from .errors import DataError

FDG_WINDOW_MIN = (30.0, 60.0)
# how FDG is written in TracerName or a trc- entity, compared after dropping case, brackets,
# dashes and spaces: FDG, 18F-FDG, [18F]FDG, F-18 FDG, 2-[18F]fluoro-2-deoxy-D-glucose...
_FDG_NAMES = {"fdg", "18ffdg", "f18fdg", "fluorodeoxyglucose", "18ffluorodeoxyglucose",
              "fludeoxyglucose", "18ffludeoxyglucose", "2fluoro2deoxydglucose", "218ffluoro2deoxydglucose",
              "2deoxy218ffluorodglucose"}


def tracer_key(name: str) -> str:
    """A tracer's name for comparing: FDG for every spelling of FDG, else the name without case,
    brackets, dashes or spaces (so DASB, [11C]DASB and dasb compare equal... except for the isotope)."""
    squashed = re.sub(r"[\s\[\]\(\)\-_,.]", "", name).lower()
    return "FDG" if squashed in _FDG_NAMES else squashed


@dataclass(frozen=True)
class PetPolicy:
    """Which PET images a BIDS site's visits read, and how a dynamic one is made static.
    `accept_tracers`: tracer names (any spelling of FDG is FDG); `window_min`: (start, end) minutes
    after injection whose frames are averaged."""
    accept_tracers: tuple[str, ...] = ("FDG",)
    window_min: tuple[float, float] = FDG_WINDOW_MIN

    def __post_init__(self):
        start, end = (float(v) for v in self.window_min)
        if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end):
            raise ValueError(f"PET window {self.window_min!r}: give (start, end) minutes after injection, "
                             "0 <= start < end")
        object.__setattr__(self, "window_min", (start, end))
        object.__setattr__(self, "accept_tracers", tuple(str(t) for t in self.accept_tracers))

    @classmethod
    def from_bids(cls, cfg) -> "PetPolicy":
        """The run config's bids section, where it says (`accept_tracers`, `pet_window_min`)."""
        return cls(accept_tracers=tuple(getattr(cfg, "accept_tracers", None) or ("FDG",)),
                   window_min=tuple(getattr(cfg, "pet_window_min", None) or FDG_WINDOW_MIN))

    def accepts(self, tracer: str) -> bool:
        return tracer_key(tracer) in {tracer_key(t) for t in self.accept_tracers}


@dataclass(frozen=True)
class PetReading:
    """How one PET image is read: its tracer and units as its sidecar gives them, and, for a
    dynamic image, the weight of each frame (None: a static image, or equal weights)."""
    tracer: str
    units: str
    frames: int                                         # the image's volumes (1: static)
    weights: tuple[float, ...] | None = None            # per frame, summing to 1; None = as it is / equal
    summary: str = ""                                   # what was done, in words (cmvim-client check)
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def key(self) -> str:
        """What the reading adds to the file's bytes, for the cache key."""
        return "" if self.weights is None else "w:" + ",".join(f"{w:.6g}" for w in self.weights)


def sidecar_for(image: Path, site_dir: Path) -> tuple[dict, list[Path]]:
    """The image's sidecar metadata by BIDS inheritance: every *_pet.json (or pet.json) from the
    dataset's top level down to the image's folder whose entities all appear in the image's name,
    the deeper winning key by key. Returns (metadata, the files read)."""
    stem = re.sub(r"\.nii(\.gz)?$", "", image.name)
    entities = set(stem.split("_")[:-1])
    folders = [site_dir]
    for part in image.parent.relative_to(site_dir).parts:
        folders.append(folders[-1] / part)
    merged, used = {}, []
    site_root = site_dir.resolve()
    for folder in folders:
        try:
            candidates = sorted(p for p in folder.iterdir() if p.name.endswith("pet.json") and p.is_file())
        except OSError:
            continue
        for path in candidates:
            name = path.name[:-len(".json")]
            if name != "pet" and not name.endswith("_pet"):
                continue
            needed = set(name.split("_")[:-1])
            if not needed <= entities:
                continue
            if site_root not in path.resolve().parents:       # as every path a site gives: inside it
                raise DataError("the sidecar leads outside the site folder (a symlink?)", file=path, column="pet",
                                kind="path outside site")
            try:
                data = json.loads(path.read_bytes().decode("utf-8-sig"))
            except OSError as exc:
                raise DataError(f"cannot read the sidecar ({exc.strerror or type(exc).__name__})", file=path,
                                column="pet", kind="unreadable file") from None
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DataError(f"sidecar is not valid JSON ({exc})", file=path, column="pet",
                                kind="bad sidecar") from None
            if not isinstance(data, dict):
                raise DataError("sidecar is not a JSON object", file=path, column="pet", kind="bad sidecar")
            merged.update(data)
            used.append(path)
    return merged, used


def tracer_of(image: Path, sidecar: dict) -> str | None:
    """The tracer the sidecar's TracerName names, else the file name's trc- entity; a DataError
    when both are there and disagree (which one is right is for the site to say)."""
    match = re.search(r"(?:^|_)trc-([a-zA-Z0-9]+)", image.name)
    from_name = match.group(1) if match else None
    named = sidecar.get("TracerName")
    if named is not None and (not isinstance(named, str) or not named.strip()):
        raise DataError(f"TracerName {named!r} in the sidecar is not a tracer's name", file=image, column="pet",
                        kind="bad sidecar")
    if named and from_name and tracer_key(named) != tracer_key(from_name):
        raise DataError(f"the file name says trc-{from_name} but the sidecar's TracerName is {named!r}: which "
                        "tracer is it? Rename the file or correct the sidecar", file=image, column="pet",
                        kind="tracer conflict")
    return named.strip() if named else from_name


def read_pet(image: Path, site_dir: Path, policy: PetPolicy) -> PetReading:
    """How `image` is to be read under `policy`; a DataError (naming the file) when it cannot be:
    a tracer the run does not accept, a tracer conflict, unreadable header or sidecar, frame
    timing that does not match the image, no frame in the window."""
    sidecar, used = sidecar_for(image, site_dir)
    tracer = tracer_of(image, sidecar)
    warnings = []
    if tracer is None:
        tracer = "FDG"
        warnings.append(f"{image.name}: no TracerName in a _pet.json sidecar and no trc- in the name: taken as FDG")
    if not policy.accepts(tracer):
        accepted = ", ".join(policy.accept_tracers)
        raise DataError(f"tracer {tracer!r} is not FDG (the run accepts {accepted}): not read",
                        file=image, column="pet", kind="tracer not accepted")
    units = sidecar.get("Units")
    units = str(units) if units not in (None, "") else "not given"
    try:
        header = nib.load(str(image)).header
        shape = tuple(int(n) for n in header.get_data_shape())
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on a damaged header
        raise DataError(f"not a readable NIfTI image ({type(exc).__name__}: {exc})", file=image, column="pet",
                        kind="not an image") from None
    frames = shape[3] if len(shape) == 4 else 1
    starts, durations = sidecar.get("FrameTimesStart"), sidecar.get("FrameDuration")
    label = "FDG" if tracer_key(tracer) == "FDG" else tracer
    if starts is None or durations is None:
        if frames > 1:
            warnings.append(f"{image.name}: {frames} frames but no FrameTimesStart/FrameDuration in a sidecar: "
                            "averaged with equal weights (early frames too, if any)")
            return PetReading(label, units, frames, (1 / frames,) * frames,
                              f"{frames} frames, equal weights (no frame timing)", tuple(warnings))
        return PetReading(label, units, 1, None, "static", tuple(warnings))
    starts, durations = _frame_times(image, starts, durations, frames, used)
    injection = sidecar.get("InjectionStart", 0)
    injection = float(injection) if isinstance(injection, (int, float)) and math.isfinite(injection) else 0.0
    if frames == 1:
        return PetReading(label, units, 1, None, f"static, {_minutes(starts[0] - injection)}-"
                          f"{_minutes(starts[0] + durations[0] - injection)} min", tuple(warnings))
    weights = frame_weights(starts, durations, policy.window_min, injection)
    if weights is None:
        times = ", ".join(f"{s:g}+{d:g}" for s, d in zip(starts, durations))
        raise DataError(f"no frame in the {_minutes(policy.window_min[0] * 60)}-{_minutes(policy.window_min[1] * 60)} "
                        f"min window after injection (InjectionStart {injection:g} s); frames (start+duration, s "
                        f"from TimeZero): {times}", file=image, column="pet", kind="no frames in window")
    used_frames = [i + 1 for i, w in enumerate(weights) if w > 0]
    start, end = policy.window_min
    return PetReading(label, units, frames, weights,
                      f"frames {used_frames[0]}-{used_frames[-1]} of {frames}, {start:g}-{end:g} min, "
                      "duration-weighted", tuple(warnings))


def frame_weights(starts: list[float], durations: list[float], window_min: tuple[float, float],
                  injection_s: float = 0.0) -> tuple[float, ...] | None:
    """Each frame's share of the window: its overlap with [start, end] minutes after injection,
    normalised to sum to 1 (a frame's mean activity times its overlap is the counts it adds);
    None when no frame overlaps."""
    lo, hi = window_min[0] * 60 + injection_s, window_min[1] * 60 + injection_s
    overlaps = [max(0.0, min(s + d, hi) - max(s, lo)) for s, d in zip(starts, durations)]
    total = sum(overlaps)
    if total <= 0:
        return None
    return tuple(o / total for o in overlaps)


def _frame_times(image: Path, starts, durations, frames: int, used: list[Path]) -> tuple[list[float], list[float]]:
    where = ", ".join(p.name for p in used)
    values = []
    for name, given in (("FrameTimesStart", starts), ("FrameDuration", durations)):
        given = given if isinstance(given, list) else [given]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in given):
            raise DataError(f"{name} in {where} is not a list of numbers (seconds): {given!r}"[:300], file=image,
                            column="pet", kind="bad sidecar")
        values.append([float(v) for v in given])
    starts, durations = values
    if len(starts) != len(durations) or len(starts) != frames:
        raise DataError(f"the image has {frames} frame(s) but {where} gives {len(starts)} FrameTimesStart and "
                        f"{len(durations)} FrameDuration", file=image, column="pet", kind="frame timing mismatch")
    if any(d <= 0 for d in durations):
        raise DataError(f"FrameDuration in {where} holds a duration <= 0: {durations}"[:300], file=image,
                        column="pet", kind="bad sidecar")
    return starts, durations


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.3g}"
