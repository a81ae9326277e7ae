"""The shared model API: Auto classes, safetensors-only save/load, support encoding, input checks, freezing."""

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_DINOV2, TINY_HF_RESNET, TINY_RESNET, TINY_SEGGPT, random_episode
from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from modeling_common import FewShotModelTesterMixin
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel

import hf_fss
from hf_fss import (
    CosinePriorConfig,
    CosinePriorModel,
    FewShotSegmentationConfig,
    FewShotSegmentationImageProcessor,
    FewShotSegmentationOutput,
    FewShotSegmentationPreTrainedModel,
    SupportEncoding,
)


def tiny_prior_model(**kwargs):
    config = CosinePriorConfig(backbone="resnet50", backbone_kwargs=dict(TINY_RESNET), image_size=65, **kwargs)
    return CosinePriorModel(config).eval()


def test_auto_classes_resolve_a_saved_tiny_model(tmp_path):
    model = tiny_prior_model()
    processor = FewShotSegmentationImageProcessor(image_size=65)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    files = sorted(p.name for p in tmp_path.iterdir())
    assert {"model.safetensors", "config.json", "preprocessor_config.json"} <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "cosine_prior"

    config = AutoConfig.from_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    loaded_processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(config) is CosinePriorConfig
    assert type(loaded) is CosinePriorModel
    assert type(loaded_processor) is FewShotSegmentationImageProcessor
    assert loaded_processor.image_size == 65

    query, support, masks, _ = random_episode()
    with torch.no_grad():
        expected = model(query, support, masks).logits
        got = loaded(query, support, masks).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_from_pretrained_refuses_pickle_and_never_fetches_imagenet_weights(tmp_path, monkeypatch):
    model = tiny_prior_model()
    model.save_pretrained(tmp_path / "ok")
    # A saved model whose config asks for ImageNet weights must not fetch them again on load.
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    cfg["use_pretrained_backbone"] = True
    cfg["pretrained_backbone_name_or_path"] = str(tmp_path / "imagenet")
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))

    def fail(*args, **kwargs):
        raise AssertionError("from_pretrained tried to load ImageNet backbone weights")

    monkeypatch.setattr(hf_fss.backbones.weights, "load_backbone_weights", fail)
    loaded = AutoModel.from_pretrained(tmp_path / "ok")
    # The flag stays as a record of where the backbone started; only an explicit call loads weights.
    assert loaded.config.use_pretrained_backbone is True
    with pytest.raises(AssertionError, match="tried to load"):
        loaded.load_pretrained_extractors()

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(cfg))
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(OSError):
        AutoModel.from_pretrained(pickled)


def test_load_pretrained_extractors_loads_the_configured_weights(tmp_path):
    donor = tiny_prior_model().backbone
    for p in donor.parameters():
        p.data.normal_()
    state = {k: v.contiguous() for k, v in donor.state_dict().items()}
    # Our own layout is not an ImageNet layout; write it as PSPNet's (conv1/bn1/... stem, layerN blocks).
    stem = {"layer0.conv1": "conv1", "layer0.bn1": "bn1", "layer0.conv2": "conv2", "layer0.bn2": "bn2"}
    stem.update({"layer0.conv3": "conv3", "layer0.bn3": "bn3"})
    renamed = {}
    for key, value in state.items():
        prefix, _, rest = key.rpartition(".")
        renamed[f"{stem.get(prefix, prefix)}.{rest}"] = value
    save_file(renamed, str(tmp_path / "model.safetensors"))

    model = tiny_prior_model(use_pretrained_backbone=True, pretrained_backbone_name_or_path=str(tmp_path))
    # Building from the config never loads weights: the trainer / converter asks for them explicitly.
    assert not torch.equal(model.backbone.layer0.conv1.weight, donor.layer0.conv1.weight)
    assert model.load_pretrained_extractors() == {"backbone": str(tmp_path)}
    assert model.backbone.weights_source == str(tmp_path)
    for key, value in donor.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value, rtol=0, atol=0)


def test_encode_support_equals_plain_call_and_serves_many_queries():
    model = tiny_prior_model()
    query, support, masks, _ = random_episode(batch_size=3, shot=2)
    with torch.no_grad():
        plain = model(query, support, masks)
        encoding = model.encode_support(support, masks)
        reused = model(query, support_encoding=encoding)
        torch.testing.assert_close(reused.logits, plain.logits, rtol=0, atol=0)

        one_set = model.encode_support(support[:1], masks[:1])
        assert isinstance(one_set, SupportEncoding) and one_set.shot == 2
        broadcast = model(query, support_encoding=one_set).logits
        each = model(query, support[:1].expand(3, -1, -1, -1, -1), masks[:1].expand(3, -1, -1, -1)).logits
        torch.testing.assert_close(broadcast, each, rtol=1e-6, atol=1e-6)


def test_outputs_follow_the_contract():
    model = tiny_prior_model()
    query, support, masks, labels = random_episode(batch_size=2, shot=3)
    out = model(query, support, masks, labels=labels)
    assert isinstance(out, FewShotSegmentationOutput)
    assert out.logits.shape == (2, 2, 65, 65)
    assert out.loss is not None and torch.isfinite(out.loss)
    assert set(out.losses) == {"main"}
    prior = out.maps["prior"]
    assert prior.shape[:2] == (2, 1) and prior.min() >= 0 and prior.max() <= 1
    # argmax of the logits is exactly "prior > threshold"
    up = F.interpolate(prior, size=(65, 65), mode="bilinear", align_corners=True)[:, 0]
    assert torch.equal(out.logits.argmax(1), (up > 0.5).long())
    as_tuple = model(query, support, masks, return_dict=False)
    assert isinstance(as_tuple, tuple)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, q, s, k: m(q[0], s, k), r"pixel_values must be a \(batch, 3, height, width\)"),
        (lambda m, q, s, k: m(q[:, :1], s, k), "pixel_values"),
        (lambda m, q, s, k: m(q, s[:, 0], k), "support_pixel_values must be a"),
        (lambda m, q, s, k: m(q, s, k[:, :, None]), "support_masks must be a"),
        (lambda m, q, s, k: m(q, s[:1], k[:1]), "holds 1 support sets but pixel_values holds 2"),
        (lambda m, q, s, k: m(q, s, k[:, :1]), "disagree on batch size or shot"),
        (lambda m, q, s, k: m(q, s, k[..., :-1]), "differs from the support image size"),
        (lambda m, q, s, k: m(q, s, torch.zeros_like(k)), r"no target pixel .* \[\(0, 0\), \(0, 1\)"),
        (lambda m, q, s, k: m(q, s), "support_pixel_values and support_masks are required"),
        (lambda m, q, s, k: m(q, s, k, labels=torch.zeros(2, 5, 5)), "labels must have shape"),
        (lambda m, q, s, k: m(q, s, k, support_encoding=m.encode_support(s, k)), "not both"),
        (
            lambda m, q, s, k: m(
                q, support_encoding=m.encode_support(s[:1].repeat(3, 1, 1, 1, 1), k[:1].repeat(3, 1, 1, 1))
            ),
            "batch of 3",
        ),
        (lambda m, q, s, k: m(q, support_encoding={"features": s}), "must come from model.encode_support"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(call, message):
    model = tiny_prior_model()
    query, support, masks, _ = random_episode(batch_size=2, shot=2)
    with pytest.raises(ValueError, match=message):
        call(model, query, support, masks)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_float_pixels_of_any_precision_are_cast_to_the_model_dtype(dtype):
    model = tiny_prior_model()
    query, support, masks, labels = random_episode(batch_size=2, shot=2)
    with torch.no_grad():
        reference = model(query.to(dtype).float(), support.to(dtype).float(), masks).logits
        got = model(query.to(dtype), support.to(dtype), masks).logits
    assert got.dtype == model.dtype
    torch.testing.assert_close(got, reference, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int8, torch.int32, torch.float32])
def test_masks_and_labels_of_any_integral_dtype_give_the_int64_result(dtype):
    model = tiny_prior_model()
    query, support, masks, labels = random_episode(batch_size=2, shot=2)
    masks[..., -3:, :] = 0  # 255 does not fit bool / int8
    with torch.no_grad():
        reference = model(query, support, masks, labels=labels)
        got = model(query, support, masks.to(dtype), labels=labels.to(dtype))
    torch.testing.assert_close(got.logits, reference.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, reference.loss, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda m, q, s, k, y: m((q * 255).to(torch.uint8), s, k),
            "pixel_values must be a float tensor.*uint8.*image processor",
        ),
        (lambda m, q, s, k, y: m(q, s.to(torch.uint8), k), "support_pixel_values must be a float tensor.*uint8"),
        (lambda m, q, s, k, y: m(q.to("meta"), s, k), r"pixel_values is on meta but the model is on cpu; move it"),
        (lambda m, q, s, k, y: m(q, s.to("meta"), k), r"support_pixel_values is on meta but the model is on cpu"),
        (lambda m, q, s, k, y: m(q, s, k.to("meta")), r"support_masks is on meta but the model is on cpu"),
        (lambda m, q, s, k, y: m(q, s, k, labels=y.to("meta")), r"labels is on meta but the model is on cpu"),
        (lambda m, q, s, k, y: m.encode_support(s.to("meta"), k), r"support_pixel_values is on meta"),
        (lambda m, q, s, k, y: m(q[..., :0], s, k), r"pixel_values holds images of zero size \(65, 0\)"),
        (lambda m, q, s, k, y: m(q, s[..., :0, :], k[..., :0, :]), r"support_pixel_values holds images of zero size"),
        (lambda m, q, s, k, y: m(q, s, k.masked_fill(k == 255, -1)), r"got also \[-1\]; mark ignored pixels with 255"),
        (lambda m, q, s, k, y: m(q, s, k, labels=y - 1), r"labels .*got also \[-1\]; mark ignored pixels with 255"),
        (lambda m, q, s, k, y: m(q, s, k, labels=y.float() / 2), "labels must hold only .* fractional"),
    ],
)
def test_inputs_of_a_wrong_dtype_device_or_size_are_refused_naming_the_argument(call, message):
    model = tiny_prior_model()
    query, support, masks, labels = random_episode(batch_size=2, shot=2)
    with pytest.raises(ValueError, match=message) as error:
        call(model, query, support, masks, labels)
    assert "\n" not in str(error.value)


# A tiny configuration of every registered method, with the backbone each method can be given.
TINY_METHODS = {
    "cosine_prior": {"backbone_kwargs": dict(TINY_RESNET)},
    "crcnet": {
        "backbone_kwargs": dict(TINY_RESNET),
        "reduce_dim": 8,
        "cross_reference_reduction": 4,
        "refinement_steps": 2,
    },
    "ntrenet": {"backbone_kwargs": dict(TINY_RESNET), "reduce_dim": 8, "background_prototype_dim": 8},
    "ntrenet_vgg": {"backbone": "vgg16_bn", "backbone_kwargs": {"base_width": 4}, "reduce_dim": 8},
    "qgnet": {
        "backbone_kwargs": dict(TINY_RESNET),
        "prior_extractor_kwargs": {"stem": "7x7", **TINY_RESNET},
        "reduce_dim": 8,
    },
    "smcp": {"backbone_kwargs": {"base_width": 4}, "reduce_dim": 8, "bottleneck_dim": 4, "num_base_classes": 3},
    "seggpt_fss": {"seggpt_config": dict(TINY_SEGGPT)},
}
# What each backbone's convolutions and pooling allow: SMCP's dilated VGG-16 has three floor-mode 2x2 pools; SegGPT
# takes exactly its input size (32 x 32 for the tiny one).
SMALLEST_INPUT = {"smcp": (8, 8), "seggpt_fss": (32, 32)}


def tiny_method(name):
    config_class, model_class = hf_fss.MODEL_CLASSES[name.split("_vgg")[0]]
    torch.manual_seed(0)
    return model_class(config_class(**TINY_METHODS[name])).eval()


def test_every_method_has_a_tiny_configuration_here():
    assert {name.split("_vgg")[0] for name in TINY_METHODS} == set(hf_fss.MODEL_CLASSES)


@pytest.mark.parametrize("name", sorted(TINY_METHODS))
def test_every_method_segments_images_of_its_smallest_input_size(name):
    model = tiny_method(name)
    height, width = model.min_input_size()
    assert (height, width) == SMALLEST_INPUT.get(name, (1, 1))
    assert max(height, width) <= 32  # the configs' image_size floor (validate_image_size) is never too small
    query, support, masks, _ = random_episode(batch_size=1, shot=1, size=height, width=width)
    masks[...] = 1
    with torch.no_grad():
        assert model(query, support, masks).logits.shape == (1, 2, height, width)


def test_min_input_size_is_computed_once_and_again_after_a_submodule_is_replaced(monkeypatch):
    # forward / encode_support ask for it on every call: it must not walk the module tree each time (issue 25).
    model, smcp = tiny_method("ntrenet"), tiny_method("smcp")
    assert model.min_input_size() == (1, 1)
    walks = []
    original = type(model).feature_extractors
    monkeypatch.setattr(type(model), "feature_extractors", lambda self: walks.append(1) or original(self))
    query, support, masks, _ = random_episode(batch_size=1, shot=1, size=17)
    masks[...] = 1
    with torch.no_grad():
        model(query, support, masks)
        model.encode_support(support, masks)
    assert walks == []
    model.backbone = smcp.backbone  # SMCP's dilated VGG-16 takes at least 8 x 8
    assert model.min_input_size() == (8, 8) and len(walks) == 1
    assert model.min_input_size() == (8, 8) and len(walks) == 1


@pytest.mark.parametrize(
    ("size", "argument"),
    [((7, 65), "pixel_values"), ((65, 2), "pixel_values"), ((7, 7), "support_pixel_values")],
)
def test_images_below_the_smallest_input_size_are_refused_naming_the_argument(size, argument):
    model = tiny_method("smcp")
    query, support, masks, _ = random_episode(batch_size=1, shot=1, size=9, width=9)
    small_query, small_support, small_masks, _ = random_episode(batch_size=1, shot=1, size=size[0], width=size[1])
    small_masks[...] = 1
    calls = {
        "pixel_values": lambda: model(small_query, support, masks),
        "support_pixel_values": lambda: model.encode_support(small_support, small_masks),
    }
    expected = rf"^{argument} holds images of {size[0]}x{size[1]} \(height x width\) but the model takes at least 8x8 "
    with pytest.raises(ValueError, match=expected + r".*image processor with image_size >= 8$") as error:
        calls[argument]()
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=f"^support_pixel_values holds images of {size[0]}x{size[1]}"):
        model(query, small_support, small_masks)


def test_config_rejects_unknown_backbone():
    # huggingface_hub's strict validation names the field and the allowed values.
    with pytest.raises(StrictDataclassError, match="backbone.*expected one of .*resnet50.*got resnet18"):
        CosinePriorConfig(backbone="resnet18")
    with pytest.raises(StrictDataclassError, match="threshold"):
        CosinePriorConfig(threshold=2.0)


# A trainable head on top of the shared base, to exercise freezing through a real optimisation step.
@strict(accept_kwargs=True)
class HeadConfig(FewShotSegmentationConfig):
    model_type = "test_head"


@dataclass
class HeadEncoding(SupportEncoding):
    prototype: torch.Tensor | None = None


class HeadModel(FewShotSegmentationPreTrainedModel):
    config_class = HeadConfig

    def __init__(self, config):
        super().__init__(config)
        self.backbone = self.build_backbone()
        self.head = nn.Sequential(
            nn.Conv2d(self.backbone.channels[4] * 2, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1)
        )
        self.post_init()

    def _encode_support(self, support_pixel_values, support_masks):
        feats = self.backbone_features(support_pixel_values[:, 0])[-1]
        mask = F.interpolate((support_masks[:, :1] == 1).float(), size=feats.shape[-2:], mode="bilinear")
        return HeadEncoding(
            shot=1, prototype=(feats * mask).sum((2, 3), keepdim=True) / (mask.sum((2, 3), keepdim=True) + 1e-5)
        )

    def _segment(self, pixel_values, support_encoding, labels=None, **kwargs):
        feats = self.backbone_features(pixel_values)[-1]
        proto = support_encoding.prototype.expand_as(feats)
        logits = F.interpolate(self.head(torch.cat([feats, proto], 1)), size=pixel_values.shape[-2:], mode="bilinear")
        loss = F.cross_entropy(logits, labels, ignore_index=255) if labels is not None else None
        return FewShotSegmentationOutput(loss=loss, logits=logits)


def _train_step(model):
    query, support, masks, labels = random_episode(batch_size=2)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(query, support, masks, labels=labels).loss
    loss.backward()
    optimizer.step()
    return loss


@pytest.mark.parametrize("freeze_batchnorm", [True, False])
def test_frozen_backbone_keeps_weights_and_batchnorm_statistics(freeze_batchnorm):
    config = HeadConfig(backbone_kwargs=dict(TINY_RESNET), freeze_backbone_batchnorm=freeze_batchnorm)
    model = HeadModel(config)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    assert torch.isfinite(_train_step(model))

    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    after = model.backbone.state_dict()
    stats = [k for k in before if "running_" in k or "num_batches_tracked" in k]
    assert stats
    weights_same = all(torch.equal(before[k], after[k]) for k in before if k not in stats)
    stats_same = all(torch.equal(before[k], after[k]) for k in stats)
    assert weights_same
    # With frozen batch norm the statistics stay; without, the same step moves them (so the check can fail).
    assert stats_same is freeze_batchnorm
    # The trainable head's own batch norm does update.
    assert not torch.equal(head_before["1.running_mean"], model.head.state_dict()["1.running_mean"])


def test_convert_sync_batchnorm_leaves_frozen_backbone_alone():
    model = HeadModel(HeadConfig(backbone_kwargs=dict(TINY_RESNET))).convert_sync_batchnorm()
    assert isinstance(model.head[1], nn.SyncBatchNorm)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.backbone.modules())
    unfrozen = HeadModel(HeadConfig(backbone_kwargs=dict(TINY_RESNET), freeze_backbone=False)).convert_sync_batchnorm()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in unfrozen.backbone.modules())
    assert all(p.requires_grad for p in unfrozen.backbone.parameters())


def test_every_method_is_registered():
    for model_type, (config_class, model_class) in hf_fss.MODEL_CLASSES.items():
        assert type(AutoConfig.for_model(model_type)) is config_class
        assert model_class.config_class is config_class


class TestCosinePriorModel(FewShotModelTesterMixin):
    model_class = CosinePriorModel
    config_kwargs = {"backbone_kwargs": dict(TINY_RESNET), "image_size": 65}


class TestCosinePriorDinov2Model(TestCosinePriorModel):
    config_kwargs = {"backbone_config": TINY_DINOV2, "image_size": 65}


class TestCosinePriorTransformersResNetModel(TestCosinePriorModel):
    config_kwargs = {"backbone_config": TINY_HF_RESNET, "image_size": 65}
