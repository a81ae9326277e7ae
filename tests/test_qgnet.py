"""QGNet: the two region maps, the prior extractor (weights, BN policy, once per query), K-shot, the tester mixin."""

import importlib.util
import json
from pathlib import Path

import pytest
import test_hub
import torch
from conftest import TINY_DINOV2, TINY_HF_RESNET, TINY_RESNET, random_episode
from huggingface_hub.errors import StrictDataclassError
from modeling_common import FewShotModelTesterMixin, assert_extractor_skipped_by_sync_batchnorm
from safetensors.torch import save_file
from transformers import AutoModel

from hf_fss import QGNetConfig, QGNetModel
from hf_fss.models.qgnet import prior_region_map
from hf_fss.models.qgnet.convert_qgnet import convert_qgnet_state_dict, original_key_to_ours, our_key_to_original

ROOT = Path(__file__).resolve().parents[1]
hub_calls = test_hub.hub_calls  # the fixture recording Hub calls instead of sending them

TINY_PRIOR = {"stem": "7x7", **TINY_RESNET}
TINY = {
    "backbone_kwargs": dict(TINY_RESNET),
    "prior_extractor_kwargs": dict(TINY_PRIOR),
    "reduce_dim": 16,
    "pyramid_bins": (9, 4, 2, 1),
    "image_size": 65,
}


def tiny_model(**overrides) -> QGNetModel:
    torch.manual_seed(0)
    return QGNetModel(QGNetConfig(**{**TINY, **overrides})).eval()


pytestmark = pytest.mark.usefixtures("no_onednn")  # conftest: native conv kernels, cheaper for tiny convs


# --- configuration ---------------------------------------------------------------------------------------------------
def test_config_defaults_follow_the_official_code_and_validate():
    config = QGNetConfig()
    assert (config.backbone, config.backbone_kwargs, config.prior_extractor_backbone) == ("resnet50", None, "resnet50")
    assert config.prior_extractor_kwargs == {"stem": "7x7"} and config.prior_extractor_moco_encoder == "encoder_k"
    assert (config.reduce_dim, config.pyramid_bins, config.prior_eps, config.aux_loss_weight) == (
        256,
        (60, 30, 15, 8),
        1e-7,
        1.0,
    )
    assert config.region_projection == "learned" and config.projection_dropout == 0.5
    for bad in (
        {"backbone": "vgg16_dilated"},
        {"prior_extractor_backbone": "vgg16_bn"},
        {"prior_extractor_kwargs": {"stem": "7x7", "fc_channels": 3}},
        {"prior_extractor_moco_encoder": "encoder"},
        {"region_projection": "linear"},
        {"pyramid_bins": ()},
        {"projection_dropout": 1.0},
        {"prior_eps": 0.0},
    ):
        with pytest.raises(StrictDataclassError, match=next(iter(bad))):
            QGNetConfig(**bad)


def test_full_size_model_has_the_official_layout():
    with torch.device("meta"):
        model = QGNetModel(QGNetConfig())
    state = model.state_dict()
    assert len(state) == 685  # as the official PFENet_QGNet(layers=50).state_dict()
    assert state["feature_enrichment.init_merge.0.0.weight"].shape == (256, 514, 1, 1)
    assert state["bridge_projection.0.weight"].shape == (256, 2048, 3, 3)
    assert state["prior_projection.0.weight"].shape == (256, 2048, 3, 3)
    assert state["prior_extractor.layer0.conv1.weight"].shape == (64, 3, 7, 7)
    assert model.prior_extractor.strides[-1] == 8 and model.prior_extractor.frozen


# --- the two maps ----------------------------------------------------------------------------------------------------
def test_prior_region_map_matches_a_direct_computation_on_non_square_maps():
    generator = torch.Generator().manual_seed(0)
    bridge, prior = torch.randn(2, 8, 3, 5, generator=generator), torch.randn(2, 8, 4, 2, generator=generator)
    got = prior_region_map(bridge, prior)
    for b in range(2):
        cos = torch.nn.functional.cosine_similarity(
            bridge[b].flatten(1).T.unsqueeze(1), prior[b].flatten(1).T.unsqueeze(0), dim=2, eps=1e-12
        )
        best = cos.amax(dim=1)
        expected = ((best - best.min()) / (best.max() - best.min() + 1e-7)).view(3, 5)
        torch.testing.assert_close(got[b, 0], expected, rtol=1e-5, atol=1e-5)
    assert got.amin() == 0 and got.amax() <= 1
    with pytest.raises(ValueError, match="agree on batch size and channels"):
        prior_region_map(bridge, prior[:, :4])


def test_prior_map_follows_the_prior_extractor_weights_and_not_the_support_set():
    model = tiny_model()
    query, support, masks, _ = random_episode(batch_size=2, shot=1, size=65)
    other_support, other_masks = torch.randn_like(support), masks.roll(10, dims=-1)
    with torch.no_grad():
        first = model(query, support, masks).maps
        second = model(query, other_support, other_masks).maps
        torch.testing.assert_close(second["prior_region"], first["prior_region"], rtol=0, atol=0)
        assert not torch.allclose(second["guided_region"], first["guided_region"])
        five = model(query, *random_episode(batch_size=2, shot=5, size=65)[1:3]).maps
        torch.testing.assert_close(five["prior_region"], first["prior_region"], rtol=0, atol=0)
        for parameter in model.prior_extractor.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
        changed = model(query, support, masks).maps
    assert (changed["prior_region"] - first["prior_region"]).abs().max() > 1e-2
    torch.testing.assert_close(changed["guided_region"], first["guided_region"], rtol=0, atol=0)


def test_prior_extractor_runs_once_per_query_batch_whatever_the_shot(monkeypatch):
    model = tiny_model()
    calls = {"prior_extractor": [], "backbone": []}
    for name in calls:
        extractor = getattr(model, name)
        original = extractor.forward_stages

        def counted(x, start, end, original=original, name=name):
            calls[name].append((x.shape[0], start, end))
            return original(x, start, end)

        monkeypatch.setattr(extractor, "forward_stages", counted)
    query, support, masks, _ = random_episode(batch_size=2, shot=5, size=65)
    with torch.no_grad():
        model(query, support, masks)
    assert calls["prior_extractor"] == [(2, 0, 5)]  # the two queries, never the ten supports
    assert (10, 0, 4) in calls["backbone"]
    calls["prior_extractor"].clear()
    with torch.no_grad():
        encoding = model.encode_support(support, masks)
        assert calls["prior_extractor"] == []
        model(query, support_encoding=encoding)
    assert calls["prior_extractor"] == [(2, 0, 5)]


def test_up_to_ten_shots_run():
    model = tiny_model()
    query, support, masks, _ = random_episode(batch_size=1, shot=10, size=65)
    with torch.no_grad():
        out = model(query, support, masks)
    assert out.logits.shape == (1, 2, 65, 65) and torch.isfinite(out.logits).all()


def test_projection_free_form_of_eq8():
    model = tiny_model(region_projection="raw")
    assert not hasattr(model, "bridge_projection") and not hasattr(model, "prior_projection")
    query, support, masks, _ = random_episode(batch_size=1, shot=1, size=65)
    with torch.no_grad():
        out = model(query, support, masks)
        _, _, _, _, layer4 = model.backbone(query)
        prior4 = model.prior_extractor(query)[-1]
    torch.testing.assert_close(out.maps["prior_region"], prior_region_map(layer4, prior4), rtol=0, atol=0)
    with pytest.raises(ValueError, match="region_projection='raw'"):
        tiny_model(region_projection="raw", prior_extractor_kwargs={"stem": "7x7", "base_width": 4})


# --- extractors: weights, BN policy ----------------------------------------------------------------------------------
def test_prior_extractor_loads_an_exported_folder_and_a_moco_file(tmp_path):
    source = tiny_model().prior_extractor
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.normal_()
    exported = tmp_path / "prior"
    exported.mkdir()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, exported / "model.safetensors")
    model = tiny_model(prior_extractor_weights=str(exported))
    assert model.pretrained_weight_sources() == {"prior_extractor": str(exported)}
    assert model.load_pretrained_extractors() == {"prior_extractor": str(exported)}
    for key, value in source.state_dict().items():
        assert torch.equal(model.prior_extractor.state_dict()[key], value), key

    # a MoCo checkpoint (torchvision names under encoder_q / encoder_k) saved as safetensors: encoder_q on request
    moco = {"queue": torch.zeros(4, 8), "queue_ptr": torch.zeros(1, dtype=torch.long)}
    for key, value in source.state_dict().items():
        name = key.removeprefix("layer0.")
        moco[f"encoder_q.{name}"] = value.clone()
        moco[f"encoder_k.{name}"] = torch.zeros_like(value)
    save_file(moco, tmp_path / "moco.safetensors")
    model = tiny_model(
        prior_extractor_weights=str(tmp_path / "moco.safetensors"), prior_extractor_moco_encoder="encoder_q"
    )
    model.load_pretrained_extractors()
    assert torch.equal(model.prior_extractor.layer4[0].conv2.weight, source.layer4[0].conv2.weight)


def test_missing_prior_extractor_folder_is_an_error_or_random_and_recorded(tmp_path):
    missing = str(tmp_path / "no_such_prior")
    with pytest.raises(FileNotFoundError):
        tiny_model(prior_extractor_weights=missing).load_pretrained_extractors()
    model = tiny_model(prior_extractor_weights=missing, prior_extractor_weights_if_missing="random")
    before = {k: v.clone() for k, v in model.prior_extractor.state_dict().items()}
    assert model.load_pretrained_extractors() == {}
    assert model.config.prior_extractor_weights is None  # the saved config and the card say "random"
    assert all(torch.equal(before[k], v) for k, v in model.prior_extractor.state_dict().items())


def test_batchnorm_policy_is_per_extractor():
    model = tiny_model(freeze_prior_extractor_batchnorm=False).train()
    assert not model.backbone.training and model.prior_extractor.training
    assert model.prior_extractor.frozen and not any(p.requires_grad for p in model.prior_extractor.parameters())
    model = tiny_model().train()
    assert not model.backbone.training and not model.prior_extractor.training
    assert_extractor_skipped_by_sync_batchnorm(model)


def test_training_loss_is_main_plus_weighted_aux():
    model = tiny_model(aux_loss_weight=0.3).train()
    query, support, masks, labels = random_episode(batch_size=2, shot=2, size=65)
    out = model(query, support, masks, labels=labels)
    assert set(out.losses) == {"main", "aux"}
    torch.testing.assert_close(out.loss.detach(), out.losses["main"] + 0.3 * out.losses["aux"])
    out.loss.backward()
    assert model.bridge_projection[0].weight.grad.abs().sum() > 0
    assert model.prior_projection[0].weight.grad.abs().sum() > 0


# --- the shared tester mixin -----------------------------------------------------------------------------------------
class TestQGNetModel(FewShotModelTesterMixin):
    model_class = QGNetModel
    config_kwargs = dict(TINY)
    image_size = 97
    image_width = 129


class TestQGNetVGGModel(TestQGNetModel):
    config_kwargs = {**TINY, "backbone": "vgg16_bn", "backbone_kwargs": {"base_width": 8}}


class TestQGNetDinov2Model(TestQGNetModel):
    """DINOv2 as the backbone and as the prior extractor."""

    config_kwargs = {**TINY, "backbone_config": TINY_DINOV2, "backbone_kwargs": None,
                     "prior_extractor_config": TINY_DINOV2, "prior_extractor_kwargs": None}  # fmt: skip


class TestQGNetTransformersResNetModel(TestQGNetModel):
    """transformers' ResNet as the backbone, DINOv2 as the prior extractor."""

    config_kwargs = {**TINY, "backbone_config": TINY_HF_RESNET, "backbone_kwargs": None,
                     "prior_extractor_config": TINY_DINOV2, "prior_extractor_kwargs": None}  # fmt: skip


# --- converter -------------------------------------------------------------------------------------------------------
def _cli():
    spec = importlib.util.spec_from_file_location("_convert_cli", ROOT / "scripts" / "convert_original_checkpoint.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def _official_checkpoint(model: QGNetModel) -> dict:
    """Our weights in the official layout, as train.py saves them around a DataParallel model."""
    state = {f"module.{our_key_to_original(k)}": v.clone() for k, v in model.state_dict().items()}
    return {"epoch": 200, "state_dict": state, "optimizer": {"state": {}, "param_groups": [{"lr": 0.025}]}}


def _deep_stem_model(**overrides) -> QGNetModel:
    model = tiny_model(pyramid_bins=(8, 4, 2, 1), **overrides)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-trivial BN statistics in both extractors
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
    return model


def test_official_key_map_is_a_bijection_on_the_full_size_layout():
    with torch.device("meta"):
        keys = list(QGNetModel(QGNetConfig()).state_dict())
    official = [our_key_to_original(k) for k in keys]
    assert len(set(official)) == 685
    assert {"layer0.0.weight", "layer0.7.running_var", "layer0_unsuper.0.weight", "layer0_unsuper.1.running_mean",
            "layer4_unsuper.2.conv3.weight", "down_learn_super.0.weight", "down_learn_unsuper.0.weight",
            "init_merge.3.0.weight", "inner_cls.0.3.bias", "cls.3.weight", "down_query.0.weight"} <= set(official)  # fmt: skip
    assert [original_key_to_ours(k) for k in official] == keys


def test_converter_round_trips_an_official_checkpoint_with_card_and_differences(tmp_path):
    source = _deep_stem_model()
    path = tmp_path / "train_epoch_200_0.6.pth"
    torch.save(_official_checkpoint(source), path)
    output = tmp_path / "converted"
    args = ["--model-type", "qgnet", "--checkpoint", str(path), "--output-dir", str(output), "--image-size", "65"]
    assert _cli().main([*args, "--shot", "5", "--pyramid-bins", "8", "4", "2", "1"]) == 0
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {
        p.name for p in output.iterdir()
    }
    card = (output / "README.md").read_text()
    assert "train_epoch_200_0.6.pth" in card and "Learned projections" in card and "+tau" not in card
    converted = AutoModel.from_pretrained(output).eval()
    assert type(converted) is QGNetModel and converted.config.shot == 5
    assert converted.config.prior_extractor_kwargs == TINY_PRIOR and converted.config.backbone_kwargs == TINY_RESNET
    query, support, masks, _ = random_episode(batch_size=1, shot=2, size=65)
    with torch.no_grad():
        torch.testing.assert_close(converted(query, support, masks).logits, source(query, support, masks).logits,
                                   rtol=0, atol=0)  # fmt: skip


def test_converter_names_missing_and_unexpected_keys():
    state = _official_checkpoint(_deep_stem_model())["state_dict"]
    del state["module.layer2_unsuper.0.bn1.running_var"]
    state["module.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['layer2_unsuper.0.bn1.running_var'\].*extra.weight"):
        convert_qgnet_state_dict(state, pyramid_bins=(8, 4, 2, 1))
    with pytest.raises(ValueError, match="not a QGNet checkpoint: 'down_learn_super.0.weight'"):
        convert_qgnet_state_dict({k: v for k, v in state.items() if "down_learn_super" not in k})


def _moco_checkpoint(encoder_k, encoder_q, prefix="module.") -> dict:
    """MoCo v2's main_moco.py checkpoint (torchvision names, MLP head, queues), with tensors, ints and strings."""
    state = {f"{prefix}queue": torch.randn(16, 32), f"{prefix}queue_ptr": torch.zeros(1, dtype=torch.long)}
    for name, encoder in (("encoder_q", encoder_q), ("encoder_k", encoder_k)):
        for key, value in encoder.state_dict().items():
            state[f"{prefix}{name}.{key.removeprefix('layer0.')}"] = value.clone()
        state[f"{prefix}{name}.fc.0.weight"] = torch.randn(64, 64)
        state[f"{prefix}{name}.fc.2.weight"] = torch.randn(16, 64)
    return {"epoch": 2000, "arch": "resnet50", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}


def _random_prior(seed):
    torch.manual_seed(seed)
    extractor = tiny_model().prior_extractor
    with torch.no_grad():
        for tensor in extractor.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_()
    return extractor


@pytest.mark.parametrize(("prefix", "encoder"), [("module.", None), ("", None), ("module.", "encoder_q")])
def test_moco_checkpoint_converts_to_a_prior_extractor_folder(tmp_path, prefix, encoder):
    encoder_k, encoder_q = _random_prior(1), _random_prior(2)
    path = tmp_path / "checkpoint_2000.pth.tar"
    torch.save(_moco_checkpoint(encoder_k, encoder_q, prefix), path)
    output = tmp_path / "prior"
    args = ["--model-type", "qgnet", "--checkpoint", str(path), "--output-dir", str(output)]
    assert _cli().main(args + (["--moco-encoder", encoder] if encoder else [])) == 0
    record = json.loads((output / "config.json").read_text())
    assert record["prior_extractor_kwargs"] == TINY_PRIOR and record["encoder"] == (encoder or "encoder_k")
    assert "checkpoint_2000.pth.tar" in (output / "README.md").read_text()
    model = tiny_model(prior_extractor_weights=str(output))
    model.load_pretrained_extractors()
    expected = encoder_q if encoder == "encoder_q" else encoder_k
    for key, value in expected.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(model.prior_extractor.state_dict()[key], value), key


def test_moco_checkpoint_missing_one_encoder_k_key_fails_naming_it(tmp_path, capsys):
    checkpoint = _moco_checkpoint(_random_prior(1), _random_prior(2))
    del checkpoint["state_dict"]["module.encoder_k.layer3.0.downsample.1.running_mean"]
    path = tmp_path / "checkpoint_0199.pth.tar"
    torch.save(checkpoint, path)
    args = ["--model-type", "qgnet", "--checkpoint", str(path), "--output-dir", str(tmp_path / "out")]
    assert _cli().main(args) == 2
    assert "missing: ['module.encoder_k.layer3.0.downsample.1.running_mean']" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()
    # the query encoder is complete, so asking for it converts
    assert _cli().main([*args, "--moco-encoder", "encoder_q"]) == 0


# --- model card ------------------------------------------------------------------------------------------------------
def test_card_says_where_the_prior_extractor_comes_from_and_lists_the_differences():
    from hf_fss.hub import render_model_card

    random_text = render_model_card(QGNetConfig(), training={"benchmark": "synthetic", "fold": 0}).text
    assert "random initialisation: no pretrained prior extractor was loaded" in random_text
    assert "no official weights exist for ResNet-101 or VGG-16" in random_text
    assert "Learned projections" in random_text and "Non-square inputs" in random_text
    loaded = render_model_card(QGNetConfig(prior_extractor_weights="./outputs/prior_quickstart")).text
    assert "weights loaded from `./outputs/prior_quickstart`" in loaded and "no pretrained prior" not in loaded
    converted = render_model_card(QGNetConfig(), training={"converted_from": "final.pth"}).text
    assert "weights from the converted checkpoint" in converted and "`final.pth`" in converted


# --- evaluate.py, the pipeline, push_to_hub with a QGNet model -------------------------------------------------------
@pytest.fixture(scope="module")
def saved_qgnet(tmp_path_factory):
    from hf_fss import FewShotSegmentationImageProcessor
    from hf_fss.hub import save_pretrained_with_card

    folder = tmp_path_factory.mktemp("qgnet") / "tiny-qgnet"
    training = {"benchmark": "synthetic", "fold": 0, "shot": 1}
    model = tiny_model(pyramid_bins=(1.0, 0.5))
    save_pretrained_with_card(model, FewShotSegmentationImageProcessor(image_size=65), folder, training=training)
    return folder


def test_evaluate_script_scores_a_qgnet_model(saved_qgnet, tmp_path):
    from hf_fss.evaluation.runner import main

    out = tmp_path / "metrics.json"
    flags = ["--dataset", "synthetic", "--synthetic-num-train", "0", "--synthetic-num-val", "60",
             "--synthetic-image-size", "128", "--num-threads", "1", "--fold", "0", "--shot", "2"]  # fmt: skip
    assert main(["--model", str(saved_qgnet), *flags, "--num-episodes", "4", "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["num_episodes"] == 4 and 0.0 <= metrics["miou"] <= 1.0


def test_pipeline_returns_both_region_maps_at_the_query_size(saved_qgnet):
    import numpy as np
    from transformers import pipeline

    rng = np.random.default_rng(0)
    query = (rng.random((70, 90, 3)) * 255).astype(np.uint8)
    support = (rng.random((60, 50, 3)) * 255).astype(np.uint8)
    segmenter = pipeline("few-shot-segmentation", model=str(saved_qgnet))
    result = segmenter(
        query, support_image=support, support_box=(5, 10, 30, 40), return_maps=True, output_type="numpy"
    )
    assert set(result["maps"]) == {"prior_region", "guided_region"}
    for value in result["maps"].values():
        assert value.shape == (70, 90) and 0.0 <= float(value.min()) <= float(value.max()) <= 1.0
    assert result["mask"].shape == (70, 90)


def test_push_to_hub_uploads_a_qgnet_folder_with_its_card(saved_qgnet, hub_calls):
    from huggingface_hub import ModelCard

    from hf_fss.hub import push_to_hub

    assert push_to_hub(saved_qgnet, "org/qgnet-tiny") == "commit-info"
    upload = next(kwargs for name, _, kwargs in hub_calls if name == "upload_folder")
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"} <= set(upload["uploaded"])
    card = ModelCard.load(saved_qgnet / "README.md")
    assert "qgnet" in card.data.tags and 'AutoModel.from_pretrained("org/qgnet-tiny")' in card.text
    assert "random initialisation: no pretrained prior extractor was loaded" in card.text
