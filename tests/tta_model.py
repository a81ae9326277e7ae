"""
A tiny model that adapts to its support set at test time, the way CRCNet's K-shot finetuning will: it finetunes a
1x1 classifier on the labelled supports inside `_encode_support`, on a copy of the weights held in the encoding, with
`torch.enable_grad()` (evaluation and the pipeline run under `torch.no_grad()`), so the model's own weights never
change and one encoding serves many queries.

Importing this module registers it with the Auto classes (model type `adapting_test`); `tta_evaluate.py` beside it
runs `scripts/evaluate.py` with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from torch.func import functional_call
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from hf_fss import FewShotSegmentationImageProcessor
from hf_fss.configuration_fss import FewShotSegmentationConfig
from hf_fss.modeling_fss import FewShotSegmentationOutput, FewShotSegmentationPreTrainedModel, SupportEncoding


@strict(accept_kwargs=True)
class AdaptingConfig(FewShotSegmentationConfig):
    model_type = "adapting_test"
    adaptation_steps: int = 5
    adaptation_lr: float = 0.5


@dataclass
class AdaptedEncoding(SupportEncoding):
    """`weight` `(batch, 2, channels)` and `bias` `(batch, 2)`: the classifier finetuned on each support set."""

    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None


class AdaptingModel(FewShotSegmentationPreTrainedModel):
    config_class = AdaptingConfig
    adaptation_count = 0  # support sets finetuned so far (class-wide, so tests can count)

    def __init__(self, config):
        super().__init__(config)
        self.backbone = self.build_backbone()
        self.classifier = nn.Conv2d(self.backbone.channels[4], 2, kernel_size=1)
        self.post_init()

    def _finetune(self, features: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        params = {name: p.detach().clone().requires_grad_(True) for name, p in self.classifier.named_parameters()}
        # Class-balanced: the target is a small part of each support.
        counts = torch.stack([(targets == c).sum() for c in (0, 1)]).clamp(min=1).to(features.dtype)
        weight = counts.sum() / (2 * counts)
        with torch.enable_grad():
            for _ in range(self.config.adaptation_steps):
                logits = functional_call(self.classifier, params, (features,))
                loss = F.cross_entropy(logits, targets, weight=weight, ignore_index=255)
                grads = torch.autograd.grad(loss, list(params.values()))
                params = {n: (p - self.config.adaptation_lr * g).detach().requires_grad_(True)
                          for (n, p), g in zip(params.items(), grads)}  # fmt: skip
        type(self).adaptation_count += 1
        return {n: p.detach() for n, p in params.items()}

    def _encode_support(self, support_pixel_values, support_masks):
        batch_size, shot = support_pixel_values.shape[:2]
        features = self.backbone(support_pixel_values.flatten(0, 1))[-1].unflatten(0, (batch_size, shot))
        targets = F.interpolate(support_masks.float(), size=features.shape[-2:], mode="nearest").long()
        adapted = [self._finetune(features[b], targets[b]) for b in range(batch_size)]
        return AdaptedEncoding(
            shot=shot,
            weight=torch.stack([a["weight"].flatten(1) for a in adapted]),
            bias=torch.stack([a["bias"] for a in adapted]),
        )

    def _segment(self, pixel_values, support_encoding, labels=None):
        features = self.backbone(pixel_values)[-1]
        if self.training:  # training teaches the shared classifier; adaptation is for test time
            logits = self.classifier(features)
        else:
            logits = torch.einsum("bchw,boc->bohw", features, support_encoding.weight)
            logits = logits + support_encoding.bias[:, :, None, None]
        logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=True)
        loss = None if labels is None else F.cross_entropy(logits, labels, ignore_index=255)
        return FewShotSegmentationOutput(loss=loss, logits=logits, losses=None if loss is None else {"main": loss})


AutoConfig.register(AdaptingConfig.model_type, AdaptingConfig, exist_ok=True)
AutoModel.register(AdaptingConfig, AdaptingModel, exist_ok=True)
AutoImageProcessor.register(
    AdaptingConfig, image_processor_classes={"pil": FewShotSegmentationImageProcessor}, exist_ok=True
)
