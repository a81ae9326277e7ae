"""Nothing loads silently wrong: missing / unexpected weights, damaged weight files, misspelt or mistyped config fields."""

import json

import pytest
import torch
from conftest import TINY_RESNET
from huggingface_hub.errors import StrictDataclassFieldValidationError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

from hf_fss import (
    CosinePriorConfig,
    CosinePriorModel,
    FewShotSegmentationConfig,
    NTRENetConfig,
    NTRENetModel,
    QGNetModel,
)

TINY_NTRENET = {"reduce_dim": 16, "background_prototype_dim": 24, "pyramid_bins": (9, 4, 2, 1), "image_size": 65}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    NTRENetModel(NTRENetConfig(backbone_kwargs=dict(TINY_RESNET), **TINY_NTRENET)).save_pretrained(folder)
    return folder


def _copy_with(saved, tmp_path, edit):
    folder = tmp_path / "edited"
    folder.mkdir()
    (folder / "config.json").write_text((saved / "config.json").read_text())
    state = load_file(saved / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_a_complete_folder_loads_and_reports_nothing_missing(saved):
    model, info = NTRENetModel.from_pretrained(saved, output_loading_info=True)
    assert isinstance(model, NTRENetModel) and not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.parametrize("loader", [NTRENetModel.from_pretrained, AutoModel.from_pretrained])
def test_missing_weights_are_refused_naming_them(saved, tmp_path, loader):
    # A frozen backbone weight (its modules are marked `_is_hf_initialized`) and a head weight.
    dropped = ["backbone.layer1.0.conv1.weight", "bg_cls.0.weight"]

    def drop(state):
        for key in dropped:
            del state[key]

    folder = _copy_with(saved, tmp_path, drop)
    with pytest.raises(ValueError, match="lacks 2 weight") as error:
        loader(folder)
    message = str(error.value)
    assert str(folder / "model.safetensors") in message and all(key in message for key in dropped)


def test_unexpected_weights_are_refused_naming_them(saved, tmp_path):
    folder = _copy_with(saved, tmp_path, lambda state: state.update({"extra_head.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"holds 1 weight\(s\) it does not have: extra_head.weight"):
        NTRENetModel.from_pretrained(folder)


@pytest.mark.parametrize("cut", ["empty", "header", "half"])
def test_an_empty_or_truncated_weights_file_is_refused_naming_it(saved, tmp_path, cut):
    folder = _copy_with(saved, tmp_path, lambda state: None)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(
        {"empty": b"", "header": data[:20], "half": data[: len(data) // 2]}[cut]
    )
    with pytest.raises(OSError, match="model.safetensors is not a complete safetensors file") as error:
        AutoModel.from_pretrained(folder)
    assert str(folder / "model.safetensors") in str(error.value)


@pytest.mark.parametrize(
    "config_class, field, meant",
    [
        (NTRENetConfig, "image_sise", "image_size"),
        (NTRENetConfig, "reduce_dimm", "reduce_dim"),
        (CosinePriorConfig, "treshold", "threshold"),
        (FewShotSegmentationConfig, "backbone_kwarg", "backbone_kwargs"),
    ],
)
def test_a_misspelt_config_field_is_an_error_naming_it(config_class, field, meant):
    with pytest.raises(ValueError, match=rf"unknown field\(s\) '{field}' \(did you mean '{meant}'\?\)"):
        config_class(**{field: 1})


def test_a_misspelt_field_in_config_json_is_refused(saved, tmp_path):
    folder = tmp_path / "misspelt"
    folder.mkdir()
    config = json.loads((saved / "config.json").read_text())
    config["reduce_dimm"] = config.pop("reduce_dim")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'reduce_dimm' \\(did you mean 'reduce_dim'\\?\\)"):
        AutoConfig.from_pretrained(folder)


@pytest.mark.parametrize(
    "loader", [AutoConfig.from_pretrained, NTRENetConfig.from_pretrained, AutoModel.from_pretrained]
)
def test_a_misspelt_keyword_of_from_pretrained_is_refused(saved, loader):
    # transformers would drop it from a config; a model's loader hands it to the model, which refuses it by name
    message = (
        "'image_sise'" if loader == AutoModel.from_pretrained else "'image_sise' \\(did you mean 'image_size'\\?\\)"
    )
    with pytest.raises((ValueError, TypeError), match=message):
        loader(saved, image_sise=97)
    assert loader(saved, image_size=97) is not None


def test_pretrained_config_keywords_and_saved_configs_still_load(saved, tmp_path):
    config = NTRENetConfig(
        architectures=["NTRENetModel"],
        dtype="float32",
        return_dict=False,
        transformers_version="5.0",
        num_labels=2,
        torch_dtype="float32",
        output_attentions=False,
        **TINY_NTRENET,
    )
    config.save_pretrained(tmp_path)
    assert NTRENetConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    assert NTRENetConfig(name_or_path="x", _commit_hash="abc").name_or_path == "x"
    assert AutoConfig.from_pretrained(saved).reduce_dim == 16
    assert NTRENetModel.from_pretrained(saved, image_size=97).config.image_size == 97  # overrides still work


def test_a_value_of_the_wrong_type_names_the_field():
    with pytest.raises(StrictDataclassFieldValidationError, match="image_size") as error:
        NTRENetConfig(image_size="big")
    assert "expected int" in str(error.value)
    with pytest.raises(StrictDataclassFieldValidationError, match="freeze_backbone"):
        CosinePriorConfig(freeze_backbone="yes")


# Issue 22, kind 8: configs that load wrongly give one line naming the file and the field.


def _edited_config(saved, tmp_path, **changes):
    folder = tmp_path / "edited"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
    config = json.loads((saved / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"reduce_dim": None}, "Field 'reduce_dim' expected int, got NoneType"),
        ({"reduce_dim": "16"}, "Field 'reduce_dim' expected int, got str"),
        ({"reduce_dim": -1}, "reduce_dim must be positive, got -1"),
        ({"feature_dropout": float("nan")}, "feature_dropout must hold finite numbers, got nan"),
        ({"contrastive_temperature": float("inf")}, "contrastive_temperature must hold finite numbers, got inf"),
        ({"pyramid_bins": [9, float("nan"), 2, 1]}, "pyramid_bins must hold finite numbers"),
        ({"image_size": None}, "Field 'image_size' expected int, got NoneType"),
        ({"dtype": "float99"}, "dtype must name a torch dtype such as 'float32' or 'bfloat16', got 'float99'"),
    ],
)
@pytest.mark.parametrize(
    "loader", [AutoConfig.from_pretrained, AutoModel.from_pretrained, NTRENetModel.from_pretrained]
)
def test_a_broken_field_of_config_json_is_one_line_naming_the_file_and_field(
    saved, tmp_path, changes, message, loader
):
    folder = _edited_config(saved, tmp_path, **changes)
    with pytest.raises(ValueError, match=message) as error:
        loader(folder)
    text = str(error.value)
    assert text.startswith(str(folder / "config.json")) and "\n" not in text


@pytest.mark.parametrize("loader", [AutoModel.from_pretrained, NTRENetModel.from_pretrained])
def test_an_override_that_changes_layer_sizes_names_the_field_the_weights_need(saved, loader):
    with pytest.raises(
        ValueError, match=r"model.safetensors needs reduce_dim=16 but the config has reduce_dim=32 \("
    ) as error:
        loader(saved, reduce_dim=32)
    assert "\n" not in str(error.value) and "ignore_mismatched_sizes" not in str(error.value)
    with pytest.raises(ValueError, match=r"Field 'reduce_dim' expected int, got str"):
        loader(saved, reduce_dim="x")


def test_backbone_kwargs_null_names_the_backbone_fields_and_both_shapes(saved, tmp_path):
    folder = _edited_config(saved, tmp_path, backbone_kwargs=None)
    with pytest.raises(
        ValueError,
        match=r"does not fit the model's backbone / backbone_kwargs \(backbone\..* is \(8,\) in the file but \(64,\) in the model",
    ):
        AutoModel.from_pretrained(folder)


def test_reinitialising_mismatched_sizes_stays_available_when_asked(saved):
    model = NTRENetModel.from_pretrained(saved, reduce_dim=32, ignore_mismatched_sizes=True)
    assert model.config.reduce_dim == 32


def test_a_folder_without_config_json_is_refused_naming_it(saved, tmp_path):
    folder = tmp_path / "weights_only"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
    with pytest.raises(OSError, match="has no config.json beside its weights"):
        NTRENetModel.from_pretrained(folder)


@pytest.mark.parametrize(
    "loader", [CosinePriorModel.from_pretrained, CosinePriorConfig.from_pretrained, QGNetModel.from_pretrained]
)
def test_a_config_json_of_another_method_names_its_model_type_and_the_class_to_use(saved, loader, capfd):
    with pytest.raises(ValueError) as error:
        loader(saved)
    text = str(error.value)
    assert text.startswith(f"{saved / 'config.json'} has model_type 'ntrenet', not ")
    assert text.endswith(
        "load it with NTRENetModel / NTRENetConfig, or with AutoModel / AutoConfig, which pick the class from model_type"
    )
    assert "\n" not in text and "unknown field" not in text
    assert "You are using a model of type" not in capfd.readouterr().err  # transformers' warning no longer precedes it
    assert type(AutoModel.from_pretrained(saved)) is NTRENetModel


def test_a_config_json_of_no_hf_fss_method_lists_the_model_types(saved, tmp_path):
    folder = _edited_config(saved, tmp_path, model_type="bert")
    with pytest.raises(
        ValueError,
        match=r"has model_type 'bert', not 'ntrenet': it is no hf_fss model \(their model types: cosine_prior, crcnet",
    ):
        NTRENetModel.from_pretrained(folder)
