"""Which parameters travel between the server and the sites in each phase, and how a site's
model is put together from them and taken apart again."""
from __future__ import annotations

from typing import Mapping

import torch
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


class SharingError(ValueError):
    """What the server sent does not fit the site's model; the message names parameters and
    shapes only, so it may cross the network."""


def load_shared(model: nn.Module, phase: str, personalize: str, shared: Mapping[str, torch.Tensor],
                local: Mapping[str, torch.Tensor]) -> nn.Module:
    """`model` with the server's shared parameters and the site's own (personalised) ones loaded,
    after checking that every shared parameter came and every value fits."""
    state = model.state_dict()
    missing = [k for k in shared_parameter_names(model, phase, personalize) if k not in shared]
    if missing:
        raise SharingError(f"the server sent no values for {len(missing)} shared parameters "
                           f"(first: {missing[0]}): is the site running the same model config?")
    for key, value in {**shared, **local}.items():
        if key not in state:
            raise SharingError(f"unexpected parameter {key!r} for the {phase} model")
        if tuple(state[key].shape) != tuple(value.shape):
            raise SharingError(f"parameter {key!r} has shape {tuple(value.shape)}, the {phase} model expects "
                               f"{tuple(state[key].shape)}: is the site running the same model config?")
    model.load_state_dict({**state, **local, **shared}, strict=True)
    return model


def split_shared(model: nn.Module, phase: str, personalize: str) -> tuple[dict, dict]:
    """The model's state as (what goes back to the server, what stays at the site)."""
    names = set(shared_parameter_names(model, phase, personalize))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {k: v for k, v in state.items() if k in names}, {k: v for k, v in state.items() if k not in names}
