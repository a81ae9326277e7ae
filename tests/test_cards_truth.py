"""Model cards state what is true of the model they describe: where its backbone weights come from, how to load it."""

import pytest
import torch
from conftest import TINY_RESNET

from hf_fss import (
    CosinePriorConfig,
    CosinePriorModel,
    CRCNetConfig,
    FewShotSegmentationImageProcessor,
    NTRENetConfig,
    NTRENetModel,
    QGNetConfig,
    QGNetModel,
    SMCPConfig,
    SMCPModel,
)
from hf_fss.hub import render_model_card, save_pretrained_with_card

TINY_NTRENET = {"reduce_dim": 16, "background_prototype_dim": 24, "pyramid_bins": (9, 4, 2, 1), "image_size": 65}
TINY_QGNET = {"reduce_dim": 16, "pyramid_bins": (9, 4, 2, 1), "image_size": 65,
              "prior_extractor_kwargs": {"stem": "7x7", **TINY_RESNET}}  # fmt: skip
TINY_SMCP = {"reduce_dim": 16, "bottleneck_dim": 8, "image_size": 65}
TINY_KWARGS = {
    NTRENetConfig: TINY_NTRENET,
    QGNetConfig: TINY_QGNET,
    SMCPConfig: TINY_SMCP,
    CosinePriorConfig: {"image_size": 65},
}
RANDOM = "random initialisation: no pretrained weights were loaded (use_pretrained_backbone=False)"


@pytest.mark.parametrize("config_class", [NTRENetConfig, QGNetConfig, SMCPConfig, CosinePriorConfig, CRCNetConfig])
def test_a_random_backbone_is_not_called_imagenet_pretrained(config_class):
    text = render_model_card(config_class(), training={"benchmark": "synthetic", "fold": 0, "shot": 1}).text
    assert RANDOM in text
    assert "ImageNet-pretrained weights" not in text and "ImageNet backbone" not in text
    assert "weights are those of the ImageNet-pretrained backbone" not in text


@pytest.mark.parametrize("config_class", [NTRENetConfig, QGNetConfig, CosinePriorConfig, CRCNetConfig])
def test_pretrained_backbone_weights_are_named_from_the_config(config_class):
    config = config_class(backbone_kwargs={"stem": "7x7"}, use_pretrained_backbone=True)
    text = render_model_card(config).text
    assert "ImageNet-pretrained weights from microsoft/resnet-50" in text and RANDOM not in text
    config = config_class(use_pretrained_backbone=True, pretrained_backbone_name_or_path="my/weights")
    assert "ImageNet-pretrained weights from my/weights" in render_model_card(config).text


def test_a_converted_checkpoint_names_the_official_code_checkpoint():
    text = render_model_card(NTRENetConfig(), training={"converted_from": "train_epoch_200.pth"}).text
    assert "weights: the weights of the converted official-code checkpoint" in text and RANDOM not in text


@pytest.mark.parametrize(
    "model_class, config_class",
    [
        (NTRENetModel, NTRENetConfig),
        (QGNetModel, QGNetConfig),
        (SMCPModel, SMCPConfig),
        (CosinePriorModel, CosinePriorConfig),
    ],
)
def test_a_saved_card_loads_from_the_path_it_was_saved_to(tmp_path, monkeypatch, model_class, config_class):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    kwargs = TINY_KWARGS[config_class]
    backbone_kwargs = {"base_width": 4} if config_class is SMCPConfig else dict(TINY_RESNET)
    model = model_class(config_class(backbone_kwargs=backbone_kwargs, **kwargs))
    processor = FewShotSegmentationImageProcessor(image_size=65)
    folder = save_pretrained_with_card(model, processor, "outputs/quickstart/final")
    text = (folder / "README.md").read_text()
    assert 'AutoModel.from_pretrained("outputs/quickstart/final")' in text
    assert 'from_pretrained("final")' not in text


def test_the_smcp_card_states_its_protocol_and_differences():
    from hf_fss.models.smcp import DIFFERENCES_FROM_OFFICIAL_CODE

    text = render_model_card(SMCPConfig(), training={"converted_from": "25000.pth"}).text
    assert "trainaug" in text and "pascal5i_vgg16_code.yaml" in text and "pascal5i_vgg16_paper.yaml" in text
    assert "1 / (K + 1)" in text and "shot_fusion" not in text  # SMCP has no shot_fusion field
    assert all(item in text for item in DIFFERENCES_FROM_OFFICIAL_CODE)


def test_the_crcnet_card_lists_every_open_point_with_the_choice_taken():
    from hf_fss.models.crcnet import DIFFERENCES_FROM_PAPER

    text = render_model_card(CRCNetConfig()).text
    assert "No official code exists" in text
    for item in DIFFERENCES_FROM_PAPER:
        assert item in text
    for point in range(1, 15):  # the 14 open points of the method notes, each with its choice
        assert any(item.startswith(f"({point}) ") for item in DIFFERENCES_FROM_PAPER), point
    config = CRCNetConfig()
    assert config.refinement_steps == 10 and config.inference_scales == (0.75, 1.0, 1.25)  # as the card's defaults
    assert config.shot_fusion == "finetune+average" and '`"finetune+average"`' in text


def test_the_crcnet_card_states_the_finetuning_divergence_guard_of_its_checkpoint():
    text = render_model_card(CRCNetConfig(finetune_max_loss_ratio=4.0)).text
    assert "not in the paper" in text and "exceeds 4.0 times the first step's (`finetune_max_loss_ratio`)" in text
    assert "keeps the unadapted modules" in text and "exceeds 10.0 times" not in text
    default = render_model_card(CRCNetConfig()).text
    assert "exceeds 10.0 times the first step's" in default and CRCNetConfig().finetune_max_loss_ratio == 10.0


@pytest.mark.parametrize("config_class", [QGNetConfig, SMCPConfig, CRCNetConfig])
def test_the_card_names_the_data_the_weights_were_trained_on(config_class):
    synthetic = render_model_card(config_class(), training={"benchmark": "synthetic", "fold": 0, "shot": 1}).text
    assert "Trained on the hf_fss synthetic benchmark" in synthetic and "natural photos (PASCAL VOC" not in synthetic
    pascal = render_model_card(config_class(), training={"benchmark": "pascal5i", "fold": 0, "shot": 1}).text
    assert "Trained on PASCAL-5i; other image domains are out of distribution" in pascal


@pytest.fixture
def dinov2_folder(tmp_path):
    """A local folder written by `Dinov2Backbone.save_pretrained` (standing in for facebook/dinov2-small)."""
    from conftest import TINY_DINOV2
    from transformers import Dinov2Backbone, Dinov2Config

    config = Dinov2Config(**{k: v for k, v in TINY_DINOV2.items() if k != "model_type"}, out_indices=[1, 2, 3, 4])
    Dinov2Backbone(config).save_pretrained(tmp_path / "dinov2")
    return str(tmp_path / "dinov2")


def test_a_card_says_random_when_the_asked_for_weights_were_never_loaded(dinov2_folder, tmp_path):
    from transformers import AutoModel

    model = CosinePriorModel(CosinePriorConfig(backbone=dinov2_folder, use_pretrained_backbone=True, image_size=65))
    folder = save_pretrained_with_card(model, None, tmp_path / "random")
    text = (folder / "README.md").read_text()
    assert "random initialisation. Warning: the config asks for the weights of " + dinov2_folder in text
    assert f"DINOv2 weights from {dinov2_folder}" not in text
    assert AutoModel.from_pretrained(folder).config.loaded_pretrained_weights == {}  # re-saved, still random

    assert model.load_pretrained_extractors() == {"backbone": dinov2_folder}
    folder = save_pretrained_with_card(model, None, tmp_path / "loaded")
    assert f"DINOv2 weights from {dinov2_folder}" in (folder / "README.md").read_text()
    reloaded = AutoModel.from_pretrained(folder)  # the saved weights are those loaded: the record is kept
    assert reloaded.config.loaded_pretrained_weights == {"backbone": dinov2_folder}
    resaved = save_pretrained_with_card(reloaded, None, tmp_path / "resaved")
    assert f"DINOv2 weights from {dinov2_folder}" in (resaved / "README.md").read_text()
    # A model built from the saved config has random weights again, whatever the record in that config said.
    assert CosinePriorModel(reloaded.config).config.loaded_pretrained_weights == {}


def test_a_folder_saved_before_the_record_keeps_the_card_its_config_gave(tmp_path):
    import json

    from transformers import AutoModel

    model = NTRENetModel(NTRENetConfig(**TINY_NTRENET, backbone_kwargs={"stem": "7x7", **TINY_RESNET}))
    model.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["loaded_pretrained_weights"]
    config["use_pretrained_backbone"] = True  # what an older trainer saved after loading microsoft/resnet-50
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded = AutoModel.from_pretrained(tmp_path / "old")
    assert loaded.config.loaded_pretrained_weights == {"backbone": "microsoft/resnet-50"}


def test_seggpt_and_qgnet_prior_cards_follow_what_was_loaded(tmp_path, dinov2_folder):
    from conftest import TINY_SEGGPT
    from transformers import SegGptConfig, SegGptForImageSegmentation

    from hf_fss import SegGptFssConfig, SegGptFssModel

    SegGptForImageSegmentation(SegGptConfig(**TINY_SEGGPT)).save_pretrained(tmp_path / "seggpt")
    seggpt = str(tmp_path / "seggpt")
    model = SegGptFssModel(SegGptFssConfig(seggpt_config=SegGptConfig(**TINY_SEGGPT), seggpt_name_or_path=seggpt))
    text = render_model_card(model.config).text
    assert f"SegGPT weights from {seggpt}" not in text and "the config asks for the weights of " + seggpt in text
    model.load_pretrained_extractors()
    assert f"SegGPT weights from {seggpt}" in render_model_card(model.config).text

    config = QGNetConfig(**{**TINY_QGNET, "backbone_kwargs": TINY_RESNET, "prior_extractor_kwargs": None},
                         prior_extractor_backbone=dinov2_folder, prior_extractor_weights=dinov2_folder)  # fmt: skip
    model = QGNetModel(config)
    text = render_model_card(model.config).text
    assert f"Prior extractor: {dinov2_folder}, frozen," in text and "`{}`" not in text
    assert "weights loaded from" not in text and f"weights of {dinov2_folder} (prior_extractor_weights)" in text
    model.load_pretrained_extractors()
    assert f"weights loaded from `{dinov2_folder}` when training started." in render_model_card(model.config).text


def test_training_warns_when_a_named_backbone_keeps_random_weights(dinov2_folder):
    from hf_fss.training.episodic import random_named_backbone_note

    config = NTRENetConfig(**TINY_NTRENET, backbone=dinov2_folder, backbone_kwargs=None)
    note = random_named_backbone_note(config)
    assert note == (
        f"backbone: the architecture of {dinov2_folder} with random weights; set use_pretrained_backbone: true to "
        "start from its weights"
    )
    assert random_named_backbone_note(NTRENetConfig(**TINY_NTRENET, backbone=dinov2_folder, backbone_kwargs=None,
                                                    use_pretrained_backbone=True)) is None  # fmt: skip
    assert random_named_backbone_note(NTRENetConfig(**TINY_NTRENET)) is None  # an hf_fss ResNet: nothing named


def test_resnet_kwargs_left_beside_a_transformers_backbone_name_the_fix(dinov2_folder):
    with pytest.raises(ValueError) as error:
        NTRENetModel(NTRENetConfig(**TINY_NTRENET, backbone=dinov2_folder, backbone_kwargs=TINY_RESNET))
    message = str(error.value)
    assert "'base_width' in backbone_kwargs" in message and "no field of Dinov2Config" in message
    assert "for hf_fss's own ResNet / VGG" in message and '"backbone_kwargs": null' in message
    assert "\n" not in message


def test_the_card_states_the_schedule_as_the_training_log_does(tmp_path, caplog):
    import logging

    import yaml
    from conftest import reset_accelerate
    from test_training import TINY_RECIPE

    from hf_fss.training import main

    text = render_model_card(
        NTRENetConfig(), training={"max_steps": 120, "epochs": 120 / 67, "steps_per_epoch": 67}
    ).text
    assert "| schedule | 120 steps = 1.79 epochs of 67 steps |" in text and "1.79104" not in text
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**TINY_RECIPE, "max_steps": 30, "evaluate_at_end": False}))
    reset_accelerate()
    caplog.set_level(logging.INFO, logger="hf_fss.training.episodic")
    assert main(["--config", str(recipe), "--output-dir", str(tmp_path / "run")]) == 0
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    schedule = next(line for line in card.splitlines() if line.startswith("| schedule |")).split("|")[2].strip()
    assert schedule.startswith("30 steps = ") and not schedule.endswith("= 1.00 epochs of 30 steps")
    assert any(schedule in record.getMessage() for record in caplog.records)  # the log says the same words
