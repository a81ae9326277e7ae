"""
scripts/pretrain_prior.py (hf_fss.pretraining.training): bit-exact resume (weights and queues), the exported folder
loading into a (dilated) DilatedResNet with the key encoder's stage features, the MoCo-layout file, the card, the
Hub upload (recorded, no network), the quickstart recipe, and (slow) a 2-process CPU launch whose queues are
identical across processes at every step.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_RESNET, reset_accelerate, single_thread
from safetensors.torch import load_file

from hf_fss.backbones import DilatedResNet, convert_backbone_state_dict
from hf_fss.pretraining.training import main as pretrain_main
from hf_fss.pretraining.training import parse_pretraining_args
from hf_fss.training import load_tree
from hf_fss.training.arguments import RECIPES_DIR

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = {"stem": "7x7", **TINY_RESNET}
TINY = ["--dataset", "synthetic", "--synthetic-num-train", "48", "--synthetic-num-val", "30", "--synthetic-image-size", "64",
        "--backbone-kwargs", json.dumps(BACKBONE), "--image-size", "40", "--queue-size", "40", "--patch-queue-size", "36",
        "--embedding-dim", "16", "--batch-size", "16", "--max-steps", "5", "--checkpointing-steps", "2",
        "--report-to", "none", "--logging-steps", "1"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def _run(output_dir: Path, *flags: str) -> int:
    reset_accelerate()
    return pretrain_main([*TINY, "--output-dir", str(output_dir), *flags])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    reset_accelerate()
    output_dir = tmp_path_factory.mktemp("prior") / "uninterrupted"
    moco = output_dir.parent / "moco.pth.tar"
    assert _run(output_dir, "--export-moco", str(moco)) == 0
    return output_dir


def test_resume_after_a_checkpoint_is_bit_exact_in_weights_and_queues(uninterrupted, tmp_path):
    output_dir = tmp_path / "interrupted"
    assert _run(output_dir, "--stop-after-steps", "2") == 0  # "killed" after the mid-epoch step-2 checkpoint
    assert not (output_dir / "model.safetensors").exists()
    assert _run(output_dir, "--resume-from-checkpoint", "latest") == 0
    for relative in ("model.safetensors", "checkpoints/step_00000004/model.safetensors"):
        expected, resumed = load_file(uninterrupted / relative), load_file(output_dir / relative)
        assert expected.keys() == resumed.keys()
        assert all(torch.equal(expected[k], resumed[k]) for k in expected), relative
    states = [load_tree(run / "checkpoints/step_00000004", "training_state") for run in (uninterrupted, output_dir)]
    assert set(states[0]) == {"loop", "model.queue", "model.patch_queue"}
    for name in ("model.queue", "model.patch_queue"):
        (a,), (b,) = states[0][name]["rows"], states[1][name]["rows"]
        assert torch.equal(a, b) and states[0][name]["pointer"] == states[1][name]["pointer"] == (4 * 16) % a.shape[0]
    # The final weights differ from the step-4 checkpoint's: training went on to step 5 after the resume.
    run = json.loads((output_dir / "run.json").read_text())
    assert run["steps"] == 5 and run["epochs"] == 2 and run["global_batch_size"] == 16


def test_exported_folder_loads_with_the_key_encoders_stage_features(uninterrupted, tmp_path):
    from hf_fss.pretraining.export import export_prior_extractor
    from hf_fss.pretraining.training import build_model

    config = json.loads((uninterrupted / "config.json").read_text())
    assert (config["backbone"], config["backbone_kwargs"]) == ("resnet50", BACKBONE)
    assert (config["prior_extractor_backbone"], config["encoder"]) == ("resnet50", "encoder_k")
    weights = load_file(uninterrupted / "model.safetensors")
    assert "layer0.conv1.weight" in weights and "layer1.0.conv1.weight" in weights
    assert not any(k.startswith(("head", "fc", "encoder")) for k in weights)
    # The run's key encoder: the step-4 checkpoint's encoder_k, exported, loads with identical stage features.
    loop_args, args = parse_pretraining_args([*TINY, "--output-dir", "unused"])
    model = build_model(loop_args, args, num_processes=1)
    model.load_state_dict(load_file(uninterrupted / "checkpoints" / "step_00000004" / "model.safetensors"))
    for encoder in ("encoder_k", "encoder_q"):
        folder = export_prior_extractor(model, tmp_path / encoder, encoder=encoder)
        reference = getattr(model, encoder).backbone.eval()
        loaded = DilatedResNet(**BACKBONE, output_stride=32).eval()
        loaded.load_weights(str(folder))
        x = torch.randn(2, 3, 64, 64)
        for a, b in zip(reference(x), loaded(x)):
            assert torch.equal(a, b), encoder
    assert not torch.equal(
        model.encoder_k.backbone.layer1[0].conv1.weight, model.encoder_q.backbone.layer1[0].conv1.weight
    )
    # QGNet dilates it: output stride 8, the same weights, layer4 at 1/8 of the input.
    dilated = DilatedResNet(**BACKBONE, output_stride=8)
    dilated.load_weights(str(uninterrupted))
    assert dilated(x)[-1].shape[-1] == 8 and torch.equal(
        dilated.layer4[0].conv2.weight, weights["layer4.0.conv2.weight"]
    )


def test_moco_layout_file_converts_to_the_same_backbone(uninterrupted, tmp_path):
    from safetensors.torch import save_file

    checkpoint = torch.load(uninterrupted.parent / "moco.pth.tar", weights_only=True)
    state = checkpoint["state_dict"]
    assert {
        "module.queue",
        "module.queue_ptr",
        "module.encoder_q.conv1.weight",
        "module.encoder_k.fc.2.weight",
    } <= set(state)
    assert state["module.queue"].shape == (16, 40)  # MoCo's (dim, K)
    exported = load_file(uninterrupted / "model.safetensors")
    converted = convert_backbone_state_dict(DilatedResNet(**BACKBONE), state, moco_encoder="encoder_k")
    assert converted.keys() == exported.keys()
    assert all(torch.equal(converted[k], exported[k]) for k in converted)
    # The same layout as safetensors loads through load_weights(file).
    file = tmp_path / "moco.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    backbone = DilatedResNet(**BACKBONE, output_stride=8)
    backbone.load_weights(str(file))
    assert torch.equal(backbone.layer3[0].conv1.weight, exported["layer3.0.conv1.weight"])


def test_card_and_run_record_state_the_choices(uninterrupted):
    card = (uninterrupted / "README.md").read_text()
    for text in ("superpixel patches as extra encoder inputs", "skimage.segmentation.slic", "n_segments=100",
                 "tau = 0.2", "Training split only", "random (as MoCo", "16 images x", "1 process(es)",
                 "L = 1.0 x L_local + 1.0 x L_global", "K = 40 image keys"):  # fmt: skip
        assert text in card, text
    run = json.loads((uninterrupted / "run.json").read_text())
    assert run["images_per_second"] > 0 and run["num_processes"] == 1


def test_push_to_hub_uploads_the_export_only(uninterrupted, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id))

        def upload_folder(self, **kwargs):
            calls.append(("upload", kwargs["repo_id"], sorted(kwargs["allow_patterns"])))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    from hf_fss.pretraining.training import push_prior_extractor

    push_prior_extractor(uninterrupted, "someone/prior")
    assert calls == [
        ("create", "someone/prior"),
        ("upload", "someone/prior", ["README.md", "config.json", "model.safetensors", "run.json"]),
    ]
    with pytest.raises(ValueError, match="org/name"):
        push_prior_extractor(uninterrupted, "no-org")


def test_quickstart_recipe_and_bad_input(tmp_path, capsys):
    loop_args, args = parse_pretraining_args([])
    assert loop_args.output_dir == "outputs/prior_quickstart" and args.dataset == "synthetic" and args.probe
    assert args.backbone_kwargs == {"stem": "7x7", "base_width": 8, "depths": [1, 1, 1, 1]}
    assert parse_pretraining_args(["--dataset", "synthetic"])[1].backbone_kwargs == {"depth": 50, "stem": "7x7"}
    assert pretrain_main(["--dataset", "synthetic", "--global-weight", "0", "--local-weight", "0"]) == 2
    assert "nothing to train" in capsys.readouterr().err
    assert pretrain_main(["--dataset", str(tmp_path / "missing")]) == 2


@pytest.mark.slow
def test_two_cpu_processes_hold_identical_queues_at_every_step(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (gloo on CPU): Shuffle-BN across processes, keys gathered."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free port: other jobs on the machine may hold the default 29500
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]  # fmt: skip
    digests = tmp_path / "digests"
    flags = [arg if arg != "16" else "8" for arg in TINY]  # batch 8 per process = the same global batch of 16
    result = subprocess.run(
        [*launch, str(ROOT / "scripts" / "pretrain_prior.py"), *flags, "--output-dir", str(tmp_path / "ddp"),
         "--queue-digest-file", str(digests)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["num_processes"] == 2 and run["global_batch_size"] == 16 and run["distributed_type"] == "MULTI_CPU"
    zero, one = (json.loads(Path(f"{digests}.{rank}.json").read_text()) for rank in (0, 1))
    assert len(zero) == 5 and zero == one
    assert len({step["queue"] for step in zero}) == 5  # the queue changed at every step
    DilatedResNet(**BACKBONE, output_stride=8).load_weights(str(tmp_path / "ddp"))


@pytest.mark.parametrize(
    "flags, queues",
    [
        (
            ["--superpixels", "felzenszwalb", "--felzenszwalb-scale", "50", "--global-weight", "0"],
            {"model.patch_queue"},
        ),
        (["--local-form", "pooled", "--symmetric", "true"], {"model.queue", "model.patch_queue"}),
        (["--local-weight", "0"], {"model.queue"}),
    ],
    ids=["felzenszwalb-local-only", "pooled-symmetric", "global-only"],
)
def test_script_runs_the_switches_and_options(flags, queues, tmp_path):
    output_dir = tmp_path / "run"
    assert _run(output_dir, "--max-steps", "2", *flags) == 0
    assert set(load_tree(output_dir / "checkpoints" / "step_00000002", "training_state")) == {"loop", *queues}
    card = (output_dir / "README.md").read_text()
    assert ("local only" in card) == ("--global-weight" in flags) and ("global only" in card) == (
        "--local-weight" in flags
    )
    DilatedResNet(**BACKBONE, output_stride=8).load_weights(str(output_dir))


@pytest.mark.parametrize("recipe", sorted((RECIPES_DIR / "prior").glob("*.yaml")), ids=lambda p: p.name)
def test_every_prior_recipe_parses(recipe):
    loop_args, args = parse_pretraining_args(["--config", str(recipe)])
    assert loop_args.output_dir and args.backbone_kwargs


def test_the_export_is_qgnets_prior_extractor_through_its_config(uninterrupted):
    from hf_fss import QGNetConfig, QGNetModel

    config = json.loads((uninterrupted / "config.json").read_text())
    qgnet = QGNetModel(
        QGNetConfig(
            backbone_kwargs={"base_width": 8, "depths": [1, 1, 1, 1]},
            reduce_dim=16,
            pyramid_bins=(4, 2),
            prior_extractor_backbone=config["prior_extractor_backbone"],
            prior_extractor_kwargs=config["prior_extractor_kwargs"],
            prior_extractor_weights=str(uninterrupted),
        )
    )
    assert qgnet.load_pretrained_extractors() == {"prior_extractor": str(uninterrupted)}
    exported = load_file(uninterrupted / "model.safetensors")
    loaded = qgnet.prior_extractor.state_dict()
    assert exported.keys() <= loaded.keys() and all(torch.equal(loaded[k], exported[k]) for k in exported)
    reference = DilatedResNet(**BACKBONE, output_stride=8).eval()  # the key encoder, dilated as QGNet runs it
    reference.load_state_dict(exported, strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(reference(x), qgnet.prior_extractor(x)))
