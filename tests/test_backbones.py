"""Tests of hf_fss.backbones: shapes, strides, stage slicing and weight loading from every supported layout."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import hf_fss.backbones.weights as weights_module
from hf_fss.backbones import (
    VGG16BN,
    DilatedResNet,
    DilatedVGG16,
    build_backbone,
    load_backbone_weights,
    pfenet_backbone_key_map,
    smcp_backbone_key_map,
)

TINY_DEPTHS = (1, 1, 1, 1)
W = 8  # tiny base width


def tiny_resnet(stem: str = "deep", output_stride: int = 8) -> DilatedResNet:
    return build_backbone("resnet50", stem=stem, base_width=W, depths=TINY_DEPTHS, output_stride=output_stride)


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights *and* batch-norm statistics, so that a wrongly mapped tensor changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Conv2d):
                sub.weight.copy_(torch.randn(sub.weight.shape, generator=generator) / math.sqrt(sub.weight[0].numel()))
                if sub.bias is not None:
                    sub.bias.copy_(0.1 * torch.randn(sub.bias.shape, generator=generator))
            elif isinstance(sub, nn.BatchNorm2d):
                sub.weight.copy_(0.5 + torch.rand(sub.weight.shape, generator=generator))
                sub.bias.copy_(0.1 * torch.randn(sub.bias.shape, generator=generator))
                sub.running_mean.copy_(0.1 * torch.randn(sub.running_mean.shape, generator=generator))
                sub.running_var.copy_(0.5 + torch.rand(sub.running_var.shape, generator=generator))
    return module.eval()


def assert_same_state(a: nn.Module, b: nn.Module, skip: tuple[str, ...] = ()) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if not key.endswith("num_batches_tracked") and not key.startswith(skip):
            torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


# ----------------------------------------------------------------------------------------------------------------
# Shapes, channels, strides
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stem", "output_stride", "strides"),
    [
        ("deep", 8, (4, 4, 8, 8, 8)),
        ("deep", 16, (4, 4, 8, 16, 16)),
        ("deep", 32, (4, 4, 8, 16, 32)),
        ("7x7", 8, (4, 4, 8, 8, 8)),
        ("7x7", 32, (4, 4, 8, 16, 32)),
    ],
)
def test_resnet_channels_and_strides(stem, output_stride, strides):
    backbone = tiny_resnet(stem, output_stride).eval()
    stem_channels = 2 * W if stem == "deep" else W
    assert backbone.channels == (stem_channels, 4 * W, 8 * W, 16 * W, 32 * W)
    assert backbone.strides == strides
    with torch.no_grad():
        outputs = backbone(torch.randn(1, 3, 64, 64))
    assert isinstance(outputs, tuple) and len(outputs) == 5
    for out, channels, stride in zip(outputs, backbone.channels, backbone.strides):
        assert out.shape == (1, channels, 64 // stride, 64 // stride)


def test_vgg_channels_and_strides():
    vgg_bn = build_backbone("vgg16_bn", base_width=W).eval()
    dilated = build_backbone("vgg16_dilated", base_width=W).eval()
    assert vgg_bn.channels == dilated.channels == (W, 2 * W, 4 * W, 8 * W, 8 * W)
    assert vgg_bn.strides == (2, 4, 8, 16, 16)
    assert dilated.strides == (2, 4, 8, 8, 8)
    assert build_backbone("vgg16_dilated", base_width=W, fc_channels=12).channels[-1] == 12
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for backbone in (vgg_bn, dilated):
            for out, channels, stride in zip(backbone(x), backbone.channels, backbone.strides):
                assert out.shape == (1, channels, 64 // stride, 64 // stride)


def test_pfenet_input_size_473():
    """PFENet trains on 473x473 crops: its feature maps are 60x60 (ResNet, VGG layer2) and 30x30 (VGG layer3/4)."""
    x = torch.randn(1, 3, 473, 473)
    with torch.no_grad():
        resnet = build_backbone("resnet50", base_width=4, depths=TINY_DEPTHS).eval()(x)
        vgg_bn = build_backbone("vgg16_bn", base_width=4).eval()(x)
        dilated = build_backbone("vgg16_dilated", base_width=4).eval()(x)
    assert [o.shape[-1] for o in resnet] == [119, 119, 60, 60, 60]
    # ceil_mode=True pools as in PFENet's vgg.py: 473 -> 237 -> 119 -> 60 -> 30.
    assert [o.shape[-1] for o in vgg_bn] == [237, 119, 60, 30, 30]
    # SMCP keeps torchvision's floor-mode pools: 473 -> 236 -> 118 -> 59.
    assert [o.shape[-1] for o in dilated] == [236, 118, 59, 59, 59]


def test_tiny_models_on_odd_input():
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        for name in ("vgg16_bn", "vgg16_dilated"):
            assert len(build_backbone(name, base_width=W).eval()(x)) == 5
        assert [o.shape[-1] for o in tiny_resnet()(x)] == [17, 17, 9, 9, 9]


def test_full_size_attributes_and_parameter_counts():
    # Meta tensors: full-size architectures without allocating or running them.
    with torch.device("meta"):
        resnet50, resnet101 = build_backbone("resnet50"), build_backbone("resnet101")
        resnet50_7x7 = build_backbone("resnet50", stem="7x7")
        vgg_bn, dilated = build_backbone("vgg16_bn"), build_backbone("vgg16_dilated")
    for backbone in (resnet50, resnet101):
        assert backbone.channels == (128, 256, 512, 1024, 2048)
        assert backbone.strides == (4, 4, 8, 8, 8)
    assert resnet50_7x7.channels == (64, 256, 512, 1024, 2048)
    assert vgg_bn.channels == (64, 128, 256, 512, 512) and vgg_bn.strides == (2, 4, 8, 16, 16)
    assert dilated.channels == (64, 128, 256, 512, 512) and dilated.strides == (2, 4, 8, 8, 8)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    # torchvision resnet50 without its fc layer (25,557,032 - 2,049,000).
    assert count(resnet50_7x7) == 23_508_032
    # torchvision vgg16 `features` (14,714,688) plus batch-norm affine parameters / plus fc6 and fc7.
    assert count(vgg_bn) == 14_714_688 + 2 * (2 * 64 + 2 * 128 + 3 * 256 + 6 * 512)
    assert count(dilated) == 14_714_688 + 2 * (512 * 512 * 9 + 512)
    # Dilation in every block of layer3 / layer4, as PFENet sets it.
    assert all(block.conv2.dilation == (2, 2) for block in resnet101.layer3)
    assert all(block.conv2.dilation == (4, 4) and block.conv2.stride == (1, 1) for block in resnet101.layer4)
    assert resnet101.layer4[0].downsample[0].stride == (1, 1)


def test_forward_stages_matches_forward_and_keeps_inputs():
    backbone = tiny_resnet()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = backbone(x)
        head = backbone.forward_stages(x, 0, 4)
        layer3 = head[-1].clone()
        tail = backbone.forward_stages(head[-1], 4, 5)
        masked = backbone.forward_stages(head[-1] * 0.5, 4, 5)
    assert len(head) == 4 and len(tail) == 1
    for a, b in zip(full, head + tail):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # No stage writes into its input (in-place ReLUs), so callers may keep stage outputs around.
    torch.testing.assert_close(head[-1], layer3, rtol=0, atol=0)
    assert masked[0].shape == tail[0].shape
    assert backbone.forward_stages(x, 2, 2) == []
    with pytest.raises(ValueError):
        backbone.forward_stages(x, 3, 6)
    with pytest.raises(ValueError):
        backbone.forward_stages(x, 2, 1)


def test_build_backbone_errors():
    with pytest.raises(ValueError, match="resnet50.*resnet101.*vgg16_bn.*vgg16_dilated"):
        build_backbone("resnet18")
    with pytest.raises(TypeError, match="output_strde"):
        build_backbone("resnet50", output_strde=8)
    with pytest.raises(TypeError, match="depth"):
        build_backbone("resnet50", depth=101)
    with pytest.raises(TypeError, match="stem"):
        build_backbone("vgg16_bn", stem="deep")
    with pytest.raises(ValueError, match="output_stride"):
        build_backbone("resnet50", output_stride=4)
    with pytest.raises(ValueError, match="stem"):
        build_backbone("resnet50", stem="5x5")


# ----------------------------------------------------------------------------------------------------------------
# ResNet weights
# ----------------------------------------------------------------------------------------------------------------


def _tiny_transformers_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(
        embedding_size=W,
        hidden_sizes=[4 * W, 8 * W, 16 * W, 32 * W],
        depths=list(TINY_DEPTHS),
        layer_type="bottleneck",
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    # Same block as ours: reduction 4 and the stride on the 3x3 conv (v1.5), no stride in the first stage.
    assert config.downsample_in_bottleneck is False and config.downsample_in_first_stage is False
    assert config.hidden_act == "relu"
    return transformers, config


def test_resnet_7x7_loads_transformers_layout(tmp_path):
    transformers, config = _tiny_transformers_config()
    torch.manual_seed(0)
    hf_model = randomize(transformers.ResNetForImageClassification(config))
    assert hf_model.resnet.encoder.stages[0].layers[0].layer[1].convolution.stride == (1, 1)
    hf_model.save_pretrained(tmp_path)  # model.safetensors with `resnet.` prefixed keys and a `classifier.1` head
    reference, info = transformers.ResNetBackbone.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    reference.eval()

    backbone = tiny_resnet("7x7", output_stride=32)
    load_backbone_weights(backbone, str(tmp_path))
    backbone.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = backbone(x)
        theirs = reference(x).feature_maps
    assert len(theirs) == 4
    for our_stage, their_stage in zip(ours[1:], theirs):
        torch.testing.assert_close(our_stage, their_stage, rtol=1e-5, atol=1e-5)

    # With output_stride=8 only the dilation of layer3 / layer4 changes: the very same weights load, the stages
    # before the dilated ones are unchanged, and layer3 / layer4 stay at stride 8.
    dilated = tiny_resnet("7x7", output_stride=8)
    load_backbone_weights(dilated, str(tmp_path))
    dilated.eval()
    assert_same_state(dilated, backbone)
    with torch.no_grad():
        dilated_out = dilated(x)
    torch.testing.assert_close(dilated_out[1], theirs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dilated_out[2], theirs[1], rtol=1e-5, atol=1e-5)
    assert dilated_out[3].shape[-2:] == dilated_out[4].shape[-2:] == (8, 8)


def test_resnet_7x7_loads_safetensors_file_without_prefix(tmp_path):
    transformers, config = _tiny_transformers_config()
    torch.manual_seed(1)
    hf_model = randomize(transformers.ResNetModel(config), seed=1)
    hf_model.save_pretrained(tmp_path)  # base model: keys without the `resnet.` prefix
    backbone = tiny_resnet("7x7", output_stride=32)
    load_backbone_weights(backbone, str(tmp_path / "model.safetensors"))
    backbone.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        hidden = hf_model(x, output_hidden_states=True).hidden_states
        ours = backbone(x)
    for our_stage, their_stage in zip(ours, hidden):
        torch.testing.assert_close(our_stage, their_stage, rtol=1e-5, atol=1e-5)


def test_transformers_layout_refused_for_deep_stem(tmp_path):
    transformers, config = _tiny_transformers_config()
    transformers.ResNetModel(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="stem='7x7'"):
        load_backbone_weights(tiny_resnet("deep"), str(tmp_path))


def _to_torchvision_resnet_keys(state_dict: dict) -> dict:
    # PSPNet / torchvision layout: the stem's children sit at the top level.
    return {key.removeprefix("layer0."): value for key, value in state_dict.items()}


def test_resnet_deep_stem_loads_torchvision_pspnet_layout(tmp_path):
    source = randomize(tiny_resnet(), seed=2)
    state = _to_torchvision_resnet_keys(source.state_dict())
    assert {"conv1.weight", "bn3.running_var", "layer1.0.downsample.0.weight"} <= state.keys()
    # num_batches_tracked is optional; fc is an ImageNet head and is ignored.
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.randn(10, 32 * W), torch.randn(10)
    path = tmp_path / "resnet50_v2.safetensors"
    save_file(state, str(path))

    backbone = tiny_resnet()
    load_backbone_weights(backbone, str(path))
    backbone.eval()
    assert_same_state(backbone, source)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(backbone(x), source(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resnet_7x7_loads_torchvision_layout(tmp_path):
    source = randomize(tiny_resnet("7x7"), seed=3)
    save_file(_to_torchvision_resnet_keys(source.state_dict()), str(tmp_path / "model.safetensors"))
    backbone = tiny_resnet("7x7")
    load_backbone_weights(backbone, str(tmp_path))
    assert_same_state(backbone, source)
    # A backbone built on the meta device (as transformers does before loading) gets real tensors.
    with torch.device("meta"):
        on_meta = tiny_resnet("7x7")
    load_backbone_weights(on_meta, str(tmp_path))
    assert not any(p.is_meta for p in on_meta.parameters())
    assert_same_state(on_meta.eval(), source)


def test_pfenet_key_map_and_official_stem(tmp_path):
    assert pfenet_backbone_key_map("layer0.0.weight") == "layer0.conv1.weight"
    assert pfenet_backbone_key_map("layer0.1.running_mean") == "layer0.bn1.running_mean"
    assert pfenet_backbone_key_map("layer0.3.weight") == "layer0.conv2.weight"
    assert pfenet_backbone_key_map("layer0.4.bias") == "layer0.bn2.bias"
    assert pfenet_backbone_key_map("layer0.6.weight") == "layer0.conv3.weight"
    assert pfenet_backbone_key_map("module.layer0.7.num_batches_tracked") == "layer0.bn3.num_batches_tracked"
    assert pfenet_backbone_key_map("layer3.2.downsample.1.weight") == "layer3.2.downsample.1.weight"
    assert pfenet_backbone_key_map("layer0.conv2.weight") == "layer0.conv2.weight"
    assert pfenet_backbone_key_map("layer0.4.weight", backbone="vgg16_bn") == "layer0.4.weight"
    with pytest.raises(ValueError, match="down_query"):
        pfenet_backbone_key_map("down_query.0.weight")
    with pytest.raises(ValueError, match="layer0.2.weight"):
        pfenet_backbone_key_map("layer0.2.weight")

    # An official-style stem: nn.Sequential(conv1, bn1, relu1, conv2, bn2, relu2, conv3, bn3, relu3, maxpool).
    official_stem = randomize(
        nn.Sequential(
            nn.Conv2d(3, W, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(W),
            nn.ReLU(),
            nn.Conv2d(W, W, 3, padding=1, bias=False),
            nn.BatchNorm2d(W),
            nn.ReLU(),
            nn.Conv2d(W, 2 * W, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * W),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        ),
        seed=4,
    )
    body = randomize(tiny_resnet(), seed=5)
    official = {f"module.layer0.{k}": v for k, v in official_stem.state_dict().items()}
    official.update({f"module.{k}": v for k, v in body.state_dict().items() if not k.startswith("layer0.")})
    save_file(official, str(tmp_path / "model.safetensors"))

    backbone = tiny_resnet()
    load_backbone_weights(backbone, str(tmp_path))
    backbone.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.layer0(x), official_stem(x), rtol=0, atol=0)
    assert_same_state(backbone, body, skip=("layer0.",))


# ----------------------------------------------------------------------------------------------------------------
# Errors and Hub ids
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def resnet_checkpoint(tmp_path):
    state = _to_torchvision_resnet_keys(randomize(tiny_resnet(), seed=6).state_dict())
    return state, tmp_path


def test_missing_key_is_named(resnet_checkpoint):
    state, tmp_path = resnet_checkpoint
    del state["layer2.0.conv2.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing.*layer2\.0\.conv2\.weight") as error:
        load_backbone_weights(tiny_resnet(), str(tmp_path))
    assert "model.safetensors" in str(error.value)


def test_unexpected_key_is_named(resnet_checkpoint):
    state, tmp_path = resnet_checkpoint
    state["layer2.0.conv4.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected.*layer2\.0\.conv4\.weight"):
        load_backbone_weights(tiny_resnet(), str(tmp_path))


def test_wrong_shape_is_named(resnet_checkpoint):
    state, tmp_path = resnet_checkpoint
    state["layer3.0.bn1.running_var"] = torch.ones(7)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"layer3\.0\.bn1\.running_var.*\(7,\).*\(32,\)"):
        load_backbone_weights(tiny_resnet(), str(tmp_path))


def test_wrong_architecture_and_bad_paths(resnet_checkpoint):
    state, tmp_path = resnet_checkpoint
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="cannot be loaded into VGG16BN"):
        load_backbone_weights(build_backbone("vgg16_bn", base_width=W), str(tmp_path))
    with pytest.raises(ValueError, match="Shape mismatch"):
        load_backbone_weights(build_backbone("resnet50", base_width=16, depths=TINY_DEPTHS), str(tmp_path))
    pickled = tmp_path / "resnet.pth"
    pickled.write_bytes(b"not read")
    with pytest.raises(ValueError, match="safetensors"):
        load_backbone_weights(tiny_resnet(), str(pickled))
    with pytest.raises(FileNotFoundError):
        load_backbone_weights(tiny_resnet(), str(tmp_path / "absent.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_backbone_weights(tiny_resnet(), str(tmp_path / "empty"))


def test_hub_repo_id_downloads_model_safetensors(resnet_checkpoint, monkeypatch):
    state, tmp_path = resnet_checkpoint
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    calls = []

    def fake_download(repo_id, filename, revision=None, **kwargs):
        calls.append((repo_id, filename, revision))
        return str(path)

    monkeypatch.setattr(weights_module, "hf_hub_download", fake_download)
    backbone = tiny_resnet()
    load_backbone_weights(backbone, "microsoft/resnet-50-tiny-test")
    load_backbone_weights(backbone, "microsoft/resnet-50-tiny-test", revision="v1")
    assert calls == [
        ("microsoft/resnet-50-tiny-test", "model.safetensors", None),
        ("microsoft/resnet-50-tiny-test", "model.safetensors", "v1"),
    ]
    torch.testing.assert_close(backbone.layer0.conv1.weight, state["conv1.weight"], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# VGG weights
# ----------------------------------------------------------------------------------------------------------------


def torchvision_vgg16_features(batch_norm: bool, ceil_mode: bool) -> nn.Sequential:
    """torchvision's `vgg16(_bn)().features` (configuration D) at base width W, written out by hand."""
    layers: list[nn.Module] = []
    in_channels = 3
    for v in (W, W, "M", 2 * W, 2 * W, "M", 4 * W, 4 * W, 4 * W, "M", 8 * W, 8 * W, 8 * W, "M") + (8 * W,) * 3:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=ceil_mode))
            continue
        layers.append(nn.Conv2d(in_channels, v, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU())
        in_channels = v
    layers.append(nn.MaxPool2d(2, 2, ceil_mode=ceil_mode))  # pool5
    return nn.Sequential(*layers)


def save_torchvision_vgg(features: nn.Sequential, path) -> None:
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    # ImageNet heads, torchvision's and timm's, are ignored.
    state["classifier.0.weight"] = torch.randn(3, 4)
    state["pre_logits.fc1.weight"] = torch.randn(3, 4)
    state["head.fc.bias"] = torch.randn(3)
    save_file(state, str(path))


def test_vgg16_bn_loads_torchvision_layout(tmp_path):
    reference = randomize(torchvision_vgg16_features(batch_norm=True, ceil_mode=True), seed=7)
    assert len(reference) == 44
    save_torchvision_vgg(reference, tmp_path / "model.safetensors")
    backbone = build_backbone("vgg16_bn", base_width=W)
    load_backbone_weights(backbone, str(tmp_path))
    backbone.eval()
    # PFENet's official names are ours: features[24:34] is layer3, so features.28 (bn4_2) is layer3.4.
    torch.testing.assert_close(
        backbone.state_dict()["layer3.4.running_mean"], reference.state_dict()["28.running_mean"], rtol=0, atol=0
    )
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        ours = backbone(x)
        bounds = (0, 7, 14, 24, 34, 43)
        h = x
        for stage in range(5):
            h = reference[bounds[stage] : bounds[stage + 1]](h)
            torch.testing.assert_close(ours[stage], h, rtol=1e-5, atol=1e-5)


def _smcp_reference(vgg16: nn.Sequential, fc6: nn.Conv2d, fc7: nn.Conv2d) -> nn.Sequential:
    # SMCP's Encoder: drop pool4 / pool5, dilate conv5_x by 2, append fc6, ReLU, fc7, ReLU.
    features = [vgg16[i] for i in list(range(23)) + list(range(24, 30))]
    for i in (23, 25, 27):
        features[i].dilation, features[i].padding = (2, 2), (2, 2)
    return nn.Sequential(*features, fc6, nn.ReLU(), fc7, nn.ReLU()).eval()


def test_vgg16_dilated_loads_torchvision_layout(tmp_path):
    vgg16 = randomize(torchvision_vgg16_features(batch_norm=False, ceil_mode=False), seed=8)
    assert len(vgg16) == 31
    save_torchvision_vgg(vgg16, tmp_path / "vgg16.safetensors")
    backbone = build_backbone("vgg16_dilated", base_width=W)
    fc6_before = backbone.layer4[6].weight.clone()
    load_backbone_weights(backbone, str(tmp_path / "vgg16.safetensors"))
    backbone.eval()
    # fc6 / fc7 are not in ImageNet VGG-16: they keep their initialisation.
    torch.testing.assert_close(backbone.layer4[6].weight, fc6_before, rtol=0, atol=0)

    reference = _smcp_reference(vgg16, backbone.layer4[6], backbone.layer4[8])
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        ours = backbone(x)
        h = x
        for stage, (start, stop) in enumerate(zip((0, 5, 10, 17, 23), (5, 10, 17, 23, 33))):
            h = reference[start:stop](h)
            torch.testing.assert_close(ours[stage], h, rtol=1e-5, atol=1e-5)


def test_vgg16_dilated_loads_smcp_layout_and_key_map(tmp_path):
    assert smcp_backbone_key_map("features.0.weight") == "layer0.0.weight"
    assert smcp_backbone_key_map("features.7.bias") == "layer1.2.bias"
    assert smcp_backbone_key_map("features.14.weight") == "layer2.4.weight"
    assert smcp_backbone_key_map("features.21.weight") == "layer3.4.weight"
    assert smcp_backbone_key_map("features.23.weight") == "layer4.0.weight"
    assert smcp_backbone_key_map("module.features.27.bias") == "layer4.4.bias"
    assert smcp_backbone_key_map("features.29.weight") == "layer4.6.weight"
    assert smcp_backbone_key_map("features.31.bias") == "layer4.8.bias"
    with pytest.raises(ValueError):
        smcp_backbone_key_map("features.33.weight")
    with pytest.raises(ValueError):
        smcp_backbone_key_map("feat_rd.0.weight")

    vgg16 = randomize(torchvision_vgg16_features(batch_norm=False, ceil_mode=False), seed=9)
    fc6, fc7 = nn.Conv2d(8 * W, 8 * W, 3, padding=4, dilation=4), nn.Conv2d(8 * W, 8 * W, 3, padding=4, dilation=4)
    reference = randomize(_smcp_reference(vgg16, fc6, fc7), seed=10)
    state = {f"features.{k}": v for k, v in reference.state_dict().items()}
    state["classifier.conv2d_list.0.weight"] = torch.randn(2, 2)
    save_file(state, str(tmp_path / "model.safetensors"))
    backbone = build_backbone("vgg16_dilated", base_width=W)
    load_backbone_weights(backbone, str(tmp_path))
    backbone.eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x)[-1], reference(x), rtol=1e-5, atol=1e-5)


def test_vgg_native_layout_roundtrip_and_wrong_variant(tmp_path):
    source = randomize(build_backbone("vgg16_bn", base_width=W), seed=11)
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    backbone = build_backbone("vgg16_bn", base_width=W)
    load_backbone_weights(backbone, str(tmp_path))
    assert_same_state(backbone, source)
    # The batch-norm VGG's stage indices do not fit the plain one (conv where it has bias-only BN, or a ReLU).
    with pytest.raises(ValueError, match=r"layer\d\.\d+\."):
        load_backbone_weights(build_backbone("vgg16_dilated", base_width=W), str(tmp_path))
    assert isinstance(backbone, VGG16BN) and isinstance(build_backbone("vgg16_dilated", base_width=W), DilatedVGG16)


# --- MoCo checkpoints (the prior extractor's pretraining layout) -----------------------------------------------------
def _moco_checkpoint(key_encoder: nn.Module, query_encoder: nn.Module, prefix: str) -> dict:
    """MoCo v2's `main_moco.py` state dict: two torchvision ResNets with a 2-layer MLP `fc`, and the queue."""
    state = {}
    for name, encoder in (("encoder_k", key_encoder), ("encoder_q", query_encoder)):
        for key, value in _to_torchvision_resnet_keys(encoder.state_dict()).items():
            state[f"{prefix}{name}.{key}"] = value.contiguous()
        for layer, shape in (("fc.0", (32 * W, 32 * W)), ("fc.2", (16, 32 * W))):
            state[f"{prefix}{name}.{layer}.weight"] = torch.randn(shape)
            state[f"{prefix}{name}.{layer}.bias"] = torch.randn(shape[0])
    state[f"{prefix}queue"] = torch.randn(16, 64)
    state[f"{prefix}queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return state


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_moco_checkpoint_loads_its_key_encoder_into_a_7x7_backbone(tmp_path, prefix):
    key_encoder = randomize(tiny_resnet(stem="7x7"), seed=3)
    query_encoder = randomize(tiny_resnet(stem="7x7"), seed=4)
    path = tmp_path / "moco.safetensors"
    save_file(_moco_checkpoint(key_encoder, query_encoder, prefix), str(path))
    x = torch.randn(1, 3, 41, 41)
    for encoder, source in (("encoder_k", key_encoder), ("encoder_q", query_encoder)):
        loaded = tiny_resnet(stem="7x7").eval()
        loaded.load_weights(str(path), moco_encoder=encoder)
        with torch.no_grad():
            for got, expected in zip(loaded(x), source.eval()(x)):
                torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_moco_checkpoint_missing_one_key_is_refused_naming_it(tmp_path):
    state = _moco_checkpoint(tiny_resnet(stem="7x7"), tiny_resnet(stem="7x7"), "module.")
    del state["module.encoder_k.layer3.0.bn2.running_var"]
    path = tmp_path / "moco.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"missing from the checkpoint: layer3\.0\.bn2\.running_var"):
        tiny_resnet(stem="7x7").load_weights(str(path))
    with pytest.raises(ValueError, match="moco_encoder must be one of"):
        tiny_resnet(stem="7x7").load_weights(str(path), moco_encoder="encoder")
