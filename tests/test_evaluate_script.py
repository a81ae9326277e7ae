"""
scripts/evaluate.py (hf_fss.evaluation.runner): metrics.json in the contract's format, written atomically; fixed
episode lists exported and re-read; several seeds; protocols and weak annotations; bad input. The 1-vs-2-process
equality is checked in test_training.py, on a model trained by a 2-process launch.
"""

import json
import logging
import shutil

import pytest
import torch
from conftest import single_thread

from hf_fss import (
    CRCNetConfig,
    CRCNetModel,
    FewShotSegmentationImageProcessor,
    NTRENetConfig,
    NTRENetModel,
    SMCPConfig,
    SMCPModel,
)
from hf_fss.data import load_episodes_jsonl
from hf_fss.evaluation.runner import load_model_with_overrides, main

# Evaluation reads only the validation split: no training images are generated.
DATA_FLAGS = ["--dataset", "synthetic", "--synthetic-num-train", "0", "--synthetic-num-val", "60",
              "--synthetic-image-size", "128", "--num-threads", "1"]  # fmt: skip


_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


TINY_MODELS = {
    "ntrenet": lambda: NTRENetModel(
        NTRENetConfig(
            backbone_kwargs={"base_width": 8, "depths": [1, 1, 1, 1]},
            reduce_dim=16,
            background_prototype_dim=16,
            pyramid_bins=[1.0, 0.5],
            image_size=65,
        )
    ),
    # SMCP: two test-time passes; the official code cannot run scribble or box supports
    "smcp": lambda: SMCPModel(
        SMCPConfig(backbone_kwargs={"base_width": 4}, reduce_dim=16, bottleneck_dim=8, image_size=65)
    ),
}


@pytest.fixture(scope="module", params=["ntrenet"])
def tiny_model(request, tmp_path_factory):
    """A saved tiny model (NTRENet unless a test asks for another with `indirect` parametrisation)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / f"tiny-{request.param}"
    TINY_MODELS[request.param]().save_pretrained(folder)
    FewShotSegmentationImageProcessor(image_size=65).save_pretrained(folder)
    return folder


def _evaluate(model, out, *flags):
    return main(["--model", str(model), *DATA_FLAGS, "--fold", "0", "--shot", "1", "--output", str(out), *flags])


def test_metrics_json_format_and_episode_files(tiny_model, tmp_path):
    out, episodes = tmp_path / "metrics.json", tmp_path / "episodes.jsonl"
    assert _evaluate(tiny_model, out, "--num-episodes", "10", "--seed", "7", "--save-episodes", str(episodes)) == 0
    metrics = json.loads(out.read_text())
    for key in ("miou", "fbiou", "precision", "per_class_iou", "num_episodes", "seed", "protocol"):
        assert key in metrics, key
    assert metrics["num_episodes"] == 10 and metrics["seed"] == 7
    assert set(metrics["per_class_iou"]) <= {"striped_disc", "checkered_square", "dotted_triangle", "shaded_star",
                                             "striped_ring"}  # fmt: skip
    assert metrics["protocol"]["name"] == "pfenet" and metrics["protocol"]["label_size"] == "original"
    assert 0.0 <= metrics["miou"] <= 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["episodes.jsonl", "metrics.json"]  # no temp file left

    listed = load_episodes_jsonl(episodes)
    assert len(listed) == 10 and all(len(e.supports) == 1 for e in listed)
    again = tmp_path / "again.json"
    assert _evaluate(tiny_model, again, "--episodes-file", str(episodes), "--seed", "7") == 0
    again = json.loads(again.read_text())
    assert (again["miou"], again["per_class_iou"]) == (metrics["miou"], metrics["per_class_iou"])


def test_several_seeds_give_mean_and_std(tiny_model, tmp_path):
    out = tmp_path / "metrics.json"
    assert _evaluate(tiny_model, out, "--num-episodes", "5", "--seeds", "1", "2") == 0
    metrics = json.loads(out.read_text())
    assert metrics["seeds"] == [1, 2] and metrics["num_runs"] == 2 and len(metrics["runs"]) == 2
    assert metrics["miou"] == pytest.approx(sum(r["miou"] for r in metrics["runs"]) / 2)
    assert metrics["miou_std"] >= 0.0
    assert metrics["protocol"]["seeds"] == [1, 2]


@pytest.mark.parametrize(
    ("tiny_model", "annotation"), [("ntrenet", "mask"), ("smcp", "scribble")], indirect=["tiny_model"]
)
def test_panet_protocol_runs_its_five_seeds(tiny_model, tmp_path, annotation):
    out = tmp_path / "metrics.json"
    flags = ("--protocol", "panet", "--num-episodes", "2", "--annotation", annotation)
    assert _evaluate(tiny_model, out, *flags) == 0
    metrics = json.loads(out.read_text())
    assert metrics["seeds"] == [1234, 1235, 1236, 1237, 1238] and "miou_std" in metrics
    assert metrics["protocol"]["label_size"] == 417
    assert metrics["annotation"] == annotation


@pytest.mark.parametrize("tiny_model", ["ntrenet", "smcp"], indirect=True)
def test_hsnet_protocol_and_box_supports(tiny_model, tmp_path):
    out = tmp_path / "metrics.json"
    assert _evaluate(tiny_model, out, "--protocol", "hsnet", "--num-episodes", "4", "--annotation", "bbox") == 0
    metrics = json.loads(out.read_text())
    assert metrics["protocol"]["name"] == "hsnet" and metrics["protocol"]["label_size"] == 400
    assert metrics["seed"] == 0  # the preset's seed
    assert metrics["annotation"] == "bbox"


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory):
    """A saved COCO-20i-shaped validation split (80 class names) holding two test and one validation class of
    CANet's 40 / 20 / 20 split, each object 48 x 48 px (eligible)."""
    import numpy as np
    from datasets import Dataset, DatasetDict

    from hf_fss.data.schema import COCO_CLASSES, benchmark_features

    rng = np.random.default_rng(0)
    data = {"image_id": [], "image": [], "label": [], "class_ids": [], "class_areas": []}
    for i, classes in enumerate([(61, 41), (62, 61), (41, 62), (61,), (62, 41), (41,)]):
        label = np.zeros((100, 100), np.uint8)
        for k, c in enumerate(classes):
            label[1:49, 1 + 50 * k : 49 + 50 * k] = c
        data["image_id"].append(f"val_{i}")
        data["image"].append(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8))
        data["label"].append(label)
        data["class_ids"].append(list(classes))
        data["class_areas"].append([48 * 48] * len(classes))
    folder = tmp_path_factory.mktemp("coco-like") / "data"
    DatasetDict({"validation": Dataset.from_dict(data, features=benchmark_features(COCO_CLASSES))}).save_to_disk(
        folder
    )
    return folder


def test_canet_40_20_20_convention_from_evaluate_and_compare(tiny_model, coco_like, tmp_path, capsys):
    from hf_fss.data.schema import COCO_CLASSES
    from hf_fss.evaluation import compare

    flags = ["--dataset", str(coco_like), "--benchmark", "coco20i", "--fold-convention", "canet_40_20_20"]
    out = tmp_path / "metrics.json"
    common = ["--model", str(tiny_model), *flags, "--num-episodes", "6", "--num-threads", "1", "--output", str(out)]
    assert main([*common, "--save-episodes", str(tmp_path / "episodes.jsonl")]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["protocol"]["fold_convention"] == "canet_40_20_20"
    assert set(metrics["per_class_iou"]) == {COCO_CLASSES[c] for c in range(61, 81)}  # the 20 test classes
    # Episodes of the test classes present (61, 62), never of the validation class 41 the images also hold.
    assert {e.class_id for e in load_episodes_jsonl(tmp_path / "episodes.jsonl")} == {61, 62}
    assert main([*common, "--fold", "1"]) != 0
    assert "fold must be 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse refuses an unknown convention
        main([*common, "--fold-convention", "canet"])

    compare_flags = [
        "--models",
        str(tiny_model),
        str(tiny_model),
        *flags,
        "--num-episodes",
        "6",
        "--output-dir",
        str(tmp_path / "cmp"),
    ]
    args = compare.build_parser().parse_args(compare_flags)
    context = compare._prepare(args)
    assert context["fold"].novel == tuple(range(61, 81)) and context["protocol"].fold_convention == "canet_40_20_20"
    lists = context["episodes"].values()
    assert {e.class_id for listed in lists for e in listed["episodes"]} == {61, 62}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "no/such/model-folder"], "no/such/model-folder"),
        (["--benchmark", "voc2099"], "voc2099"),
        (["--fold", "7"], "fold"),
        # config overrides are generic: a field NTRENet's config lacks, or a value it does not allow, is refused
        (["--inference-scales", "1.0"], "'inference_scales'"),
        (["--shot-fusion", "finetune"], "shot_fusion"),
        (["--model-kwargs", '{"reduce_dimm": 8}'], "did you mean 'reduce_dim'"),
        (["--model-kwargs", "[1]"], "--model-kwargs must be a JSON object"),
        # an override that changes layer sizes names the field the weights need (issue 22, kind 8)
        (["--model-kwargs", '{"reduce_dim": 24}'], "needs reduce_dim=16 but the config has reduce_dim=24"),
        # a COCO-only flag on another benchmark is refused, not silently ignored
        (["--fold-convention", "canet_40_20_20", "--fold", "1"], "applies to COCO-20i only"),
    ],
)
def test_bad_input_exits_non_zero_without_output(tiny_model, tmp_path, capsys, flags, message):
    out = tmp_path / "metrics.json"
    arguments = ["--model", str(tiny_model), *DATA_FLAGS, "--output", str(out), "--num-episodes", "2"]
    assert main([*arguments, *flags]) != 0
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_dataset_is_required_and_an_existing_metrics_json_is_left_alone(tiny_model, tmp_path, monkeypatch, capsys):
    """Without --dataset, evaluate.py used to score the synthetic benchmark and overwrite ./metrics.json."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics.json").write_text('{"miou": 0.5}')
    with pytest.raises(SystemExit) as exited:
        main(["--model", str(tiny_model), "--fold", "0", "--shot", "1"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the following arguments are required: --dataset" in err
    assert (tmp_path / "metrics.json").read_text() == '{"miou": 0.5}' and sorted(tmp_path.iterdir()) == [
        tmp_path / "metrics.json"
    ]


def test_a_run_folder_is_taken_as_its_best_model_and_the_choice_is_logged(tiny_model, tmp_path, caplog):
    """`--model outputs/RUN` (the run folder, not RUN/best): its best/, else final/, as the Space does."""
    run = tmp_path / "run"
    shutil.copytree(tiny_model, run / "final")
    flags = ["--num-episodes", "2"]
    with caplog.at_level(logging.WARNING, logger="hf_fss.utils"):
        assert _evaluate(run, tmp_path / "final.json", *flags) == 0
    assert json.loads((tmp_path / "final.json").read_text())["model"] == str(run / "final")
    assert f"{run} is a training run folder: using its final/" in caplog.text
    shutil.copytree(tiny_model, run / "best")
    assert _evaluate(run, tmp_path / "best.json", *flags) == 0
    assert json.loads((tmp_path / "best.json").read_text())["model"] == str(run / "best")


def test_a_folder_holding_no_model_is_named_with_the_fix(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # a run stopped before best/ or final/ was written
    assert _evaluate(tmp_path / "run", tmp_path / "metrics.json", "--num-episodes", "2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model_type" not in err
    assert err.startswith(f"evaluate.py: error: {tmp_path / 'run'} holds no model") and "best/ or final/" in err
    assert not (tmp_path / "metrics.json").exists()


def test_a_run_folder_with_its_marker_config_json_is_still_a_run_folder(tiny_model, tmp_path, capsys):
    """Training marks its run folder with a config.json ("fss_run", for AutoModel): evaluate.py still takes best/."""
    from hf_fss.run_folder import write_run_folder_marker

    run = tmp_path / "run"
    write_run_folder_marker(run)
    assert _evaluate(run, tmp_path / "none.json", "--num-episodes", "2") == 2  # a run that saved no model yet
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model_type" not in err
    assert err.startswith(f"evaluate.py: error: {run} is a training run folder that holds no model yet: no best/")
    assert not (tmp_path / "none.json").exists()
    shutil.copytree(tiny_model, run / "best")
    assert _evaluate(run, tmp_path / "best.json", "--num-episodes", "2") == 0
    assert json.loads((tmp_path / "best.json").read_text())["model"] == str(run / "best")


@pytest.fixture(scope="module")
def tiny_crcnet(tmp_path_factory):
    torch.manual_seed(0)
    config = CRCNetConfig(
        backbone_kwargs={"base_width": 8, "depths": [1, 1, 1, 1]},
        reduce_dim=16,
        cross_reference_reduction=4,
        refinement_steps=2,
        finetune_steps=2,
        image_size=65,
    )
    folder = tmp_path_factory.mktemp("model") / "tiny-crcnet"
    CRCNetModel(config).save_pretrained(folder)
    FewShotSegmentationImageProcessor(image_size=65).save_pretrained(folder)
    return folder


def test_config_overrides_reach_the_model_and_leave_its_weights(tiny_crcnet):
    plain = load_model_with_overrides(str(tiny_crcnet))
    model = load_model_with_overrides(
        str(tiny_crcnet), {"shot_fusion": "average", "inference_scales": [1.0], "refinement_steps": 4}
    )
    assert (model.config.shot_fusion, model.config.inference_scales, model.config.refinement_steps) == (
        "average", (1.0,), 4
    )  # fmt: skip
    assert plain.config.shot_fusion == "finetune+average" and plain.config.inference_scales == (0.75, 1.0, 1.25)
    for key, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_shot_fusion_inference_scales_and_box_supports_from_the_command_line(tiny_crcnet, tmp_path):
    out = tmp_path / "metrics.json"
    flags = ["--num-episodes", "2", "--annotation", "bbox", "--shot-fusion", "average", "--inference-scales", "1.0"]
    assert main(["--model", str(tiny_crcnet), *DATA_FLAGS, "--shot", "2", "--output", str(out), *flags]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["model_overrides"] == {"shot_fusion": "average", "inference_scales": [1.0]}
    assert metrics["annotation"] == "bbox" and metrics["shot"] == 2 and metrics["num_episodes"] == 2


@pytest.mark.slow
def test_omp_num_threads_1_gives_identical_metrics_with_one_and_two_processes(tiny_model, tmp_path):
    """`OMP_NUM_THREADS=1 python scripts/evaluate.py` used to run 2 threads (the cores), so its metrics differed in
    the 6th decimal from a 2-process launch at 1 thread each; now the user's OMP_NUM_THREADS is honoured."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    flags = ["--model", str(tiny_model), *DATA_FLAGS[:-2], "--fold", "0", "--shot", "1", "--num-episodes", "16"]
    launches = {
        1: [sys.executable, str(root / "scripts" / "evaluate.py")],
        2: [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            str(root / "scripts" / "evaluate.py"),
        ],  # fmt: skip
    }
    results = {}
    for processes, command in launches.items():
        out = tmp_path / f"metrics-{processes}.json"
        subprocess.run([*command, *flags, "--output", str(out)], cwd=tmp_path, env=env, check=True, timeout=600)
        results[processes] = json.loads(out.read_text())
    for key in ("miou", "fbiou", "precision", "per_class_iou", "num_episodes"):
        assert json.dumps(results[1][key]) == json.dumps(results[2][key]), key
    assert results[1]["num_episodes"] == 16
