"""
Feature extractors own the frozen policy (issue 9, point 1) and bound their CPU activations (issue 16): a model with
two frozen extractors (the shape QGNet has), their own initialisation, and chunked calls that change no bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RESNET, random_episode
from huggingface_hub.dataclasses import strict
from modeling_common import assert_extractor_skipped_by_sync_batchnorm
from torch import nn

from hf_fss import NTRENetConfig, NTRENetModel
from hf_fss.backbones import build_backbone, staged
from hf_fss.configuration_fss import FewShotSegmentationConfig
from hf_fss.modeling_fss import FewShotSegmentationOutput, FewShotSegmentationPreTrainedModel, SupportEncoding


@strict(accept_kwargs=True)
class TwoExtractorConfig(FewShotSegmentationConfig):
    model_type = "two_extractor_test"


class TwoExtractorEncoding(SupportEncoding):
    pass


class TwoExtractorModel(FewShotSegmentationPreTrainedModel):
    """A trainable head over two frozen extractors: the supervised backbone and a second, 7x7-stem one."""

    config_class = TwoExtractorConfig

    def __init__(self, config):
        super().__init__(config)
        self.backbone = self.build_backbone()
        self.prior_extractor = build_backbone("resnet50", stem="7x7", **TINY_RESNET).freeze()
        channels = self.backbone.channels[4] + self.prior_extractor.channels[4]
        self.head = nn.Sequential(nn.Conv2d(channels, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))
        self.post_init()

    def _encode_support(self, support_pixel_values, support_masks):
        return SupportEncoding(shot=support_pixel_values.shape[1])

    def _segment(self, pixel_values, support_encoding, labels=None):
        features = torch.cat([self.backbone(pixel_values)[-1], self.prior_extractor(pixel_values)[-1]], dim=1)
        logits = F.interpolate(self.head(features), size=pixel_values.shape[-2:], mode="bilinear")
        loss = F.cross_entropy(logits, labels, ignore_index=255) if labels is not None else None
        return FewShotSegmentationOutput(loss=loss, logits=logits)


def test_two_frozen_extractors_stay_unchanged_out_of_the_optimizer_and_out_of_sync_batchnorm():
    model = TwoExtractorModel(TwoExtractorConfig(backbone_kwargs=dict(TINY_RESNET)))
    extractors = model.feature_extractors()
    assert set(extractors) == {"backbone", "prior_extractor"}
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in extractors.items()}
    head_before = model.head[1].running_mean.clone()

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    query, support, masks, labels = random_episode(batch_size=2)
    model.train()
    model(query, support, masks, labels=labels).loss.backward()
    optimizer.step()

    for name, module in extractors.items():
        assert not module.training, f"{name} BN must stay in eval"
        assert not optimized & {id(p) for p in module.parameters()}, f"{name} is in the optimizer"
        assert all(p.grad is None for p in module.parameters()), name
        for key, value in module.state_dict().items():  # weights and BN buffers
            assert torch.equal(before[name][key], value), f"{name}.{key}"
    assert not torch.equal(head_before, model.head[1].running_mean)  # the head trained, so the check can fail
    assert_extractor_skipped_by_sync_batchnorm(model)
    assert isinstance(model.head[1], nn.SyncBatchNorm)


def test_models_keep_the_extractors_own_initialisation():
    # A model must not redraw its backbone with the head's init: the backbone's own (Kaiming, fan_out) stays.
    torch.manual_seed(0)
    bare = build_backbone("resnet50", **TINY_RESNET)
    torch.manual_seed(0)
    model = TwoExtractorModel(TwoExtractorConfig(backbone_kwargs=dict(TINY_RESNET)))
    for key, value in bare.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    # ... while the head still gets the model's init (a conv bias is non-zero only after `_init_weights`).
    assert model.head[0].bias.abs().sum() > 0


def test_cpu_chunk_rule():
    backbone = build_backbone("resnet50").freeze()  # full width: 29.5 MB for layer4 of one 473 px image
    image = torch.empty(5, 3, 473, 473)
    assert backbone.activation_bytes(image, 0, 5) == 2048 * 60 * 60 * 4
    with torch.no_grad():
        assert backbone.max_chunk(image, 0, 5) == 1
    small = torch.zeros(5, 3, 33, 33)
    with torch.no_grad():
        assert backbone.max_chunk(small, 0, 5) == 5  # tiny activations: one call
    with torch.enable_grad():
        assert backbone.max_chunk(torch.zeros(5, 3, 473, 473), 0, 5) == 5  # autograd: never chunked
    backbone.chunk_on_cpu = False
    with torch.no_grad():
        assert backbone.max_chunk(torch.zeros(5, 3, 473, 473), 0, 5) == 5


@pytest.mark.parametrize("shot", [1, 3, 5])
def test_chunked_support_encoding_gives_bit_identical_logits(monkeypatch, shot):
    # Full-width stages at 129 px: below that (or at base width 8) oneDNN picks other kernels for other batch sizes
    # and batch-of-1 calls differ in the last bits (~1e-6) whether chunked or not; from this size on they agree.
    torch.manual_seed(0)
    config = NTRENetConfig(backbone_kwargs={"depths": [1, 1, 1, 1]}, reduce_dim=16, background_prototype_dim=16,
                           pyramid_bins=(9, 4, 2, 1), image_size=129)  # fmt: skip
    model = NTRENetModel(config).eval()
    query, support, masks, _ = random_episode(batch_size=2, shot=shot, size=129)
    calls = []
    run_stages = staged.StagedBackbone._run_stages
    monkeypatch.setattr(staged.StagedBackbone, "_run_stages", lambda self, x, *a: calls.append(len(x)) or
                        run_stages(self, x, *a))  # fmt: skip
    with torch.no_grad():
        model.backbone.chunk_on_cpu = False
        whole = model(query, support, masks).logits
        assert max(calls) == 2 * shot
        calls.clear()
        model.backbone.chunk_on_cpu = True
        monkeypatch.setattr(staged, "CPU_CHUNK_BYTES", 1)  # force one image per call
        chunked = model(query, support, masks).logits
        assert set(calls) == {1}
    assert torch.equal(whole, chunked)
