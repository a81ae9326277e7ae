"""
Test-time adaptation through the shared API (issue 9, point 3): a model that finetunes on its support set inside
`encode_support` works under evaluation's and the pipeline's `torch.no_grad()`, never changes its own weights,
finetunes once per support set however many queries it segments, and gives reproducible metrics with 1 and 2
processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_RESNET, random_episode
from tta_model import AdaptingConfig, AdaptingModel

from hf_fss import FewShotSegmentationImageProcessor

ROOT = Path(__file__).resolve().parents[1]


def _model(kind="adapting_test"):
    torch.manual_seed(0)
    if kind == "crcnet":  # CRCNet's K-shot finetuning, small: the same path with a real method
        from hf_fss import CRCNetConfig, CRCNetModel

        config = CRCNetConfig(backbone_kwargs=dict(TINY_RESNET), reduce_dim=16, cross_reference_reduction=4,
                              image_size=65, refinement_steps=2, finetune_steps=2)  # fmt: skip
        return CRCNetModel(config).eval()
    return AdaptingModel(AdaptingConfig(backbone_kwargs=dict(TINY_RESNET), image_size=65)).eval()


MODEL_KINDS = ["adapting_test", "crcnet"]


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_adaptation_under_no_grad_changes_predictions_but_never_the_weights():
    model = _model()
    before = _weights(model)
    query, support, masks, _ = random_episode(batch_size=2, shot=2)
    with torch.no_grad():
        adapted = model(query, support, masks).logits
        again = model(query, support, masks).logits
        unadapted = model.classifier(model.backbone(query)[-1])
    torch.testing.assert_close(adapted, again, rtol=0, atol=0)  # reproducible
    unadapted = torch.nn.functional.interpolate(unadapted, size=query.shape[-2:], mode="bilinear", align_corners=True)
    assert not torch.allclose(adapted, unadapted)  # the finetuning did something
    for key, value in model.state_dict().items():
        assert torch.equal(before[key], value), key
    assert all(p.grad is None for p in model.parameters())


def test_one_encoding_finetunes_once_for_many_queries():
    model = _model()
    query, support, masks, _ = random_episode(batch_size=1, shot=3)
    start = AdaptingModel.adaptation_count
    with torch.no_grad():
        encoding = model.encode_support(support, masks)
        outputs = [model(torch.roll(query, i, dims=-1), support_encoding=encoding).logits for i in range(4)]
    assert AdaptingModel.adaptation_count - start == 1
    assert all(torch.isfinite(o).all() for o in outputs)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_the_pipeline_runs_a_model_that_adapts(tmp_path, kind):
    from transformers import pipeline

    model = _model(kind)
    before = _weights(model)
    segmenter = pipeline("few-shot-segmentation", model=model, image_processor=FewShotSegmentationImageProcessor(65))
    rng = torch.Generator().manual_seed(1)
    image = (torch.rand(50, 60, 3, generator=rng) * 255).to(torch.uint8).numpy()
    mask = torch.zeros(50, 60, dtype=torch.uint8)
    mask[10:30, 15:40] = 1
    # Two supports: a model that finetunes on support pairs (CRCNet) needs K > 1 to adapt; one is a box.
    supports = {"support_image": [image, image[:, ::-1].copy()], "support_mask": [mask.numpy(), mask.numpy()]}
    first = segmenter(image, **supports)
    second = segmenter(image, **supports)
    boxed = segmenter(image, support_image=[image, image], support_box=[(15, 10, 40, 30), (5, 5, 30, 40)])
    assert boxed["mask"].size == (60, 50)
    assert first["mask"].size == (60, 50)
    assert list(first["mask"].getdata()) == list(second["mask"].getdata())
    for key, value in model.state_dict().items():
        assert torch.equal(before[key], value), key


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_the_space_runs_a_model_that_adapts(tmp_path, kind):
    import importlib.util

    from PIL import Image

    spec = importlib.util.spec_from_file_location("hf_fss_space_app_tta", ROOT / "spaces_app" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    folder = tmp_path / "adapting"
    model = _model(kind)
    model.save_pretrained(folder)
    FewShotSegmentationImageProcessor(image_size=65).save_pretrained(folder)
    rng = torch.Generator().manual_seed(2)
    Image.fromarray((torch.rand(50, 60, 3, generator=rng) * 255).to(torch.uint8).numpy()).save(tmp_path / "s.png")
    mask = torch.zeros(50, 60, dtype=torch.uint8)
    mask[10:30, 15:40] = 255
    Image.fromarray(mask.numpy()).save(tmp_path / "m.png")
    registry = app.ModelRegistry([str(folder)])
    files = (str(tmp_path / "s.png"), str(tmp_path / "m.png"), str(tmp_path / "s.png"))
    first, second = app.segment_api(registry, *files), app.segment_api(registry, *files)
    assert first[2]["model_type"] == kind and second[2]["support_encoding_cached"]
    assert (Image.open(first[0]).tobytes()) == Image.open(second[0]).tobytes()
    for key, value in registry.get(None).model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.slow
def test_evaluate_script_with_one_and_two_processes_gives_the_same_metrics(tmp_path):
    folder = tmp_path / "adapting"
    model = _model()
    model.save_pretrained(folder)
    FewShotSegmentationImageProcessor(image_size=65).save_pretrained(folder)
    weights = (folder / "model.safetensors").read_bytes()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    common = ["tests/tta_evaluate.py", "--model", str(folder), "--dataset", "synthetic", "--synthetic-num-train", "0",
              "--synthetic-num-val", "60", "--synthetic-image-size", "128", "--fold", "0", "--shot", "2",
              "--num-episodes", "12"]  # fmt: skip
    results = []
    for processes in (1, 2):
        out = tmp_path / f"metrics-{processes}.json"
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
        launch += ["--multi_gpu"] if processes > 1 else ["--cpu"]
        subprocess.run([*launch, *common, "--output", str(out)], cwd=ROOT, env=env, check=True, timeout=600)
        results.append(json.loads(out.read_text()))
    for key in ("miou", "fbiou", "precision", "per_class_iou", "num_episodes"):
        assert json.dumps(results[0][key]) == json.dumps(results[1][key]), key  # NaN (a class without episode) too
    assert results[0]["miou"] > 0  # the adapted classifier finds targets, so equal metrics say something
    assert (folder / "model.safetensors").read_bytes() == weights
