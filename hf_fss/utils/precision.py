"""
Reduced-precision inference, one helper for every caller (evaluate.py, compare.py, train.py's evaluation,
benchmark.py, the pipeline and the Space): `inference_precision(model, "bfloat16", channels_last=True)` runs the
block under `torch.autocast` of that dtype on the model's device type and, with `channels_last`, with the model's
4-D weights in `torch.channels_last` memory format (restored on exit); `channels_last_input` converts a 4-D image
batch to match.

The weights stay in their dtype (float32): autocast runs convolutions and matrix products in the reduced dtype and
the methods keep their numerically sensitive parts in float32 (`hf_fss.modules.autocast_off`); the models return
logits in their own dtype. Source: the PyTorch autocast and channels_last documentation
(https://pytorch.org/docs/stable/amp.html, https://pytorch.org/tutorials/intermediate/memory_format_tutorial.html).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

__all__ = ["PRECISIONS", "channels_last_input", "check_precision", "inference_precision", "logit_agreement"]

# The `--dtype` choices: float32 (no autocast) or the autocast dtype.
PRECISIONS = ("float32", "bfloat16", "float16")


def check_precision(
    dtype: str | torch.dtype, device: torch.device | str = "cpu", name: str = "--dtype"
) -> torch.dtype:
    """
    The torch dtype of `dtype` (one of `PRECISIONS`, by name or as a `torch.dtype`), checked to be one that
    `torch.autocast` runs on `device`'s type.

    Raises:
        `ValueError`: an unknown name (naming `name` and the choices), or a dtype autocast does not support on that
            device type (torch would only warn and run in float32).
    """
    # By its name only (not torch's aliases such as "half"), so that what a record says is what was given.
    wanted = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype) if dtype in PRECISIONS else None
    if str(wanted).removeprefix("torch.") not in PRECISIONS:
        raise ValueError(f"{name} must be one of {', '.join(PRECISIONS)}, got {dtype!r}")
    device_type = torch.device(device).type
    if wanted == torch.float32:
        return wanted
    if not torch.amp.is_autocast_available(device_type):
        raise ValueError(f"{name} {dtype}: torch has no autocast on {device_type}; use {name} float32")
    with warnings.catch_warnings(record=True) as caught:  # an unsupported dtype is a warning and a disabled autocast
        warnings.simplefilter("always")
        with torch.autocast(device_type, dtype=wanted):
            enabled = torch.is_autocast_enabled(device_type)
    if not enabled or caught:
        reason = f" ({caught[0].message})" if caught else ""
        raise ValueError(f"{name} {dtype}: autocast on {device_type} does not support it{reason}; use bfloat16")
    return wanted


def channels_last_input(tensor: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """A 4-D floating-point `(B, C, H, W)` tensor in `torch.channels_last` memory format (same values); any other
    tensor (5-D support stacks, masks, ids) unchanged."""
    if channels_last and tensor.dim() == 4 and tensor.is_floating_point():
        return tensor.contiguous(memory_format=torch.channels_last)
    return tensor


def _device_of(model: torch.nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@contextlib.contextmanager
def inference_precision(
    model: torch.nn.Module, dtype: str | torch.dtype = "float32", channels_last: bool = False
) -> Iterator[None]:
    """
    Run the block in `dtype` (`"float32"`: as is; `"bfloat16"` / `"float16"`: `torch.autocast` of that dtype on the
    model's device type) and, with `channels_last`, with the model's 4-D parameters and buffers in channels_last
    memory format, restored to the contiguous format on exit (the values never change; a training loop that
    evaluates in between trains as before).

    Raises:
        `ValueError`: a dtype that is not one of `PRECISIONS` or that autocast does not run on the model's device.
    """
    device = _device_of(model)
    wanted = check_precision(dtype, device)
    autocast = torch.autocast(device.type, dtype=wanted) if wanted != torch.float32 else contextlib.nullcontext()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        with autocast:
            yield
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)


def logit_agreement(logits: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """
    How close `(B, 2, H, W)` logits are to reference logits of the same shape (e.g. float32 ones):
    `max_abs_logit_difference` (in float32) and `pixel_agreement`, the fraction of pixels whose argmax class is
    the same (1.0 = identical masks).
    """
    logits, reference = logits.float(), reference.float()
    return {
        "max_abs_logit_difference": (logits - reference).abs().max().item(),
        "pixel_agreement": (logits.argmax(1) == reference.argmax(1)).float().mean().item(),
    }
