"""Which parameters travel between the server and the sites in each phase, how a site's model is
put together from them and taken apart again, and how they travel: packed into one vector.

Why packed: Flower 1.42 sends every array of a message as its own object, fetched or pushed with
its own HTTPS request through the Fleet API (and the ServerApp's own requests to the SuperLink);
the pretraining model's ~250 tensors made ~1,000 requests a round over three sites, three
quarters of a deployed round's time (docs/benchmarks/deploy.md). One float32 vector is one
object (Flower chunks it at 5 MB). Both ends know the layout without sending it: the shared
parameters of the phase's model, in state-dict order, from the run config the message carries.
Aggregation is unchanged: FedAvg, FedProx, FedAdam, the robust strategies, the norm bound, DP
clipping and SecAgg+ all work elementwise or on the flattened update already."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .names import Phase


def shared_parameter_names(model: nn.Module, phase: Phase, personalize: str = "none") -> list[str]:
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


PACKED = "cmvim.packed"            # the ArrayRecord key of the one vector a message's parameters travel as


def pack(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters as one float32 vector, in `state`'s order (every CMViM parameter is float32)."""
    if not state:
        return {}
    return {PACKED: torch.cat([v.detach().to("cpu", torch.float32).reshape(-1) for v in state.values()])}


def unpack(arrays: Mapping[str, torch.Tensor], layout: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Named tensors of `layout` (name -> shape, in order) from a packed message; arrays that
    travelled by name (an older peer, a test) are returned as they are."""
    if PACKED not in arrays:
        return dict(arrays)
    vector = torch.as_tensor(arrays[PACKED]).reshape(-1)
    sizes = [int(torch.Size(shape).numel()) for shape in layout.values()]
    if vector.numel() != sum(sizes):
        raise SharingError(f"the packed parameters hold {vector.numel()} values, the model expects {sum(sizes)} "
                           f"in {len(sizes)} tensors: are both ends running the same model config?")
    return {name: part.reshape(shape).clone()
            for (name, shape), part in zip(layout.items(), torch.split(vector, sizes))}


def shared_layout(model: nn.Module, phase: Phase, personalize: str = "none") -> dict[str, torch.Size]:
    """What a packed message of `phase` holds: the shared parameters' names and shapes, in order."""
    state = model.state_dict()
    return {name: state[name].shape for name in shared_parameter_names(model, phase, personalize)}


class SharingError(ValueError):
    """What the server sent does not fit the site's model; the message names parameters and
    shapes only, so it may cross the network."""


def load_shared(model: nn.Module, phase: Phase, personalize: str, shared: Mapping[str, torch.Tensor],
                local: Mapping[str, torch.Tensor]) -> nn.Module:
    """`model` with the server's shared parameters and the site's own (personalised) ones loaded,
    after checking that every shared parameter came and every value fits. `shared` may be packed."""
    shared = unpack(shared, shared_layout(model, phase, personalize))
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


def split_shared(model: nn.Module, phase: Phase, personalize: str) -> tuple[dict, dict]:
    """The model's state as (what goes back to the server, what stays at the site)."""
    names = set(shared_parameter_names(model, phase, personalize))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {k: v for k, v in state.items() if k in names}, {k: v for k, v in state.items() if k not in names}
