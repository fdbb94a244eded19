"""Effect sizes measured on the WRITTEN cohort files, read back through cmvim.data (a scanner-space
cohort: on the template-space images its scans were posed from, before skull and pose).

What a neuroimager would check on a real cohort, in template space:
  hippocampal tissue partial-volume tissue signal in the hippocampal region (T1 scaled from
                     CSF = 0 to WM = 1, in WM-equivalent mL)
  ventricles         partial-volume CSF fraction summed around the template's lateral ventricles (mL)
  PCC/precuneus SUVR FDG uptake in posterior cingulate / precuneus over cerebellum
Reported per class with the AD-vs-CN and MCI-vs-CN difference (%) and Cohen's d.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cmvim.data import load_volume

from .anatomy import Anatomy

GM_LEVEL, CSF_LEVEL = 0.62, 0.2        # T1 contrast relative to WM, as synthesised


def subject_features(site_dir: Path, record: dict, anatomy: Anatomy) -> dict:
    """The measures of one subject's written files (template space)."""
    t1, _ = load_volume(site_dir / record["mri"], "mri")
    pet = load_volume(site_dir / record["pet"], "pet")[0] if record["pet"] else None
    return image_features(t1, pet, anatomy)


def image_features(t1: np.ndarray, pet: np.ndarray | None, anatomy: Anatomy) -> dict:
    """The measures of one subject's template-space T1 and PET (None: no PET) on the anatomy grid."""
    wm_ref = np.median(t1[anatomy.wm > 0.9])
    rel = t1 / wm_ref
    voxel_ml = anatomy.voxel_mm ** 3 / 1000
    hippo = anatomy.regions["hippocampus"] > 0.5
    # partial-volume aware: tissue signal scaled from CSF (0) to WM (1); atrophy turns tissue into CSF
    tissue = np.clip((rel[hippo] - CSF_LEVEL) / (1.0 - CSF_LEVEL), 0, 1)
    box = anatomy.regions["ventricle_roi"] > 0.5
    features = {"hippocampal_tissue_ml": float(tissue.sum() * voxel_ml),
                # ventricles are surrounded by white matter: CSF fraction scaled from WM (0) to CSF (1)
                "ventricles_ml": float(np.clip((1.0 - rel[box]) / (1.0 - CSF_LEVEL), 0, 1).sum() * voxel_ml),
                "wm_intensity": float(wm_ref)}
    if pet is not None:
        reference = pet[anatomy.regions["cerebellum"] > 0.5].mean()
        features["pcc_suvr"] = float(pet[anatomy.regions["pcc_precuneus"] > 0.5].mean() / reference)
    return features


def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / max(len(a) + len(b) - 2, 1))
    return float((a.mean() - b.mean()) / pooled) if pooled > 0 else float("nan")


def summarize_effects(rows: list[dict]) -> dict[str, dict]:
    """rows: {"site", "label", features...} per subject -> per-class means, % vs CN, Cohen's d."""
    effects = {}
    for feature in ("hippocampal_tissue_ml", "ventricles_ml", "pcc_suvr"):
        values = {c: np.array([r[feature] for r in rows if r["label"] == c and feature in r])
                  for c in ("CN", "MCI", "AD")}
        entry = {f"mean_{c}": float(v.mean()) if len(v) else None for c, v in values.items()}
        for c in ("MCI", "AD"):
            if len(values[c]) > 1 and len(values["CN"]) > 1:
                entry[f"{c}_vs_CN_pct"] = float(100 * (values[c].mean() / values["CN"].mean() - 1))
                entry[f"{c}_vs_CN_d"] = cohens_d(values[c], values["CN"])
        effects[feature] = entry
    subtypes = sorted({r.get("subtype", "typical") for r in rows if r["label"] != "CN"})
    if len(subtypes) > 1:           # a cohort with AD subtypes: each subtype's AD subjects against all CN
        for feature in ("hippocampal_tissue_ml", "ventricles_ml", "pcc_suvr"):
            cn = np.array([r[feature] for r in rows if r["label"] == "CN" and feature in r])
            for subtype in subtypes:
                ad = np.array([r[feature] for r in rows if r["label"] == "AD" and r.get("subtype") == subtype
                               and feature in r])
                if len(ad) > 1 and len(cn) > 1:
                    effects[feature][f"AD_{subtype}_vs_CN_pct"] = float(100 * (ad.mean() / cn.mean() - 1))
                    effects[feature][f"AD_{subtype}_vs_CN_d"] = cohens_d(ad, cn)
    sites = sorted({r["site"] for r in rows})
    effects["site_wm_intensity"] = {site: float(np.mean([r["wm_intensity"] for r in rows if r["site"] == site]))
                                    for site in sites}
    return effects
