"""
Export a pretrained prior extractor:

- `export_prior_extractor(model, folder)`: `model.safetensors` with one encoder's backbone under the stage names of
  `hf_fss.backbones.DilatedResNet` (`layer0.conv1.weight`, `layer1.0.conv1.weight`, ...; no head), `config.json`
  (backbone name and kwargs as `QGNetConfig`'s `prior_extractor_backbone` / `prior_extractor_kwargs` take them, and
  the pretraining settings) and a model card `README.md`. `StagedBackbone.load_weights(folder)` reads it ("stages"
  layout) into a backbone of any output stride.
- `export_moco_checkpoint(model, file)`: MoCo's own training-checkpoint layout (`module.encoder_q.*`,
  `module.encoder_k.*` with torchvision names and the head as `fc.0` / `fc.2`, `module.queue` `(dim, K)`,
  `module.queue_ptr`), as safetensors (`.safetensors`) or as MoCo's `{"epoch", "arch", "state_dict"}` written by
  `torch.save` with tensors, ints and strings only (readable with `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .modeling import GlobalLocalContrastiveModel

__all__ = ["EXPORT_ENCODERS", "backbone_description", "export_moco_checkpoint", "export_prior_extractor"]

EXPORT_ENCODERS = ("encoder_k", "encoder_q")


def backbone_description(model: GlobalLocalContrastiveModel) -> tuple[str, dict[str, Any]]:
    """`(backbone name, kwargs)` for `hf_fss.backbones.build_backbone`, without the output stride (QGNet's own)."""
    kwargs = dict(model.config.backbone_kwargs)
    depth = int(kwargs.pop("depth", 50))
    return f"resnet{depth}", kwargs


def _encoder(model: GlobalLocalContrastiveModel, encoder: str):
    if encoder not in EXPORT_ENCODERS:
        raise ValueError(f"export encoder must be one of {list(EXPORT_ENCODERS)}, got {encoder!r}")
    return getattr(model, encoder)


def export_prior_extractor(
    model: GlobalLocalContrastiveModel,
    folder: str | os.PathLike,
    encoder: str = "encoder_k",
    training: dict[str, Any] | None = None,
    card: str | None = None,
) -> Path:
    """
    Write the prior extractor folder (see the module docstring) and return it.

    Args:
        model: the trained model.
        folder: output folder (created).
        encoder: `"encoder_k"` (key / momentum encoder, what QGNet's official loader takes) or `"encoder_q"`.
        training: the run's record (data, epochs, steps, batch x processes, ...), stored under `pretraining`.
        card: the README.md text (default: none written).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backbone = _encoder(model, encoder).backbone
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt", "layout": "stages"})
    name, kwargs = backbone_description(model)
    config = {
        "hf_fss_artifact": "prior_extractor",
        "backbone": name,
        "backbone_kwargs": kwargs,
        "prior_extractor_backbone": name,
        "prior_extractor_kwargs": kwargs,
        "encoder": encoder,
        "pretraining_output_stride": 32,
        "model": model.config.to_dict(),
        "pretraining": training or {},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    if card is not None:
        (folder / "README.md").write_text(card)
    return folder


def _torchvision_names(prefix: str, encoder) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in encoder.backbone.state_dict().items():
        name = key.removeprefix("layer0.")  # the stem's conv1 / bn1 are top-level in torchvision
        out[f"{prefix}{name}"] = value
    for key, value in encoder.head.state_dict().items():
        out[f"{prefix}fc.{key}"] = value
    return out


def export_moco_checkpoint(
    model: GlobalLocalContrastiveModel, file: str | os.PathLike, epoch: int = 0, arch: str | None = None
) -> Path:
    """Write MoCo's checkpoint layout (see the module docstring): `.safetensors` or a `torch.save` dict."""
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    for encoder in EXPORT_ENCODERS:
        state.update(_torchvision_names(f"module.{encoder}.", getattr(model, encoder)))
    # MoCo keeps the queue as a (dim, K) buffer and the pointer as a one-element long tensor.
    state["module.queue"] = model.queue.keys.t()
    state["module.queue_ptr"] = torch.tensor([model.queue.pointer], dtype=torch.long)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if file.suffix == ".safetensors":
        save_file(state, str(file), metadata={"format": "pt", "layout": "moco"})
    else:
        torch.save({"epoch": int(epoch), "arch": arch or backbone_description(model)[0], "state_dict": state}, file)
    return file
