"""
scripts/train.py and hf_fss.training: arguments and recipes, the poly schedule, bit-exact resume, the frozen
backbone, saved folders that evaluate to the reported numbers, bad input, and a 2-process CPU launch.

Runs use a tiny NTRENet (ResNet base width 8, one block per stage, 16 channels) on a tiny synthetic benchmark, and
run in this process (`hf_fss.training.main`) except the multi-process launch, which needs `accelerate launch`.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import reset_accelerate, single_thread
from safetensors.torch import load_file

import hf_fss
from hf_fss.training import LoopArguments, load_recipe, load_tree, main, parse_args
from hf_fss.training.arguments import QUICKSTART_RECIPE, RECIPES_DIR
from hf_fss.training.episodic import build_model
from hf_fss.training.loop import EpochShuffleSampler, create_optimizer, create_scheduler

ROOT = Path(__file__).resolve().parents[1]

TINY_RECIPE = {
    "model_type": "ntrenet",
    "dataset": "synthetic",
    "synthetic_num_train": 100,
    "synthetic_num_val": 60,
    "synthetic_image_size": 128,
    "image_size": 65,
    "batch_size": 2,
    "max_steps": 4,
    "learning_rate": 0.01,
    "logging_steps": 1,
    "validation_every_epochs": 0,
    "validation_steps": 2,
    "validation_fraction": 0.25,
    "validation_min_images": 25,
    "num_validation_episodes": 6,
    "num_eval_episodes": 8,
    "report_to": "none",
    "model": {
        "backbone": "resnet50",
        "backbone_kwargs": {"base_width": 8, "depths": [1, 1, 1, 1]},
        "reduce_dim": 16,
        "background_prototype_dim": 16,
        "pyramid_bins": [1.0, 0.5],
        "contrastive_num_negatives": 8,
    },
}
# The synthetic benchmark of TINY_RECIPE, as scripts/evaluate.py flags.
TINY_DATA_FLAGS = ["--synthetic-num-train", "100", "--synthetic-num-val", "60", "--synthetic-image-size", "128"]


_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_RECIPE))
    return path


def _run(recipe: Path, output_dir: Path, *flags: str) -> int:
    reset_accelerate()
    return main(["--config", str(recipe), "--output-dir", str(output_dir), *flags])


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_recipe, tmp_path_factory) -> Path:
    """4 steps with checkpoints every 2, validation every 2, final test: the reference run of several tests."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    output_dir = tmp_path_factory.mktemp("runs") / "uninterrupted"
    pushed = []
    with pytest.MonkeyPatch.context() as patch:  # no network: record what would be uploaded
        patch.setattr("hf_fss.hub.push_to_hub", lambda folder, repo_id, **kwargs: pushed.append((folder, repo_id)))
        assert (
            _run(tiny_recipe, output_dir, "--checkpointing-steps", "2", "--push-to-hub", "someone/tiny-ntrenet") == 0
        )
    assert pushed == [(output_dir / "best", "someone/tiny-ntrenet")]
    return output_dir


# ------------------------------------------------------------------------------------------------- arguments


def test_flags_override_recipe_which_overrides_defaults(tiny_recipe):
    loop, args = parse_args(
        ["--config", str(tiny_recipe), "--learning-rate", "0.5", "--model-kwargs", '{"reduce_dim": 24}']
    )
    assert loop.learning_rate == 0.5  # flag over recipe
    assert loop.batch_size == 2  # recipe over default
    assert loop.momentum == LoopArguments.momentum  # default
    # --model-kwargs updates the recipe's model mapping key by key.
    assert args.model_kwargs["reduce_dim"] == 24
    assert args.model_kwargs["background_prototype_dim"] == 16
    assert args.benchmark == "synthetic"


def test_no_arguments_is_the_quickstart_recipe():
    loop, args = parse_args([])
    assert Path(args.config) == QUICKSTART_RECIPE
    recipe = load_recipe(QUICKSTART_RECIPE)
    assert args.model_type == recipe["model_type"] == "ntrenet"
    assert (args.dataset, args.fold, args.shot) == ("synthetic", 0, 1)
    assert loop.output_dir == "outputs/quickstart"
    assert args.compare_baseline
    # An experiment-selecting flag turns the quickstart recipe off: library defaults underneath.
    assert parse_args(["--model-type", "ntrenet"])[1].config is None


# recipes/prior/ holds scripts/pretrain_prior.py's recipes, parsed by tests/test_pretrain_prior.py.
@pytest.mark.parametrize(
    "recipe", sorted(p for p in RECIPES_DIR.glob("*/*.yaml") if p.parent.name != "prior"), ids=lambda p: p.name
)
def test_every_shipped_recipe_parses(recipe):
    values = load_recipe(recipe)
    # A recipe of a real benchmark needs its --dataset: on the default synthetic data it is refused (issue 22).
    flags = [] if values.get("benchmark", "synthetic") == "synthetic" else ["--dataset", "data/some-folder"]
    _, args = parse_args(["--config", str(recipe), *flags])
    config_class = hf_fss.MODEL_CLASSES[args.model_type][0]
    config_class(**args.model_kwargs)  # every model key is a valid config field


def test_bad_recipe_keys_and_values_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_type: ntrenet\nlearning_rte: 0.1\n")
    with pytest.raises(ValueError, match="learning_rte"):
        parse_args(["--config", str(bad)])
    bad.write_text("model_type: ntrenet\noptimizer: adam\n")
    with pytest.raises(ValueError, match="optimizer"):
        parse_args(["--config", str(bad)])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ValueError, match="'nope'"):
        parse_args(["--model-type", "nope"])
    with pytest.raises(ValueError, match="benchmark"):
        parse_args(["--dataset", "synthetic", "--benchmark", "voc2099"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model-type", "no_such_method"], "no_such_method"),
        (["--dataset", "synthetic", "--benchmark", "voc2099"], "voc2099"),
        (["--config", "no/such/recipe.yaml"], "no/such/recipe.yaml"),
        (["--dataset", "no/such_dataset_folder_or_hub_id/x"], "no/such_dataset_folder_or_hub_id/x"),
        (["--learning-rte", "0.1"], "unrecognized arguments: --learning-rte 0.1"),
    ],
)
def test_bad_input_exits_non_zero_and_writes_nothing(tmp_path, capsys, flags, message):
    output_dir = tmp_path / "out"
    assert main([*flags, "--output-dir", str(output_dir)]) != 0
    assert message in capsys.readouterr().err
    assert not output_dir.exists()


def test_unknown_model_config_field_is_named(tiny_recipe, tmp_path, capsys):
    output_dir = tmp_path / "out"
    assert _run(tiny_recipe, output_dir, "--model-kwargs", '{"reduce_dimm": 8}') != 0
    assert "reduce_dimm" in capsys.readouterr().err
    assert not output_dir.exists()


@pytest.mark.slow
def test_script_reports_bad_input_with_exit_status(tmp_path):
    output_dir = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--model-type", "no_such_method", "--output-dir",
         str(output_dir)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "unknown model type 'no_such_method'" in result.stderr
    assert not output_dir.exists()


# ------------------------------------------------------------------------------------------------ optimisation


def test_poly_schedule_and_frozen_parameters_out_of_the_optimizer(tiny_recipe):
    loop, args = parse_args(["--config", str(tiny_recipe), "--learning-rate", "0.1", "--lr-power", "0.9"])
    model, _ = build_model(args)
    optimizer = create_optimizer(model, loop)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    assert not any(id(p) in in_optimizer for p in model.backbone.parameters())
    # Under N processes Accelerate steps the scheduler N times per optimizer step.
    for processes in (1, 2):
        scheduler = create_scheduler(optimizer, loop, max_steps=10, num_processes=processes)
        for step in range(10):
            expected = 0.1 * (1 - step / 10) ** 0.9
            assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)
            for _ in range(processes):
                optimizer.step()
                scheduler.step()


def test_epoch_sampler_is_a_seeded_permutation_per_epoch():
    sampler = EpochShuffleSampler(50, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(50)) and list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(EpochShuffleSampler(50, seed=3)) == first


# ----------------------------------------------------------------------------------------------- training runs


def test_run_folder_record_and_frozen_backbone(uninterrupted_run, tiny_recipe):
    record = json.loads((uninterrupted_run / "run.json").read_text())
    assert record["steps"] == 4 and record["num_processes"] == 1
    assert record["effective_batch_size"] == 2
    assert "held-out" in record["validation"]["source"]
    assert {h["step"] for h in record["validation_history"]} == {2, 4}
    for folder in ("final", "best"):
        names = {p.name for p in (uninterrupted_run / folder).iterdir()}
        assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "metrics.json"} <= names
    assert sorted(p.name for p in (uninterrupted_run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]

    # The frozen backbone (weights and batch-norm statistics) ends exactly as it started.
    from accelerate.utils import set_seed

    loop, args = parse_args(["--config", str(tiny_recipe)])
    set_seed(loop.seed)
    initial, _ = build_model(args)
    final = load_file(uninterrupted_run / "final" / "model.safetensors")
    backbone = initial.backbone.state_dict()
    assert any("running_mean" in k for k in backbone)
    for name, value in backbone.items():
        assert torch.equal(final[f"backbone.{name}"], value), name
    # ... while the trained parts moved.
    assert not torch.equal(final["down_query.0.weight"], initial.state_dict()["down_query.0.weight"])
    # Only trainable parameters have optimizer state.
    optimizer_state = load_tree(uninterrupted_run / "checkpoints" / "step_00000004", "optimizer")
    num_trainable = sum(1 for p in initial.parameters() if p.requires_grad)
    assert len(optimizer_state["param_groups"][0]["params"]) == num_trainable


def test_resume_from_checkpoint_is_bit_exact(uninterrupted_run, tiny_recipe, tmp_path):
    output_dir = tmp_path / "interrupted"
    # Killed after the step-2 checkpoint (mid-epoch), then resumed.
    assert _run(tiny_recipe, output_dir, "--checkpointing-steps", "2", "--stop-after-steps", "2") == 0
    assert not (output_dir / "final").exists()
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    assert _run(tiny_recipe, output_dir, "--checkpointing-steps", "2", "--resume-from-checkpoint", "latest") == 0

    for relative in ("final/model.safetensors", "checkpoints/step_00000004/model.safetensors"):
        expected, resumed = load_file(uninterrupted_run / relative), load_file(output_dir / relative)
        assert expected.keys() == resumed.keys()
        for key in expected:
            assert torch.equal(expected[key], resumed[key]), f"{relative}: {key}"
    # NTRENet's contrastive bank, the loop's state and the model selection (training_state) match too.
    states = [
        load_tree(run / "checkpoints/step_00000004", "training_state") for run in (uninterrupted_run, output_dir)
    ]
    assert list(states[0]) == ["loop", "model.contrastive_bank", "callback_0.0"]
    for name in states[0]:
        expected, resumed = states[0][name], states[1][name]
        assert expected.keys() == resumed.keys()
        for key in expected:
            a, b = expected[key], resumed[key]
            if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
                assert all(torch.equal(x, y) for x, y in zip(a, b)), key
            elif isinstance(a, torch.Tensor):
                assert torch.equal(a, b), key
            else:
                assert a == b, key
    bank = states[1]["model.contrastive_bank"]
    assert bank["keys"], "the contrastive bank should hold prototypes after training"
    assert json.loads((output_dir / "final" / "metrics.json").read_text())["miou"] == pytest.approx(
        json.loads((uninterrupted_run / "final" / "metrics.json").read_text())["miou"], abs=0
    )


def test_saved_folder_loads_and_evaluates_to_the_reported_miou(uninterrupted_run, tmp_path):
    from transformers import AutoImageProcessor, AutoModel

    from hf_fss.evaluation.runner import main as evaluate_main

    folder = uninterrupted_run / "final"
    model = AutoModel.from_pretrained(folder)
    processor = AutoImageProcessor.from_pretrained(folder)
    assert type(model).__name__ == "NTRENetModel" and processor.image_size == 65
    reported = json.loads((folder / "metrics.json").read_text())
    out = tmp_path / "metrics.json"
    flags = ["--model", str(folder), "--dataset", "synthetic", "--fold", "0", "--shot", "1", *TINY_DATA_FLAGS]
    flags += ["--num-episodes", str(reported["num_episodes"]), "--seed", str(reported["seed"]), "--output", str(out)]
    assert evaluate_main(flags) == 0
    metrics = json.loads(out.read_text())
    assert metrics["miou"] == reported["miou"]
    assert metrics["per_class_iou"] == reported["per_class_iou"]


# What a user runs in a new Python: the run folder given to AutoModel and to pipeline(), after `import hf_fss`.
_LOAD_RUN_FOLDER = """
import sys
import torch
import hf_fss
from transformers import AutoModel, pipeline

run, out = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(run)
segmenter = pipeline("few-shot-segmentation", model=run)
torch.save({
    "model": (type(model).__name__, model.name_or_path, model.state_dict()),
    "pipeline": (type(segmenter.model).__name__, segmenter.model.name_or_path, segmenter.model.state_dict()),
    "processor": segmenter.image_processor.to_dict(),
}, out)
"""


def _load_run_folder(run: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", _LOAD_RUN_FOLDER, str(run), str(out)], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip


def test_automodel_and_pipeline_take_a_run_folder_as_its_best_model(uninterrupted_run, tmp_path):
    """
    `AutoModel.from_pretrained(run)` / `pipeline(..., model=run)` used to fail with transformers' "Should have a
    `model_type` key": training now writes a marker config.json, and both load best/ (else final/), saying which, with
    best/'s weights and best/'s saved image processor (not one built from defaults).
    """
    assert json.loads((uninterrupted_run / "config.json").read_text())["model_type"] == "fss_run"
    # A copy whose best/ processor differs from the defaults, so that a default processor cannot pass for it.
    run = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    processor_file = run / "best" / "preprocessor_config.json"
    saved = json.loads(processor_file.read_text())
    assert saved["pad_with_mean"] is False
    processor_file.write_text(json.dumps({**saved, "pad_with_mean": True}))

    loaded = _load_run_folder(run, tmp_path / "loaded.pt")
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stderr.count(f"{run} is a training run folder: using its best/") == 2  # AutoModel, pipeline()
    result = torch.load(tmp_path / "loaded.pt", weights_only=False)
    weights = load_file(run / "best" / "model.safetensors")
    for name, path, state in (result["model"], result["pipeline"]):
        assert (name, path) == ("NTRENetModel", str(run / "best"))
        assert weights.keys() <= state.keys()
        assert all(torch.equal(state[key], value) for key, value in weights.items())
    assert result["processor"]["pad_with_mean"] is True and result["processor"]["image_size"] == 65

    # Without best/ the run's final/ is taken; without either, one line says the run holds no model yet.
    shutil.rmtree(run / "best")
    loaded = _load_run_folder(run, tmp_path / "final.pt")
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert torch.load(tmp_path / "final.pt", weights_only=False)["model"][1] == str(run / "final")
    shutil.rmtree(run / "final")
    from transformers import AutoModel

    with pytest.raises(FileNotFoundError, match=r"is a training run folder that holds no model yet: no best/"):
        AutoModel.from_pretrained(run)


@pytest.mark.slow
def test_two_cpu_processes_train_and_evaluate_like_one(tiny_recipe, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without GPU (gloo), then 1 vs 2 processes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    output_dir = tmp_path / "ddp"
    with socket.socket() as s:  # a free port: other jobs on the machine may hold the default 29500
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(port)]  # fmt: skip
    train = subprocess.run(
        [*launch, str(ROOT / "scripts" / "train.py"), "--config", str(tiny_recipe), "--output-dir", str(output_dir),
         "--max-steps", "2", "--gradient-accumulation-steps", "2", "--no-evaluate-at-end", "--validation-steps", "2"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    record = json.loads((output_dir / "run.json").read_text())
    assert record["num_processes"] == 2 and record["effective_batch_size"] == 2 * 2 * 2  # processes x batch x accum
    assert record["distributed_type"] == "MULTI_CPU"

    flags = ["--model", str(output_dir / "final"), "--dataset", "synthetic", "--fold", "0", "--shot", "1",
             *TINY_DATA_FLAGS, "--num-episodes", "9", "--seed", "5"]  # fmt: skip
    two = subprocess.run(
        [*launch, str(ROOT / "scripts" / "evaluate.py"), *flags, "--output", str(tmp_path / "two.json")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]

    from hf_fss.evaluation.runner import main as evaluate_main

    # One thread, as the launched processes (OMP_NUM_THREADS=1): see _one_thread.
    assert evaluate_main([*flags, "--output", str(tmp_path / "one.json")]) == 0
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    for key in ("miou", "fbiou", "precision", "per_class_iou", "num_episodes", "seed", "protocol"):
        assert one[key] == two[key], key


def test_packaged_recipes_resolve_from_any_folder(tmp_path, monkeypatch):
    """Recipes and card templates are package data; `--config recipes/<method>/<name>.yaml` works from any folder."""
    assert RECIPES_DIR == Path(hf_fss.__file__).parent / "recipes"
    monkeypatch.chdir(tmp_path)
    _, args = parse_args(["--config", "recipes/ntrenet/pascal5i_resnet50.yaml", "--dataset", "data/pascal5i"])
    assert Path(args.config) == RECIPES_DIR / "ntrenet" / "pascal5i_resnet50.yaml"
    # A file on disk wins over the packaged recipe of the same name.
    (tmp_path / "recipes" / "ntrenet").mkdir(parents=True)
    (tmp_path / "recipes" / "ntrenet" / "pascal5i_resnet50.yaml").write_text("model_type: ntrenet\nshot: 5\n")
    _, args = parse_args(["--config", "recipes/ntrenet/pascal5i_resnet50.yaml"])
    assert args.shot == 5
    with pytest.raises(FileNotFoundError, match="recipes/ntrenet/nope.yaml"):
        parse_args(["--config", "recipes/ntrenet/nope.yaml"])
