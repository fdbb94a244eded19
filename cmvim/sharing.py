"""Which parameters travel between the server and the sites in each phase."""
from __future__ import annotations

from torch import nn


def shared_parameter_names(model: nn.Module, phase: str, personalize: str = "none") -> list[str]:
    """The parameters that travel between server and sites in `phase` (state-dict names).

    pretrain: everything (image encoder, projector, decoders, report encoder, momentum encoder).
    finetune/evaluate: the image encoder and the head, except what `personalize` keeps at the
    site: "head" (the linear head), "norm" (every RMSNorm weight), or both.
    """
    names = list(model.state_dict())
    if phase == "pretrain":
        return names
    local_head = "head" in personalize
    local_norm = "norm" in personalize
    shared = []
    for name in names:
        if local_head and name.startswith("head."):
            continue
        if local_norm and (".norm." in name or ".norm_f." in name or name.endswith(("norm.weight", "norm_f.weight"))):
            continue
        shared.append(name)
    return shared
