"""
The SegGPT adapter (`model_type="seggpt_fss"`) on a tiny random `SegGptConfig`: the same masks and scores as
transformers' documented SegGPT call, K = 1 and 3; loading, the pipeline, its errors and the weights it takes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_NTRENET_HEAD, TINY_RESNET, TINY_SEGGPT, single_thread
from huggingface_hub.errors import StrictDataclassError
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModel,
    Dinov2Backbone,
    Dinov2Config,
    Dinov2Model,
    SegGptConfig,
    SegGptForImageSegmentation,
    SegGptImageProcessor,
    pipeline,
)

from hf_fss import (
    CosinePriorConfig,
    CosinePriorModel,
    FewShotSegmentationImageProcessor,
    NTRENetConfig,
    NTRENetModel,
    SegGptFssConfig,
    SegGptFssImageProcessor,
    SegGptFssModel,
)
from hf_fss.evaluation.compare import main as compare_main
from hf_fss.evaluation.runner import main as evaluate_main

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # each of SegGPT's two stacked images is SIZE x SIZE


def tiny_seggpt_config(**overrides) -> SegGptConfig:
    """A SegGPT of 4 layers of width 32 on 32x32 images (transformers' architecture, random weights)."""
    return SegGptConfig(**{**TINY_SEGGPT, **overrides})


_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SegGptFssModel(SegGptFssConfig(seggpt_config=tiny_seggpt_config())).eval()


def _photo(seed: int, height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((width, height), Image.BILINEAR)


def _mask(seed: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), dtype=np.uint8)
    y, x = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
    mask[y : y + height // 3, x : x + width // 3] = 1
    return mask


def _documented_seggpt(seggpt, query, prompts, masks):
    """transformers' SegGPT usage: processor -> model (feature ensemble for K prompts) -> post-processing."""
    processor = SegGptImageProcessor(size={"height": SIZE, "width": SIZE})
    shot = len(prompts)
    inputs = processor(
        images=[query] * shot, prompt_images=prompts, prompt_masks=masks, num_labels=1, return_tensors="pt"
    )
    with torch.no_grad():
        outputs = seggpt(**inputs, feature_ensemble=shot > 1)
    size = (query.height, query.width)
    result = processor.post_process_semantic_segmentation(
        outputs, target_sizes=[size] * shot, num_labels=1, return_segmentation_scores=True
    )[0]
    canvas = processor.post_process_semantic_segmentation(outputs, num_labels=1, return_segmentation_scores=True)[0]
    return result.segmentation, canvas.segmentation_scores


@pytest.mark.parametrize("shot", [1, 3])
def test_equals_the_documented_seggpt_call(model, shot):
    query = _photo(0, 45, 61)
    prompts = [_photo(10 + k, 37 + 5 * k, 29 + 7 * k) for k in range(shot)]
    masks = [_mask(20 + k, p.height, p.width) for k, p in enumerate(prompts)]
    expected_mask, expected_scores = _documented_seggpt(model.seggpt, query, prompts, masks)

    processor = SegGptFssImageProcessor(image_size=SIZE)
    inputs = processor(images=query, support_images=prompts, support_masks=masks, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.logits.shape == (1, 2, SIZE, SIZE)
    # The logits are SegGPT's own class scores (negative squared palette distances), bit for bit.
    assert torch.equal(outputs.logits[0], expected_scores)
    mask = processor.post_process_semantic_segmentation(outputs, target_sizes=[(query.height, query.width)])[0]
    assert torch.equal(mask, expected_mask.long())


@pytest.mark.parametrize("width, height", [(1, 1), (4, 4), (100, 4), (5, 1), (100, 1), (7, 3), (100, 3)])
def test_images_of_height_one_three_or_four_are_read_as_channels_last(width, height):
    """transformers guesses the channel axis from the shape unless told: such heights looked channels-first."""
    rng = np.random.default_rng(width * 10 + height)
    query = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    support = Image.fromarray(rng.integers(0, 256, size=(height + 1, width, 3), dtype=np.uint8))
    mask = np.ones((height + 1, width), dtype=np.uint8)
    inputs = SegGptFssImageProcessor(image_size=SIZE)(
        images=query, support_images=[support], support_masks=[mask], return_tensors="pt"
    )
    documented = SegGptImageProcessor(size={"height": SIZE, "width": SIZE})(
        images=np.asarray(query), prompt_images=np.asarray(support), input_data_format="channels_last",
        return_tensors="pt",
    )  # fmt: skip
    assert torch.equal(inputs["pixel_values"][0], documented["pixel_values"][0])
    assert torch.equal(inputs["support_pixel_values"][0, 0], documented["prompt_pixel_values"][0])
    assert torch.equal(inputs["support_masks"][0, 0], torch.ones(SIZE, SIZE, dtype=inputs["support_masks"].dtype))


def test_support_encoding_reuse_equals_the_plain_call(model):
    processor = SegGptFssImageProcessor(image_size=SIZE)
    prompts = [_photo(1, 40, 40), _photo(2, 30, 50)]
    masks = [_mask(3, 40, 40), _mask(4, 30, 50)]
    queries = [_photo(5, 33, 33), _photo(6, 50, 20)]
    inputs = processor(
        images=queries, support_images=[prompts, prompts], support_masks=[masks, masks], return_tensors="pt"
    )
    with torch.no_grad():
        plain = model(**inputs).logits
        encoding = model.encode_support(inputs["support_pixel_values"][:1], inputs["support_masks"][:1])
        reused = model(inputs["pixel_values"], support_encoding=encoding).logits
    assert torch.equal(plain, reused)


def test_save_load_and_auto_classes(model, tmp_path):
    model.save_pretrained(tmp_path)
    SegGptFssImageProcessor(image_size=SIZE).save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is SegGptFssModel
    architecture = lambda config: {k: v for k, v in config.seggpt_config.to_dict().items() if k != "dtype"}  # noqa: E731
    assert architecture(loaded.config) == architecture(model.config)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is SegGptFssImageProcessor


def test_pipeline_gives_the_documented_result(model, tmp_path):
    query, prompt = _photo(7, 52, 40), _photo(8, 41, 47)
    mask = _mask(9, 41, 47)
    expected, _ = _documented_seggpt(model.seggpt, query, [prompt], [mask])
    model.save_pretrained(tmp_path)  # no preprocessor_config.json: the pipeline builds SegGPT's processor
    pipe = pipeline("few-shot-segmentation", model=str(tmp_path))
    assert type(pipe.image_processor) is SegGptFssImageProcessor
    result = pipe(query, support_image=prompt, support_mask=mask, output_type="numpy")
    assert np.array_equal(result["mask"], expected.numpy())


def test_from_seggpt_loads_a_local_seggpt_folder_offline(tmp_path):
    torch.manual_seed(1)
    official = SegGptForImageSegmentation(tiny_seggpt_config()).eval()
    official.save_pretrained(tmp_path / "seggpt")
    adapter = SegGptFssModel.from_seggpt(str(tmp_path / "seggpt"))
    assert adapter.config.seggpt_name_or_path == str(tmp_path / "seggpt")
    for name, value in official.state_dict().items():
        assert torch.equal(adapter.seggpt.state_dict()[name], value), name
    # A saved adapter holds SegGPT's config and weights: loading it reads neither the SegGPT folder nor the Hub.
    adapter.save_pretrained(tmp_path / "adapter")
    (tmp_path / "seggpt" / "model.safetensors").unlink()
    reloaded = SegGptFssModel.from_pretrained(tmp_path / "adapter")
    assert torch.equal(reloaded.seggpt.decoder.decoder_pred.conv.weight, official.decoder.decoder_pred.conv.weight)


def test_a_seggpt_folder_of_another_shape_is_refused(tmp_path):
    SegGptForImageSegmentation(tiny_seggpt_config(hidden_size=48)).save_pretrained(tmp_path)
    model = SegGptFssModel(SegGptFssConfig(seggpt_config=tiny_seggpt_config(), seggpt_name_or_path=str(tmp_path)))
    with pytest.raises(ValueError, match="another shape.*hidden_size"):
        model.load_pretrained_extractors()


def test_a_folder_of_another_architecture_is_refused_by_name(tmp_path):
    Dinov2Model(
        Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28)
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a model of type 'dinov2', not SegGPT"):
        SegGptFssModel.from_seggpt(str(tmp_path))
    model = SegGptFssModel(SegGptFssConfig(seggpt_config=tiny_seggpt_config(), seggpt_name_or_path=str(tmp_path)))
    with pytest.raises(ValueError, match="holds a model of type 'dinov2', not SegGPT"):
        model.load_pretrained_extractors()


@pytest.mark.parametrize("shot", [1, 2])
def test_eval_logits_do_not_depend_on_the_batch(model, shot):
    generator = torch.Generator().manual_seed(shot)
    query, support = torch.randn(3, 3, SIZE, SIZE, generator=generator), torch.randn(3, shot, 3, SIZE, SIZE)
    masks = (torch.rand(3, shot, SIZE, SIZE, generator=generator) > 0.5).long()
    with torch.no_grad():
        batched = model(query, support, masks).logits
        single = torch.cat([model(query[i : i + 1], support[i : i + 1], masks[i : i + 1]).logits for i in range(3)])
    # Scores are squared distances in pixel values (up to 3 x 255^2): a relative tolerance.
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-2)


def test_what_seggpt_cannot_do_is_a_clear_error(model):
    pixels = torch.zeros(1, 3, SIZE, SIZE)
    supports, masks = torch.zeros(1, 1, 3, SIZE, SIZE), torch.ones(1, 1, SIZE, SIZE, dtype=torch.long)
    with pytest.raises(ValueError, match="computes no loss"):
        model(pixels, supports, masks, labels=torch.zeros(1, SIZE, SIZE, dtype=torch.long))
    with pytest.raises(ValueError, match=r"SegGPT takes exactly \(32, 32\).*SegGptFssImageProcessor"):
        model(torch.zeros(1, 3, 40, 40), torch.zeros(1, 1, 3, 40, 40), torch.ones(1, 1, 40, 40, dtype=torch.long))
    assert SegGptFssModel.supports_training is False


def test_config_errors_name_the_field():
    with pytest.raises(StrictDataclassError, match="image_size 64 differs from SegGPT's input width 32"):
        SegGptFssConfig(seggpt_config=tiny_seggpt_config(), image_size=64)
    with pytest.raises(ValueError, match="did you mean 'feature_ensemble'"):
        SegGptFssConfig(seggpt_config=tiny_seggpt_config(), feature_ensembl=False)
    config = SegGptFssConfig(seggpt_config=tiny_seggpt_config().to_dict())
    assert config.image_size == SIZE and isinstance(config.seggpt_config, SegGptConfig)
    with pytest.raises(ValueError, match="seggpt_config must be a SegGptConfig or a dict of its fields, got a "):
        SegGptFssConfig(seggpt_config=NTRENetConfig())
    with pytest.raises(ValueError, match="seggpt_config holds model_type 'bert', not SegGPT's 'seggpt'"):
        SegGptFssConfig(seggpt_config={**tiny_seggpt_config().to_dict(), "model_type": "bert"})
    assert dict(config.sub_configs) == {"seggpt_config": SegGptConfig}  # transformers walks it (dtype, attention)


# ------------------------------------------------------------------------------------- scripts on SegGPT


DATA = ["--dataset", "synthetic", "--synthetic-num-train", "0", "--synthetic-num-val", "60",
        "--synthetic-image-size", "128", "--num-threads", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def saved_models(model, tmp_path_factory):
    """The tiny SegGPT adapter (saved without preprocessor_config.json: its own processor is built), a tiny NTRENet and
    a tiny cosine prior, as folders."""
    root = tmp_path_factory.mktemp("seggpt_scripts")
    torch.manual_seed(0)
    ntrenet = NTRENetModel(NTRENetConfig(backbone_kwargs=dict(TINY_RESNET), **TINY_NTRENET_HEAD, image_size=65))
    prior = CosinePriorModel(CosinePriorConfig(backbone_kwargs=dict(TINY_RESNET), image_size=65))
    model.save_pretrained(root / "seggpt")
    for name, other in (("ntrenet", ntrenet), ("prior", prior)):
        other.save_pretrained(root / name)
        FewShotSegmentationImageProcessor(image_size=65).save_pretrained(root / name)
    return {name: str(root / name) for name in ("seggpt", "ntrenet", "prior")}


def _plain_transformers_folders(root: Path) -> dict[str, str]:
    """Folders a user may take for hf_fss models: SegGPT and DINOv2 as transformers saves them, an empty config."""
    torch.manual_seed(0)
    dinov2 = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28
    )
    SegGptForImageSegmentation(tiny_seggpt_config()).save_pretrained(root / "seggpt")
    Dinov2Backbone(dinov2).save_pretrained(root / "dinov2_backbone")
    Dinov2Model(dinov2).save_pretrained(root / "dinov2_model")
    (root / "notbb").mkdir()
    (root / "notbb" / "config.json").write_text("{}")
    return {name: str(root / name) for name in ("seggpt", "dinov2_backbone", "dinov2_model", "notbb")}


def _not_fss_message(name: str, folder: str) -> str:
    """The one line every loader gives for the folders of `_plain_transformers_folders` (issue 24's wording)."""
    if name == "notbb":
        return f"{folder} holds no model_type in its config.json, so no hf_fss few-shot model; hf_fss loads a folder"
    found = f"{folder} holds a {'seggpt' if name == 'seggpt' else 'dinov2'!r} model (transformers), not an hf_fss"
    if name == "seggpt":
        return f"{found} few-shot model; wrap it: SegGptFssModel.from_seggpt('{folder}') then save_pretrained"
    return f"{found} few-shot model; use it as a backbone: NTRENetConfig(backbone='{folder}', use_pretrained_backbone=True)"


def test_a_plain_transformers_folder_is_one_line_with_the_fix_in_scripts_and_pipeline(saved_models, tmp_path, capsys):
    for name, folder in _plain_transformers_folders(tmp_path / "plain").items():
        message = _not_fss_message(name, folder)
        capsys.readouterr()  # the progress bars of saving and of the pipeline's loading
        out = tmp_path / name / "metrics.json"
        assert evaluate_main(["--model", folder, *DATA, "--fold", "0", "--output", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"evaluate.py: error: {message}"), err
        models = ["--models", folder, saved_models["prior"]]
        argv = [*models, *DATA, "--num-episodes", "4", "--output-dir", str(out.parent)]
        assert compare_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"compare.py: error: {message}"), err
        assert not out.parent.exists()  # a failing command writes nothing
        if name != "notbb":  # transformers' pipeline() itself refuses a config without model_type, before hf_fss
            with pytest.raises(ValueError) as info:
                pipeline("few-shot-segmentation", model=folder)
            assert str(info.value) == message


def test_from_seggpt_of_a_saved_adapter_suggests_from_pretrained(saved_models):
    with pytest.raises(ValueError, match=r"already holds an hf_fss SegGPT adapter .*SegGptFssModel\.from_pretrained"):
        SegGptFssModel.from_seggpt(saved_models["seggpt"])


@pytest.mark.parametrize("shot", [1, 2])  # K = 2: the feature ensemble (the small synthetic split has few images)
def test_evaluate_script_scores_seggpt(saved_models, tmp_path, shot):
    out = tmp_path / "metrics.json"
    argv = ["--model", saved_models["seggpt"], *DATA, "--fold", "0", "--shot", str(shot), "--num-episodes", "4"]
    assert evaluate_main([*argv, "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["num_episodes"] == 4 and 0.0 <= metrics["miou"] <= 1.0


def test_compare_script_scores_seggpt_ntrenet_and_the_prior_on_one_episode_list(saved_models, tmp_path):
    out = tmp_path / "cmp"
    argv = ["--models", saved_models["seggpt"], saved_models["ntrenet"], saved_models["prior"], *DATA,
            "--num-episodes", "4", "--seeds", "1", "--num-bootstrap", "20", "--output-dir", str(out)]  # fmt: skip
    assert compare_main(argv) == 0
    comparison = json.loads((out / "comparison.json").read_text())
    assert list(comparison["results"]) == ["seggpt", "ntrenet", "prior"]
    assert comparison["results"]["seggpt"]["image_size"] == SIZE
    records = json.loads((out / "episode_records.json").read_text())
    episodes = {name: [(r["episode_index"], r["class_id"]) for r in records[name]["1"]] for name in records}
    assert episodes["seggpt"] == episodes["ntrenet"] == episodes["prior"]
    assert [(p["a"], p["b"]) for p in comparison["paired"]] == [
        ("seggpt", "ntrenet"), ("seggpt", "prior"), ("ntrenet", "prior"),
    ]  # fmt: skip
    assert comparison["episode_hash"] in (out / "comparison.md").read_text()


def test_train_script_refuses_seggpt_writing_nothing(tmp_path):
    output_dir = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--model-type", "seggpt_fss", "--output-dir",
         str(output_dir)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--model-type seggpt_fss cannot be trained by hf_fss" in result.stderr.strip().splitlines()[-1]
    assert not output_dir.exists()


def test_benchmark_builds_seggpt_large_shapes_from_config():
    spec = importlib.util.spec_from_file_location("hf_fss_benchmark_for_seggpt", ROOT / "scripts" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    assert benchmark.default_image_size("seggpt_fss", "base") == 448
    large = benchmark.build_config("seggpt_fss", "base", 448).seggpt_config
    # BAAI/seggpt-vit-large's architecture (its config.json): ViT-L/16 on two stacked 448 x 448 images.
    assert (large.hidden_size, large.num_hidden_layers, large.patch_size, list(large.image_size)) == (
        1024, 24, 16, [896, 448],
    )  # fmt: skip
    assert benchmark.build_config("seggpt_fss", "tiny", SIZE).seggpt_config.hidden_size == 32


def test_card_states_where_seggpt_weights_came_from(tmp_path):
    """A SegGPT folder gets a card of its own (`hf_fss/model_cards/seggpt_fss.md`), true to its weights."""
    from hf_fss.hub.model_card import render_model_card, save_pretrained_with_card

    random_card = str(render_model_card(SegGptFssConfig(seggpt_config=tiny_seggpt_config())))
    assert "random initialisation: no SegGPT weights were loaded" in random_card
    assert "base_model" not in random_card and "SegGPT weights from" not in random_card
    hub_card = str(
        render_model_card(
            SegGptFssConfig(seggpt_config=tiny_seggpt_config(), seggpt_name_or_path="BAAI/seggpt-vit-large")
        )
    )
    assert "SegGPT weights from BAAI/seggpt-vit-large" in hub_card and "base_model: BAAI/seggpt-vit-large" in hub_card
    torch.manual_seed(0)
    folder = save_pretrained_with_card(
        SegGptFssModel(SegGptFssConfig(seggpt_config=tiny_seggpt_config())), None, tmp_path / "m"
    )
    assert "# seggpt-fss-vit" in (folder / "README.md").read_text()
    assert isinstance(AutoImageProcessor.from_pretrained(folder), SegGptFssImageProcessor)
