"""Radiology-style free-text reports generated from a synthetic subject's findings.

Wording varies (several phrasings per finding, optional sections, incidental
findings) so a report encoder has to read, not match a template. By default the
diagnosis is never named; `informativeness` in [0, 1] is the probability that
each graded statement reflects the subject's true findings rather than a
random grade (a radiologist's variability, or a terse report).
"""
from __future__ import annotations

import numpy as np

ATROPHY = {
    0: ["No significant parenchymal volume loss.", "Brain volume within normal limits for age.",
        "Age-appropriate brain volume."],
    1: ["Mild generalized volume loss.", "Mild cerebral atrophy, slightly more than expected for age.",
        "Subtle parenchymal volume loss."],
    2: ["Moderate cerebral atrophy.", "Moderate volume loss, more pronounced than expected for age.",
        "Moderate generalized parenchymal volume loss."],
    3: ["Marked cerebral atrophy.", "Severe generalized volume loss.", "Pronounced parenchymal atrophy."],
}
HIPPOCAMPUS = {
    0: ["Hippocampi are normal in size.", "Normal hippocampal volume bilaterally.", "Mesial temporal structures unremarkable."],
    1: ["Mild bilateral hippocampal volume loss.", "Hippocampi slightly reduced in volume (MTA 1-2).",
        "Subtle mesial temporal atrophy."],
    2: ["Moderate hippocampal atrophy bilaterally (MTA 2-3).", "Marked reduction of hippocampal volume.",
        "Mesial temporal lobe atrophy, left more than right."],
}
VENTRICLES = {
    0: ["Ventricles normal in size.", "No ventriculomegaly.", "Ventricular system of normal caliber."],
    1: ["Mild ex vacuo enlargement of the lateral ventricles.", "Lateral ventricles mildly prominent.",
        "Slight ventricular enlargement, proportional to sulcal widening."],
    2: ["Enlarged lateral ventricles consistent with volume loss.", "Marked ventricular enlargement (ex vacuo).",
        "Prominent lateral ventricles and temporal horns."],
}
PET = {
    0: ["FDG PET: normal cortical metabolism.", "PET shows physiological, symmetric FDG uptake.",
        "No focal hypometabolism on FDG PET."],
    1: ["FDG PET: mildly reduced uptake in the posterior cingulate.",
        "PET: subtle hypometabolism of the precuneus.", "Mild temporoparietal hypometabolism on FDG PET."],
    2: ["FDG PET: bilateral temporoparietal and posterior cingulate hypometabolism.",
        "Marked hypometabolism in precuneus and parietal association cortex.",
        "PET shows a posterior-predominant hypometabolic pattern, consistent with a neurodegenerative process."],
}
INCIDENTAL = ["Scattered punctate white matter hyperintensities, likely small vessel disease.",
              "Small pineal cyst, no follow-up needed.", "Mucosal thickening of the maxillary sinuses.",
              "Old lacunar infarct in the left basal ganglia.", "Prominent perivascular spaces.",
              "Mild periventricular leukoaraiosis."]
OPENINGS = ["Findings:", "FINDINGS:", "Report:", "MRI brain without contrast.", "Clinical question: memory complaints."]
CLOSINGS = ["", "Clinical correlation recommended.", "Compared with no prior study.", "Impression as above."]
DIAGNOSIS = {"CN": "Impression: no imaging evidence of dementia.",
             "MCI": "Impression: findings may fit mild cognitive impairment.",
             "AD": "Impression: pattern typical of Alzheimer disease."}


def write_report(rng: np.random.Generator, severity: float, has_pet: bool, label: str,
                 informativeness: float = 0.6, name_diagnosis: bool = False) -> str:
    """A report for a subject of disease `severity` (0 healthy, ~1 typical AD)."""

    def grade(levels: int, value: float) -> int:
        if rng.random() > informativeness:
            return int(rng.integers(0, levels))
        return int(np.clip(np.round(value * (levels - 1) + rng.normal(0, 0.3)), 0, levels - 1))

    parts = [OPENINGS[rng.integers(len(OPENINGS))]]
    statements = [ATROPHY[grade(4, severity * 0.8)][rng.integers(3)],
                  HIPPOCAMPUS[grade(3, severity)][rng.integers(3)],
                  VENTRICLES[grade(3, severity * 0.8)][rng.integers(3)]]
    rng.shuffle(statements)
    parts += statements
    for _ in range(rng.binomial(2, 0.35)):
        parts.append(INCIDENTAL[rng.integers(len(INCIDENTAL))])
    if has_pet:
        parts.append(PET[grade(3, severity)][rng.integers(3)])
    if name_diagnosis:
        parts.append(DIAGNOSIS[label])
    parts.append(CLOSINGS[rng.integers(len(CLOSINGS))])
    return " ".join(p for p in parts if p)
