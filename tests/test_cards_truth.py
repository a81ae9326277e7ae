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
