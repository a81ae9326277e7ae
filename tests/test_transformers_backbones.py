"""
Transformers backbones as hf_fss extractors (hf_fss.backbones.transformers_backbone, issue 24): features equal to
transformers' own backbone feature maps on the stride-8 grid, configs from a Hub id / folder / backbone_config, weights
only through `load_pretrained_extractors()`, the evaluation cache and CPU chunking bit-identical, truthful cards.
Everything offline: tiny random configs, folders written by `save_pretrained` standing in for Hub ids.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_CONVNEXT, TINY_DINOV2, TINY_HF_RESNET, random_episode
from transformers import AutoBackbone, AutoConfig, Dinov2Backbone

from hf_fss import CosinePriorConfig, CosinePriorModel, NTRENetConfig, NTRENetModel, QGNetConfig, QGNetModel
from hf_fss.backbones import FeatureCache, TransformersBackbone, build_backbone, staged
from hf_fss.hub import render_model_card
from hf_fss.modules.ops import resize

TINY_DINOV2_REGISTERS = {**TINY_DINOV2, "model_type": "dinov2_with_registers", "num_register_tokens": 2}
TINY_DINOV3_VIT = {"model_type": "dinov3_vit", "hidden_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2,
                   "intermediate_size": 32, "patch_size": 16, "num_register_tokens": 2}  # fmt: skip
TINY_DINOV3_CONVNEXT = {"model_type": "dinov3_convnext", "hidden_sizes": [8, 16, 16, 16], "depths": [1, 1, 1, 1]}
FAMILIES = {
    "dinov2": TINY_DINOV2,
    "dinov2_with_registers": TINY_DINOV2_REGISTERS,
    "dinov3_vit": TINY_DINOV3_VIT,
    "convnext": TINY_CONVNEXT,
    "convnextv2": {**TINY_CONVNEXT, "model_type": "convnextv2"},
    "dinov3_convnext": TINY_DINOV3_CONVNEXT,
    "resnet": TINY_HF_RESNET,
}
TINY_NTRENET = {"reduce_dim": 16, "background_prototype_dim": 16, "pyramid_bins": [1.0, 0.5], "image_size": 65}


def _backbone(values: dict) -> TransformersBackbone:
    torch.manual_seed(0)
    return build_backbone(None, CosinePriorConfig(backbone_config=values).backbone_config).eval()


def _reference(backbone: TransformersBackbone):
    """transformers' own backbone with the adapter's weights."""
    reference = AutoBackbone.from_config(backbone.model.config).eval()
    reference.load_state_dict(backbone.model.state_dict())
    return reference


@pytest.fixture
def dinov2_folder(tmp_path):
    """A folder as `Dinov2Backbone.save_pretrained` writes it, standing in for facebook/dinov2-small."""
    torch.manual_seed(1)
    config = AutoConfig.for_model(**TINY_DINOV2)
    AutoBackbone.from_config(config).save_pretrained(tmp_path / "dinov2")
    return str(tmp_path / "dinov2")


# --- features ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_stage_outputs_are_the_transformers_feature_maps_on_the_stride_8_grid(family):
    backbone = _backbone(FAMILIES[family])
    x = torch.randn(2, 3, 65, 81)
    with torch.no_grad():
        stages = backbone.forward_stages(x, 0, 5)
        feature_maps = _reference(backbone)(x).feature_maps
    assert [tuple(s.shape) for s in stages] == [(2, c, 9, 11) for c in backbone.channels]
    assert backbone.strides == (8,) * 5
    for stage, feature_map in zip(stages[1:], feature_maps, strict=True):
        assert torch.equal(stage, resize(feature_map, (9, 11)))
    with torch.no_grad():  # PFENet's layer4 on a (masked) layer3 map: same grid, finite
        layer4 = backbone.forward_stages(stages[3] * 0.5, 4, 5)[0]
    assert layer4.shape == stages[4].shape and torch.isfinite(layer4).all()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_load_round_trip_is_bit_identical_for_every_family(family, tmp_path):
    """DINOv3's RoPE frequencies, a buffer no checkpoint holds, are recomputed after `from_pretrained`."""
    torch.manual_seed(0)
    model = CosinePriorModel(CosinePriorConfig(backbone_config=FAMILIES[family], image_size=65)).eval()
    model.save_pretrained(tmp_path)
    loaded = CosinePriorModel.from_pretrained(tmp_path).eval()
    query, support, masks, _ = random_episode(batch_size=2, shot=2, size=65)
    with torch.no_grad():
        assert torch.equal(loaded(query, support, masks).logits, model(query, support, masks).logits)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), loaded.buffers(), strict=True))


def test_vit_defaults_split_the_depth_in_quarters_and_wrong_out_indices_are_one_line_errors():
    config = CosinePriorConfig(backbone_config={**TINY_DINOV2, "num_hidden_layers": 12})
    assert config.backbone_config["out_indices"] == [3, 6, 9, 12] and config.backbone is None
    chosen = CosinePriorConfig(backbone_config={**TINY_DINOV2, "out_indices": [1, 2, 3, 4]})
    assert chosen.backbone_config["out_indices"] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"^backbone_config out_indices \[2, 4\] must be four increasing") as error:
        CosinePriorConfig(backbone_config={**TINY_DINOV2, "out_indices": [2, 4]})
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="must be \\[1, 2, 3, 4\\]"):
        CosinePriorConfig(backbone_config={**TINY_CONVNEXT, "out_indices": [0, 1, 2, 3]})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backbone": "resnet5"}, "backbone: unknown backbone; expected one of resnet50.*; got resnet5$"),
        ({"backbone": "./no/such/folder"}, "folder not found"),
        ({"backbone": "vgg16_bn", "backbone_config": TINY_DINOV2}, "both name an architecture"),
        ({"backbone_config": {"model_type": "bert"}}, "model_type 'bert', which is no supported backbone"),
        ({"backbone_config": TINY_DINOV2, "backbone_kwargs": {"base_width": 8}}, "'base_width'"),
    ],
)
def test_bad_backbone_fields_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        NTRENetModel(NTRENetConfig(**kwargs, **TINY_NTRENET))
    assert "\n" not in str(error.value)


def test_a_folder_that_is_no_backbone_is_refused(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert', which is no supported backbone"):
        CosinePriorConfig(backbone=str(tmp_path / "bert"))


# --- configs from a folder, weights only on request ------------------------------------------------------------
def test_a_folder_backbone_resolves_once_saves_self_contained_and_loads_weights_only_on_request(
    dinov2_folder, tmp_path
):
    config = CosinePriorConfig(backbone=dinov2_folder, use_pretrained_backbone=True, image_size=65)
    assert config.backbone_config["model_type"] == "dinov2" and config.backbone_weights == dinov2_folder
    model = CosinePriorModel(config).eval()
    out_indices = config.backbone_config["out_indices"]
    reference = Dinov2Backbone.from_pretrained(dinov2_folder, out_indices=out_indices).eval()
    x = torch.randn(1, 3, 65, 81)
    with torch.no_grad():
        assert not torch.equal(model.backbone(x)[4], resize(reference(x).feature_maps[3], (9, 11)))  # random
        assert model.load_pretrained_extractors() == {"backbone": dinov2_folder}
        features = model.backbone(x)
        for stage, feature_map in zip(features[1:], reference(x).feature_maps, strict=True):
            assert torch.equal(stage, resize(feature_map, (9, 11)))
    assert model.backbone.weights_source == dinov2_folder
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["backbone_config"] == config.backbone_config
    # The saved model needs neither the folder nor the network: its config and weights are self-contained.
    (tmp_path / "dinov2").rename(tmp_path / "gone")
    loaded = CosinePriorModel.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        assert torch.equal(loaded.backbone(x)[4], features[4])


def test_a_folder_of_another_architecture_is_a_clear_error(tmp_path):
    AutoBackbone.from_config(AutoConfig.for_model(**TINY_HF_RESNET)).save_pretrained(tmp_path / "resnet")
    model = CosinePriorModel(CosinePriorConfig(backbone_config=TINY_DINOV2, use_pretrained_backbone=True,
                                               pretrained_backbone_name_or_path=str(tmp_path / "resnet")))  # fmt: skip
    with pytest.raises(ValueError, match="holds a 'resnet' model, but this backbone is 'dinov2'") as error:
        model.load_pretrained_extractors()
    assert "\n" not in str(error.value)
    bigger = {**TINY_DINOV2, "hidden_size": 32}
    AutoBackbone.from_config(AutoConfig.for_model(**bigger)).save_pretrained(tmp_path / "bigger")
    with pytest.raises(ValueError, match="bigger"):
        model.backbone.load_weights(str(tmp_path / "bigger"))


def test_qgnet_with_dinov2_as_the_prior_extractor_is_one_config_line(dinov2_folder):
    config = QGNetConfig(prior_extractor_backbone=dinov2_folder, reduce_dim=16, pyramid_bins=(9, 4, 2, 1),
                         backbone_kwargs={"base_width": 8, "depths": [1, 1, 1, 1]}, image_size=65)  # fmt: skip
    assert config.prior_extractor_weights == dinov2_folder and config.prior_extractor_kwargs == {}
    model = QGNetModel(config).eval()
    assert isinstance(model.prior_extractor, TransformersBackbone) and model.prior_extractor.frozen
    assert model.load_pretrained_extractors() == {"prior_extractor": dinov2_folder}
    reference = Dinov2Backbone.from_pretrained(dinov2_folder).eval()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.prior_extractor.model.state_dict().items())


def test_cards_say_where_a_transformers_backbone_came_from(dinov2_folder):
    random_text = render_model_card(CosinePriorConfig(backbone=dinov2_folder)).text
    assert "random initialisation" in random_text and "DINOv2 weights" not in random_text
    pretrained = CosinePriorConfig(backbone=dinov2_folder, use_pretrained_backbone=True)
    text = render_model_card(pretrained).text
    assert f"DINOv2 weights from {dinov2_folder}" in text and "ImageNet" not in text


# --- the policy: cache, chunking ------------------------------------------------------------------------------
def test_cached_and_chunked_evaluation_are_bit_identical_to_plain(monkeypatch):
    torch.manual_seed(0)
    model = NTRENetModel(NTRENetConfig(backbone_config=TINY_DINOV2, **TINY_NTRENET)).eval()
    query, support, masks, _ = random_episode(batch_size=2, shot=3, size=65)
    with torch.no_grad():
        plain = model(query, support, masks).logits
        cache = FeatureCache(1 << 30)
        flat = support.flatten(0, 1)
        keys = [("support", i) for i in range(len(flat))]
        with cache.attach(model), cache.images([(query, ["q0", "q1"]), (flat, keys)]):
            encoding = model.encode_support(flat.unflatten(0, (2, 3)), masks)
            cached = model(query, support_encoding=encoding).logits
            # A support image served as a query (all five stages) equals its uncached features.
            served = model.backbone.forward_stages(flat, 0, 5)
        monkeypatch.setattr(staged, "CPU_CHUNK_BYTES", 1)  # one image per call
        assert model.backbone.max_chunk(flat, 0, 5) == 1
        chunked = model(query, support, masks).logits
        whole = model.backbone.forward_stages(flat, 0, 5)
    assert cache.hits > 0 and torch.equal(cached, plain) and torch.equal(chunked, plain)
    assert all(torch.equal(a, b) for a, b in zip(served, whole, strict=True))


# --- the cosine prior on a ViT ----------------------------------------------------------------------------------
def test_cosine_prior_masks_a_vits_support_features_and_keeps_pfenets_masked_input_elsewhere():
    from hf_fss.modules import multi_shot_prior_mask

    assert CosinePriorConfig().support_masking == "input"  # the quickstart's resnet: unchanged
    assert CosinePriorConfig(backbone_config=TINY_HF_RESNET).support_masking == "input"
    assert CosinePriorConfig(backbone_config=TINY_DINOV2).support_masking == "features"
    torch.manual_seed(0)
    model = CosinePriorModel(CosinePriorConfig(backbone_config=TINY_DINOV2, image_size=65)).eval()
    query, support, masks, _ = random_episode(batch_size=2, shot=2, size=65)
    with torch.no_grad():
        logits = model(query, support, masks).logits
        features = model.backbone(support.flatten(0, 1))[4].unflatten(0, (2, 2))
        prior = multi_shot_prior_mask(model.backbone(query)[4], features, (masks == 1).unsqueeze(2).float())
        pfenet = CosinePriorModel(CosinePriorConfig(backbone_config=TINY_DINOV2, support_masking="input")).eval()
        pfenet.load_state_dict(model.state_dict())
        other = pfenet(query, support, masks).logits
    torch.testing.assert_close(logits[:, 1], resize(prior, (65, 65))[:, 0], rtol=0, atol=0)
    assert not torch.equal(other, logits)


@pytest.mark.parametrize(
    "out_indices, named",
    [([1, 2, 3, 9], "valid indices"), ([3, 2, 1, 4], "same order"), ("abc", "'out_indices'"), ([1, 2], "four")],
)
def test_wrong_out_indices_are_one_line_naming_the_field(dinov2_folder, out_indices, named):
    folder = dinov2_folder
    with pytest.raises(ValueError) as error:
        NTRENetModel(NTRENetConfig(backbone=str(folder), backbone_kwargs={"out_indices": out_indices}))
    message = str(error.value)
    assert "\n" not in message and named in message and "out_indices" in message and "_out_indices" not in message


def test_an_unreadable_backbone_id_or_folder_names_the_field_and_the_fix(tmp_path, dinov2_folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"backbone='.*empty': the folder has no config.json"):
        NTRENetConfig(backbone=str(tmp_path / "empty"))
    # offline (the suite sets HF_HUB_OFFLINE): a Hub id is named with the way out
    with pytest.raises(ValueError, match=r"backbone='facebook/dinov2-small': no such local folder, and the Hub"):
        NTRENetConfig(backbone="facebook/dinov2-small")
    model = CosinePriorModel(
        CosinePriorConfig(
            backbone=str(dinov2_folder),
            use_pretrained_backbone=True,
            pretrained_backbone_name_or_path="facebook/dinov2-small",
        )
    )
    with pytest.raises(ValueError, match=r"pretrained_backbone_name_or_path.*'facebook/dinov2-small': no such local"):
        model.load_pretrained_extractors()
