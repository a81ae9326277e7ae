"""SMCP: shared model tests, losses (MCL, SPT), test-time prototype fusion, declared inputs, configuration."""

from pathlib import Path

import pytest
import torch
from conftest import TINY_CONVNEXT, TINY_DINOV2
from huggingface_hub.errors import StrictDataclassError
from modeling_common import FewShotModelTesterMixin
from transformers import AutoModel

from hf_fss import SMCPConfig, SMCPModel
from hf_fss.models.smcp import fuse_prototypes, image_resolution_prototype
from hf_fss.models.smcp.convert_smcp import convert_smcp_state_dict, original_key_to_ours, our_key_to_original

ROOT = Path(__file__).resolve().parents[1]

TINY = {"backbone_kwargs": {"base_width": 4}, "reduce_dim": 16, "bottleneck_dim": 8, "num_base_classes": 5}


def semantic_labels(shape, num_base_classes=5, seed=0):
    """Random multi-class labels in {0..num_base_classes, 255}."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_base_classes + 1, shape, generator=generator)
    return labels.masked_fill(torch.rand(shape, generator=generator) < 0.05, 255)


pytestmark = pytest.mark.usefixtures("no_onednn")  # conftest: native conv kernels, cheaper for tiny convs


class TestSMCPModel(FewShotModelTesterMixin):
    model_class = SMCPModel
    config_kwargs = TINY

    def training_inputs(self, batch_size: int) -> dict:
        # The mixin's training step uses 2 shots.
        size = (self.image_size, self.image_width)
        return {
            "semantic_labels": semantic_labels((batch_size, *size)),
            "support_semantic_labels": semantic_labels((batch_size, 2, *size), seed=1),
        }

    def test_frozen_extractors_are_bit_identical_after_a_training_step(self):
        # SMCP trains its encoder by default; the freeze option must still hold it fixed.
        model = self.get_model(freeze_backbone=True)
        before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
        self._train_step(model)
        assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())

    def test_trainable_encoder_by_default_and_all_four_losses(self):
        model = self.get_model()
        assert not model.backbone.frozen
        outputs = self._train_step(model)
        assert set(outputs.losses) == {"query", "support", "mcl_query", "mcl_support"}
        losses = outputs.losses
        expected = losses["query"] + losses["support"] + 0.1 * (losses["mcl_query"] + losses["mcl_support"])
        torch.testing.assert_close(outputs.loss.detach(), expected)
        assert model.backbone.layer0[0].weight.grad is not None
        assert model.classifier.conv2d_list[0].weight.grad.abs().sum() > 0


class TestSMCPDinov2Model(TestSMCPModel):
    """SMCP's encoder replaced by a tiny DINOv2 (trained by default, as SMCP's VGG)."""

    config_kwargs = {**TINY, "backbone_config": TINY_DINOV2, "backbone_kwargs": None}

    def test_trainable_encoder_by_default_and_all_four_losses(self):
        model = self.get_model()
        assert not model.backbone.frozen
        outputs = self._train_step(model)
        assert set(outputs.losses) == {"query", "support", "mcl_query", "mcl_support"}
        assert model.backbone.model.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0


class TestSMCPConvNextModel(TestSMCPDinov2Model):
    # ConvNeXt rather than transformers' ResNet here: a random tiny ResNet's unnormalised features overflow SMCP's
    # float16 path (the reduced-precision tests); ConvNeXt's stage norms keep them in range.
    config_kwargs = {**TINY, "backbone_config": TINY_CONVNEXT, "backbone_kwargs": None}

    def test_trainable_encoder_by_default_and_all_four_losses(self):
        model = self.get_model()
        outputs = self._train_step(model)
        assert set(outputs.losses) == {"query", "support", "mcl_query", "mcl_support"}
        assert model.backbone.model.embeddings.patch_embeddings.weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SMCPModel(SMCPConfig(**TINY)).eval()


def _episode(batch_size=2, shot=1, size=(65, 81), seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch_size, 3, *size, generator=generator)
    support = torch.randn(batch_size, shot, 3, *size, generator=generator)
    masks = torch.zeros(batch_size, shot, *size, dtype=torch.long)
    masks[..., 10:40, 12:60] = 1
    labels = torch.zeros(batch_size, *size, dtype=torch.long)
    labels[:, 20:50, 5:30] = 1
    return query, support, masks, labels


# --- self-prototype branch ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("branch", "reaches_pyramid"), [("paper", True), ("official", False)])
def test_support_loss_reaches_the_pyramid_module_only_on_the_paper_branch(branch, reaches_pyramid):
    torch.manual_seed(0)
    model = SMCPModel(SMCPConfig(**TINY, self_prototype_branch=branch)).train()
    query, support, masks, labels = _episode()
    outputs = model(query, support, masks, labels=labels)
    # Only the support (SPT) loss: take it from the graph again rather than the detached losses dict.
    encoding = model.encode_support(support, masks)
    support_loss = model.criterion.cross_entropy(model._support_logits(encoding), masks.flatten(0, 1))
    torch.testing.assert_close(support_loss.detach(), outputs.losses["support"])
    support_loss.backward()
    pyramid_grads = [p.grad for p in model.pyramid_m.parameters()]
    if reaches_pyramid:
        assert all(g is not None for g in pyramid_grads) and sum(g.abs().sum() for g in pyramid_grads) > 0
    else:
        assert all(g is None for g in pyramid_grads)
    assert model.feat_rd[0].weight.grad.abs().sum() > 0 and model.classifier_2.conv2d_list[0].weight.grad is not None


# --- test-time prototype fusion -------------------------------------------------------------------------------------
def test_fusion_weights_the_pseudo_prototype_one_over_k_plus_one_and_keeps_the_support_one_when_empty():
    support, pseudo = torch.randn(3, 8, 1, 1), torch.randn(3, 8, 1, 1)
    area = torch.tensor([10.0, 0.0, 1.0])
    fused = fuse_prototypes(support, pseudo, shot=4, pseudo_mask_area=area)
    torch.testing.assert_close(fused[0], (4 * support[0] + pseudo[0]) / 5)
    torch.testing.assert_close(fused[2], (4 * support[2] + pseudo[2]) / 5)
    assert torch.equal(fused[1], support[1])  # empty pseudo-mask: the support prototype, not half of it
    torch.testing.assert_close(fuse_prototypes(support, pseudo, 1, area)[0], (support[0] + pseudo[0]) / 2)


def test_empty_pseudo_mask_leaves_the_support_prototype_unchanged(model):
    query, support, masks, _ = _episode()
    with torch.no_grad():
        # A large background bias on classifier_2 makes the first pass all background: an empty pseudo-mask.
        bias = model.classifier_2.conv2d_list[0].bias
        saved = bias.clone()
        bias[0] += 1e4
        try:
            fused = model(query, support, masks)
            model.config.pseudo_prototype_fusion = False
            single = model(query, support, masks)
        finally:
            bias.copy_(saved)
            model.config.pseudo_prototype_fusion = True
    assert fused.maps["pseudo_mask"].sum() == 0
    assert torch.equal(fused.logits, single.logits)


def test_two_passes_first_pass_map_and_pseudo_mask(model):
    query, support, masks, _ = _episode(shot=2)
    bias = model.classifier_2.conv2d_list[0].bias
    saved = bias.detach().clone()
    with torch.no_grad():
        model.config.pseudo_prototype_fusion = False
        try:
            # Centre the random model's target-minus-background scores so that the first pass marks about half
            # of the query as target (a non-empty pseudo-mask).
            logits = model(query, support, masks).logits
            bias[1] -= (logits[:, 1] - logits[:, 0]).median()
            single = model(query, support, masks)
            model.config.pseudo_prototype_fusion = True
            fused = model(query, support, masks)
        finally:
            bias.copy_(saved)
            model.config.pseudo_prototype_fusion = True
    assert 0.1 < fused.maps["pseudo_mask"].mean() < 0.9
    assert not torch.equal(fused.logits, single.logits)
    assert set(fused.maps) == {"first_pass", "pseudo_mask"} and set(single.maps) == {"first_pass"}
    torch.testing.assert_close(fused.maps["first_pass"], single.maps["first_pass"], rtol=0, atol=0)
    # The pseudo-mask is the argmax of the (upsampled) first pass, i.e. where the single-pass target score wins.
    pseudo = fused.maps["pseudo_mask"]
    assert set(pseudo.unique().tolist()) <= {0.0, 1.0} and pseudo.shape == (2, 1, 65, 81)
    agree = (pseudo[:, 0] == single.logits.argmax(dim=1)).float().mean()
    assert agree > 0.99


def test_image_resolution_prototype_adjoint_equals_the_literal_upsampling():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(3, 16, 9, 11, generator=generator) * 10
    mask = (torch.rand(3, 1, 65, 81, generator=generator) > 0.7).float()
    mask[2] = 0
    adjoint = image_resolution_prototype(features, mask, "adjoint")
    literal = image_resolution_prototype(features, mask, "upsample")
    torch.testing.assert_close(adjoint, literal, rtol=1e-5, atol=1e-5)
    assert torch.equal(adjoint[2], torch.zeros_like(adjoint[2]))  # empty mask: zero prototype (+1e-5 area)
    with pytest.raises(ValueError, match="mode must be"):
        image_resolution_prototype(features, mask, "nearest")


# --- declared inputs ------------------------------------------------------------------------------------------------
def test_misspelt_or_misplaced_semantic_label_inputs_raise(model):
    query, support, masks, labels = _episode()
    support_semantic = semantic_labels(masks.shape)
    with pytest.raises(ValueError, match=r"unexpected input\(s\) \['support_semantic_lables'\]"):
        model(query, support, masks, support_semantic_lables=support_semantic)
    with pytest.raises(ValueError, match="unexpected input"):
        model.encode_support(support, masks, support_semantic_label=support_semantic)
    encoding = model.encode_support(support, masks)
    with pytest.raises(ValueError, match="pass them to model.encode_support"):
        model(query, support_encoding=encoding, support_semantic_labels=support_semantic)
    with pytest.raises(ValueError, match=r"semantic_labels must hold 0 \(background\), 1..5"):
        model(query, support, masks, semantic_labels=labels.masked_fill(labels == 1, 6))
    with pytest.raises(ValueError, match="support_semantic_labels must have shape"):
        model(query, support, masks, support_semantic_labels=support_semantic[:, :, :-1])


def test_training_without_semantic_labels_skips_only_the_mcl_terms():
    torch.manual_seed(0)
    model = SMCPModel(SMCPConfig(**TINY)).train()
    query, support, masks, labels = _episode()
    outputs = model(query, support, masks, labels=labels)
    assert set(outputs.losses) == {"query", "support"}


# --- configuration --------------------------------------------------------------------------------------------------
def test_config_defaults_follow_the_official_code_and_validate():
    config = SMCPConfig()
    assert (config.backbone, config.freeze_backbone, config.image_size) == ("vgg16_dilated", False, 417)
    assert (config.reduce_dim, config.bottleneck_dim, config.aspp_rates) == (512, 64, (6, 12, 18, 24))
    assert (config.mcl_loss_weight, config.self_prototype_branch, config.pseudo_prototype_fusion) == (
        0.1,
        "paper",
        True,
    )
    for bad, message in (
        ({"num_base_classes": 0}, "num_base_classes must be positive"),
        ({"aspp_rates": (6, 0)}, "aspp_rates must be"),
        ({"mcl_loss_weight": -1.0}, "mcl_loss_weight must be non-negative"),
    ):
        with pytest.raises((ValueError, StrictDataclassError), match=message):
            SMCPConfig(**bad)
    with pytest.raises((ValueError, StrictDataclassError)):
        SMCPConfig(self_prototype_branch="buggy")
    with pytest.raises((ValueError, StrictDataclassError)):
        SMCPConfig(backbone="resnet50")
    with pytest.raises(ValueError, match="did you mean 'num_base_classes'"):
        SMCPConfig(num_base_class=15)


# --- converter ------------------------------------------------------------------------------------------------------
def _official_checkpoint(model: SMCPModel) -> dict:
    """The model's weights in the official layout: DataParallel's bare state dict with `module.` keys."""
    return {f"module.{our_key_to_original(k)}": v.clone() for k, v in model.state_dict().items()}


def test_converter_round_trips_a_tiny_official_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(1)
    source = SMCPModel(SMCPConfig(**{**TINY, "backbone_kwargs": {"base_width": 4, "fc_channels": 24}})).eval()
    state = _official_checkpoint(source)
    assert "module.features.29.weight" in state and "module.classifier.conv2d_list.3.bias" in state
    assert "module.pyramid_m.residule2.4.weight" in state and "module.feat_rd.0.weight" in state
    path = tmp_path / "25000.pth"
    torch.save(state, path)
    assert set(torch.load(path, weights_only=True)) == set(state)  # the real format loads tensors-only

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import convert_original_checkpoint as cli

    output = tmp_path / "converted"
    args = ["--model-type", "smcp", "--checkpoint", str(path), "--output-dir", str(output), "--image-size", "65"]
    assert cli.main(args) == 0
    converted = AutoModel.from_pretrained(output).eval()
    config = converted.config
    assert (config.num_base_classes, config.reduce_dim, config.bottleneck_dim) == (5, 16, 8)
    assert config.backbone_kwargs == {"base_width": 4, "fc_channels": 24} and config.image_size == 65
    assert config.self_prototype_branch == "official"
    for key, value in source.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    card = (output / "README.md").read_text()
    assert "25000.pth" in card and "NUST-Machine-Intelligence-Laboratory/SMCP" in card
    query, support, masks, _ = _episode()
    with torch.no_grad():
        torch.testing.assert_close(
            converted(query, support, masks).logits, source(query, support, masks).logits, rtol=0, atol=0
        )


def test_converter_reports_missing_unexpected_and_mis_shaped_keys(tmp_path):
    torch.manual_seed(1)
    state = _official_checkpoint(SMCPModel(SMCPConfig(**TINY)))
    broken = dict(state)
    del broken["module.pyramid_m.p2.0.bias"]
    broken["module.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['pyramid_m.p2.0.bias'\].*unexpected.*extra.weight"):
        convert_smcp_state_dict(broken)
    broken = dict(state, **{"module.features.33.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected keys.*features.33.weight"):
        convert_smcp_state_dict(broken)
    broken = dict(state, **{"module.feat_rd.0.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match="shape mismatches.*feat_rd.0.bias"):
        convert_smcp_state_dict(broken)
    with pytest.raises(ValueError, match="has no 'features.0.weight'"):
        convert_smcp_state_dict({"module.fc.weight": torch.zeros(1)})
    assert original_key_to_ours("module.features.31.bias") == "backbone.layer4.8.bias"
    assert our_key_to_original("backbone.layer2.4.weight") == "features.14.weight"
