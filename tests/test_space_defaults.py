"""
The Space with the SegGPT adapter (`/segment` and the Compare tab) and its default without `FSS_MODELS`: the
training-free cosine prior on DINOv2 when the Hub is reachable, else the quickstart model with a line saying why.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RESNET, TINY_SEGGPT
from PIL import Image

from hf_fss import (
    CosinePriorConfig,
    CosinePriorModel,
    FewShotSegmentationImageProcessor,
    SegGptFssConfig,
    SegGptFssModel,
)
from hf_fss.data.synthetic import render_synthetic_example

ROOT = Path(__file__).resolve().parents[1]


def _load_app():
    spec = importlib.util.spec_from_file_location("hf_fss_space_app_defaults", ROOT / "spaces_app" / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


app = _load_app()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A saved tiny SegGPT adapter (no preprocessor_config.json: SegGPT's processor is built) and a tiny cosine prior."""
    root = tmp_path_factory.mktemp("space_models")
    torch.manual_seed(0)
    SegGptFssModel(SegGptFssConfig(seggpt_config=dict(TINY_SEGGPT))).save_pretrained(root / "seggpt")
    CosinePriorModel(CosinePriorConfig(backbone_kwargs=dict(TINY_RESNET), image_size=96)).save_pretrained(
        root / "prior"
    )
    FewShotSegmentationImageProcessor(image_size=96).save_pretrained(root / "prior")
    return {"seggpt": str(root / "seggpt"), "prior": str(root / "prior")}


@pytest.fixture(scope="module")
def episode(tmp_path_factory):
    folder = tmp_path_factory.mktemp("space_episode")
    image, label = render_synthetic_example(0, 1, 4, image_size=120, ignore_boundary=0)
    Image.fromarray(image).save(folder / "support.png")
    Image.fromarray(((label == 5) * 255).astype(np.uint8)).save(folder / "mask.png")
    Image.fromarray(image).resize((150, 90)).save(folder / "query.png")
    return {"image": image, "target": label == 5, "dir": folder}


def test_segment_endpoint_runs_seggpt_as_the_pipeline_does(folders, episode):
    registry = app.ModelRegistry([folders["seggpt"], folders["prior"]])
    support, mask, query = (str(episode["dir"] / n) for n in ("support.png", "mask.png", "query.png"))
    mask_path, _, info = app.segment_api(registry, support, mask, query)
    assert info["model_type"] == "seggpt_fss" and info["query_size"] == [150, 90] and info["maps"] == []
    expected = registry.get(folders["seggpt"])(query, support_image=support, support_mask=mask, output_type="numpy")
    np.testing.assert_array_equal(np.asarray(Image.open(mask_path)), expected["mask"] * 255)


def test_compare_tab_runs_seggpt_beside_the_cosine_prior(folders, episode):
    registry = app.ModelRegistry([folders["seggpt"], folders["prior"]])
    layer = np.zeros((*episode["target"].shape, 4), np.uint8)
    layer[episode["target"]] = (*app.CLASS_COLORS["blue"], 150)
    editors = [{"background": episode["image"], "layers": [layer], "composite": None}]
    editors += [None] * (app.MAX_SUPPORTS - 1)
    queries = [str(episode["dir"] / "query.png")]
    gallery, table = app.compare_ui(registry, "brush", queries, *editors, *[""] * app.MAX_SUPPORTS)
    assert gallery[0][1].startswith(f"{folders['seggpt']} (seggpt_fss, ")
    assert Image.open(gallery[0][0]).size == (150, 90)
    assert "| seggpt_fss |" in table and "| cosine_prior |" in table


@pytest.fixture
def no_fss_models(tmp_path, monkeypatch, folders):
    """`FSS_MODELS` unset, and a quickstart model in place."""
    monkeypatch.delenv("FSS_MODELS", raising=False)
    quickstart = tmp_path / "quickstart"
    shutil.copytree(folders["prior"], quickstart)
    monkeypatch.setattr(app, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(app, "DEFAULT_MODEL_DIR", quickstart)
    return "quickstart"  # the spec: relative to the repository, as the quickstart's


def test_without_fss_models_and_with_the_hub_the_training_free_prior_is_the_default(
    no_fss_models, monkeypatch, episode, tmp_path
):
    calls = []
    monkeypatch.setattr(app, "hub_reachable", lambda: True)

    def tiny_training_free_model():  # stands in for the DINOv2-small prior (no download in tests)
        calls.append("built")
        return CosinePriorModel(CosinePriorConfig(backbone_kwargs=dict(TINY_RESNET), image_size=96)).eval()

    monkeypatch.setattr(app, "training_free_model", tiny_training_free_model)
    demo = app.build_demo(examples=tmp_path / "examples")
    assert demo.registry.specs == [app.TRAINING_FREE_SPEC, no_fss_models] and calls == ["built"]
    assert demo.registry.default == app.TRAINING_FREE_SPEC and "⚠️" not in demo.status
    support, mask, query = (str(episode["dir"] / n) for n in ("support.png", "mask.png", "query.png"))
    _, _, info = app.segment_api(demo.registry, support, mask, query)
    assert info["model"] == app.TRAINING_FREE_SPEC and info["model_type"] == "cosine_prior"


@pytest.mark.parametrize("failure", ["unreachable", "loading"])
def test_without_the_hub_or_when_loading_fails_the_quickstart_model_is_offered_saying_why(
    no_fss_models, monkeypatch, tmp_path, failure, capsys
):
    monkeypatch.setattr(app, "hub_reachable", lambda: failure != "unreachable")

    def broken():
        raise OSError("facebook/dinov2-small: connection reset")

    monkeypatch.setattr(app, "training_free_model", broken)
    demo = app.build_demo(examples=tmp_path / "examples")
    assert demo.registry.specs == [no_fss_models]
    why = "the Hub is not reachable for" if failure == "unreachable" else "loading facebook/dinov2-small failed"
    line = demo.status.splitlines()[-1]
    assert line.startswith("⚠️ The training-free cosine prior is not offered: ") and why in line
    assert line.endswith("the quickstart model is offered instead.")
    if failure == "loading":
        assert "OSError: facebook/dinov2-small: connection reset" in line
    console = [x for x in capsys.readouterr().err.splitlines() if "cosine prior is not offered" in x]
    assert console == [f"hf_fss space: {line.removeprefix('⚠️ ')}"]  # the page's line, once, on the console


def test_fss_models_set_skips_the_hub(folders, monkeypatch, tmp_path):
    monkeypatch.setenv("FSS_MODELS", folders["seggpt"])
    monkeypatch.setattr(app, "hub_reachable", lambda: pytest.fail("FSS_MODELS is set: the Hub is not asked"))
    demo = app.build_demo(examples=tmp_path / "examples")
    assert demo.registry.specs == [folders["seggpt"]] and "⚠️" not in demo.status
