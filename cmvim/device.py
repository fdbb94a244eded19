"""Where a site computes and in what precision: one home for device and mixed-precision choices.

    device = resolve_device("auto")              # cuda when present, else cpu; "cpu", "cuda", "cuda:1"
    amp = Precision.resolve("auto", device)      # bf16 autocast on GPUs that support it, else fp32
    with amp.autocast():
        loss = ...
    amp.backward(loss); amp.step(optimizer)      # fp16: through a gradient scaler

Models live on the device; batches follow the model (`to_device`); what leaves a site (shared
weights, checkpoints) is always on the CPU (`to_cpu`), so a checkpoint written on a GPU loads
on a machine without one. The selective scan keeps its state in fp32 under autocast
(cmvim.ssm computes in fp32 and returns the input's dtype, as mamba-ssm does).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .names import PRECISIONS
from .run_config import check_device_spec

log = logging.getLogger("cmvim.device")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(ValueError):
    """A device or precision the config asks for that this machine cannot give."""


def resolve_device(spec: str = "auto") -> torch.device:
    """auto: the first CUDA device when there is one, else the CPU. Asking for CUDA where there
    is none is an error, not a silent fallback: a site that planned a GPU run should know."""
    try:
        text = check_device_spec(spec)
    except ValueError as exc:
        raise DeviceError(str(exc)) from None
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r}: this machine has no CUDA device (torch {torch.__version__}, "
                              f"built for CUDA {torch.version.cuda or 'none'}); use device: auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def describe(device: torch.device) -> str:
    """One line for a log: the device and, for a GPU, its name."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return "cpu"


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True                                   # CPU autocast runs bf16 everywhere (slowly without AVX512-BF16)


@dataclass
class Precision:
    """The compute precision of a site's forward passes: fp32, or autocast to bf16/fp16 with the
    weights, optimizer state and scan state in fp32. fp16 scales the loss (GradScaler)."""
    name: str = "fp32"
    device: torch.device = torch.device("cpu")

    def __post_init__(self):
        self.scaler = torch.amp.GradScaler(self.device.type) if self.name == "fp16" else None

    @classmethod
    def resolve(cls, name: str, device: torch.device) -> "Precision":
        """auto: bf16 on a GPU that supports it, fp16 on an older GPU, fp32 on a CPU (CPU autocast
        is slower than fp32 there). An explicit choice is honoured or refused with the reason."""
        if name not in PRECISIONS:
            raise DeviceError(f"precision {name!r}: choose one of {', '.join(PRECISIONS)}")
        if name == "auto":
            name = "fp32" if device.type != "cuda" else ("bf16" if bf16_supported(device) else "fp16")
        if name == "bf16" and not bf16_supported(device):
            raise DeviceError(f"precision bf16: {describe(device)} does not support bfloat16; use fp16 or fp32")
        if name == "fp16" and device.type != "cuda":
            raise DeviceError("precision fp16 needs a CUDA device (CPU autocast runs bf16); use bf16 or fp32")
        return cls(name, device)

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.name])

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Before clipping: gradients back to their true scale."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)                # skipped when a gradient overflowed
        self.scaler.update()


FP32 = Precision()


def model_device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch's tensors on `device` (non-blocking from pinned memory); other values as they are."""
    if device.type == "cpu":
        return dict(batch)
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def to_cpu(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict on the CPU, detached: what is shared, saved or sent never names a GPU."""
    return {k: v.detach().cpu() for k, v in state.items()}
