"""
Training checkpoints: no file of a checkpoint folder can run code on resume, damaged checkpoints are refused naming
the file (`latest` falls back to the newest one that verifies, still bit-exact), settings that cannot change on
resume are compared, a non-finite loss stops training without saving anything non-finite, and staging folders of
killed runs are cleaned up.

Runs use the tiny NTRENet of tests/test_training.py, in this process.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hf_fss.training import CheckpointError, load_tree, verify_checkpoint
from hf_fss.training.checkpoint import MANIFEST_NAME, save_tree, write_manifest
from hf_fss.training.loop import remove_stale_checkpoint_staging

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_training  # noqa: E402

# test_training's tiny run: its recipe fixture, its one-thread autouse fixture and its launcher.
recipe, _one_thread, _run = test_training.tiny_recipe, test_training._one_thread, test_training._run

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory) -> Path:
    """An uninterrupted 4-step run."""
    output_dir = tmp_path_factory.mktemp("runs") / "reference"
    assert _run(recipe, output_dir, "--checkpointing-steps", "2") == 0
    return output_dir


@pytest.fixture(scope="module")
def interrupted(recipe, tmp_path_factory) -> Path:
    """The same run stopped after step 3, with checkpoints at steps 1, 2, 3 (copy it before changing it)."""
    output_dir = tmp_path_factory.mktemp("runs") / "interrupted"
    assert _run(recipe, output_dir, "--checkpointing-steps", "1", "--stop-after-steps", "3") == 0
    return output_dir


@pytest.fixture
def run_copy(interrupted, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(interrupted, copy)
    return copy


def _step(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


# ------------------------------------------------------------------------------------------------ format


def test_a_checkpoint_is_safetensors_json_and_a_manifest(interrupted):
    folder = _step(interrupted, 3)
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(
        [MANIFEST_NAME, "model.safetensors"]
        + [
            f"{n}.{ext}"
            for n in ("optimizer", "scheduler", "training_state", "rng_state_0")
            for ext in ("json", "safetensors")
        ]
    )
    manifest = verify_checkpoint(folder)
    assert manifest["step"] == 3 and set(manifest["files"]) == set(names) - {MANIFEST_NAME}
    assert manifest["settings"]["batch_size"] == 2 and manifest["settings"]["model_config.reduce_dim"] == 16
    # A folder made with plain mkdir's mode (no 0700 of a temporary folder kept after the rename).
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    assert not [p for p in (interrupted / "checkpoints").iterdir() if p.name.startswith(".")]


def test_state_trees_round_trip_exactly(tmp_path):
    import random

    random.seed(3)
    np.random.seed(4)
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "optimizer": {
            "state": {0: {"momentum_buffer": torch.randn(3)}},
            "param_groups": [{"lr": float("nan"), "params": [0]}],
        },
        "none": None,
        "empty": torch.zeros(0, 4),
    }
    save_tree(state, tmp_path, "state")
    loaded = load_tree(tmp_path, "state")
    assert loaded["python"] == state["python"]
    assert loaded["numpy"][0] == "MT19937" and loaded["numpy"][1].dtype == np.uint32
    assert all(np.array_equal(a, b) for a, b in zip(loaded["numpy"], state["numpy"]))
    assert torch.equal(loaded["torch"], state["torch"])
    assert torch.equal(
        loaded["optimizer"]["state"][0]["momentum_buffer"], state["optimizer"]["state"][0]["momentum_buffer"]
    )
    assert np.isnan(loaded["optimizer"]["param_groups"][0]["lr"]) and loaded["none"] is None
    assert loaded["empty"].shape == (0, 4)
    with pytest.raises(TypeError, match=r"cannot checkpoint state\.f of type function"):
        save_tree({"f": lambda: 0}, tmp_path, "state")


# ---------------------------------------------------------------------------------------------- kind 1


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(folder: Path, marker: Path) -> None:
    """A pickle payload in every file of `folder`, plus in the files Accelerate's load_state would read."""
    for name in ["optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", "scaler.pt"]:
        (folder / name).write_bytes(b"")
    for path in folder.iterdir():
        torch.save({"state": _Payload(marker)}, path)


def test_planted_pickle_payloads_never_run(recipe, run_copy, tmp_path, capsys):
    import pickle

    marker = tmp_path / "payload-ran"
    # The payload works when something unpickles it.
    pickle.loads(pickle.dumps(_Payload(tmp_path / "probe")))
    assert (tmp_path / "probe").exists()

    newest = _step(run_copy, 3)
    settings = verify_checkpoint(newest)["settings"]
    _plant(newest, marker)
    # Named explicitly: refused, naming the file.
    assert _run(recipe, run_copy, "--resume-from-checkpoint", str(newest)) == 2
    assert f"{newest / MANIFEST_NAME} is damaged" in capsys.readouterr().err
    # A crafted folder whose manifest matches its payloads: every file is still read as safetensors or JSON.
    write_manifest(newest, 3, settings)
    assert _run(recipe, run_copy, "--resume-from-checkpoint", str(newest)) == 2
    assert f"{newest / 'model.safetensors'} cannot be loaded into the model being trained" in capsys.readouterr().err
    (newest / "model.safetensors").write_bytes((_step(run_copy, 2) / "model.safetensors").read_bytes())
    write_manifest(newest, 3, settings)
    assert _run(recipe, run_copy, "--resume-from-checkpoint", str(newest)) == 2
    assert f"{newest / 'optimizer.json'} is not valid JSON" in capsys.readouterr().err
    # The same payloads in every checkpoint: `latest` finds none usable and says why.
    for step in (1, 2, 3):
        _plant(_step(run_copy, step), marker)
    assert _run(recipe, run_copy, "--resume-from-checkpoint", "latest") == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and str(_step(run_copy, 1)) in err
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- kind 2c


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "name, damage",
    [
        ("model.safetensors", _flip_bytes),
        ("rng_state_0.safetensors", lambda p: p.write_bytes(os.urandom(200))),
        ("optimizer.safetensors", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
        ("training_state.json", lambda p: p.unlink()),
    ],
)
def test_a_damaged_checkpoint_is_refused_naming_the_file(run_copy, name, damage):
    folder = _step(run_copy, 3)
    damage(folder / name)
    with pytest.raises(CheckpointError, match=rf"{folder / name} is (damaged|missing)"):
        verify_checkpoint(folder)


def test_a_checkpoint_without_manifest_is_refused(run_copy):
    (_step(run_copy, 3) / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match=rf"{_step(run_copy, 3)} has no {MANIFEST_NAME}"):
        verify_checkpoint(_step(run_copy, 3))


def test_latest_falls_back_past_a_damaged_checkpoint_and_stays_bit_exact(recipe, reference, run_copy, capsys):
    damaged = _step(run_copy, 3) / "model.safetensors"
    _flip_bytes(damaged)
    # A killed save of an older hf_fss left its staging folder: the resumed run removes it.
    (run_copy / "checkpoints" / ".tmp-step_00000004").mkdir()
    os.utime(run_copy / "checkpoints" / ".tmp-step_00000004", (1_000_000_000, 1_000_000_000))
    assert _run(recipe, run_copy, "--checkpointing-steps", "2", "--resume-from-checkpoint", "latest") == 0
    assert not [p for p in (run_copy / "checkpoints").iterdir() if p.name.startswith(".")]
    out = capsys.readouterr().out
    assert f"skipping checkpoint {_step(run_copy, 3)}: {damaged} is damaged" in out
    assert f"resuming from {_step(run_copy, 2)}, the newest checkpoint that verifies" in out
    expected, resumed = (
        load_file(reference / "final/model.safetensors"),
        load_file(run_copy / "final/model.safetensors"),
    )
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    reference_metrics = json.loads((reference / "final/metrics.json").read_text())
    assert json.loads((run_copy / "final/metrics.json").read_text())["miou"] == reference_metrics["miou"]


# ---------------------------------------------------------------------------------------------- kind 2d


@pytest.mark.parametrize(
    "flags, difference",
    [
        (["--batch-size", "4"], "batch_size: checkpoint 2, now 4"),
        (["--seed", "7"], "seed: checkpoint 321, now 7"),
        (["--learning-rate", "0.02"], "learning_rate: checkpoint 0.01, now 0.02"),
        (["--model-kwargs", '{"reduce_dim": 24}'], "model_config.reduce_dim: checkpoint 16, now 24"),
    ],
)
def test_changed_settings_are_refused_on_resume(recipe, run_copy, capsys, flags, difference):
    before = {p: p.stat().st_mtime_ns for p in run_copy.rglob("*")}
    assert _run(recipe, run_copy, "--resume-from-checkpoint", "latest", *flags) == 2
    err = capsys.readouterr().err
    assert "cannot resume from" in err and difference in err
    assert not (run_copy / "run.json").exists() and not (run_copy / "final").exists()
    assert {p: p.stat().st_mtime_ns for p in run_copy.rglob("*")} == before


# ------------------------------------------------------------------------------------------------ kind 6


def test_non_finite_learning_rate_is_refused(recipe, tmp_path, capsys):
    assert _run(recipe, tmp_path / "out", "--learning-rate", "nan", "--lr-scheduler", "constant") == 2
    assert "learning_rate must be a finite number, got nan" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_non_finite_loss_stops_training_and_saves_nothing_non_finite(recipe, tmp_path, capsys, monkeypatch):
    from hf_fss.models.ntrenet.modeling_ntrenet import NTRENetModel

    forward, calls = NTRENetModel.forward, []

    def nan_from_step_3(self, *args, **kwargs):
        outputs = forward(self, *args, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) >= 3:
                outputs.loss = outputs.loss * float("nan")
        return outputs

    monkeypatch.setattr(NTRENetModel, "forward", nan_from_step_3)
    output_dir = tmp_path / "nan"
    assert _run(recipe, output_dir, "--checkpointing-steps", "2") == 1
    err = capsys.readouterr().err
    assert "step 3: the loss is not finite (loss=nan" in err
    assert f"The last good checkpoint is {_step(output_dir, 2)}" in err
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["step_00000002"]
    assert not (output_dir / "final").exists() and not (output_dir / "run.json").exists()
    best = load_file(output_dir / "best" / "model.safetensors")  # validated at step 2, before the NaN
    assert all(torch.isfinite(v).all() for v in best.values() if v.is_floating_point())


def test_non_finite_weights_are_never_saved(recipe, tmp_path, capsys, monkeypatch):
    """Weights that turn NaN after a finite loss (a NaN step) are caught before the checkpoint or best/ save."""
    from hf_fss.training.loop import TrainingLoop

    original = TrainingLoop.save_checkpoint

    def poison_then_save(self):
        with torch.no_grad():
            next(p for p in self.unwrapped_model.parameters() if p.requires_grad).fill_(float("nan"))
        return original(self)

    monkeypatch.setattr(TrainingLoop, "save_checkpoint", poison_then_save)
    output_dir = tmp_path / "nan-weights"
    assert _run(recipe, output_dir, "--checkpointing-steps", "1") == 1
    assert "after step 1 the weights are not finite" in capsys.readouterr().err
    assert not (output_dir / "checkpoints").exists()
    assert not (output_dir / "best").exists() and not (output_dir / "final").exists()


def test_non_finite_final_weights_are_not_saved(recipe, tmp_path, capsys, monkeypatch):
    from hf_fss.training.loop import TrainingLoop

    original = TrainingLoop.run

    def run_then_poison(self):
        state = original(self)
        with torch.no_grad():
            next(p for p in self.unwrapped_model.parameters() if p.requires_grad).fill_(float("inf"))
        return state

    monkeypatch.setattr(TrainingLoop, "run", run_then_poison)
    output_dir = tmp_path / "inf-final"
    assert _run(recipe, output_dir, "--checkpointing-steps", "2") == 1
    err = capsys.readouterr().err
    assert "after step 4 the weights are not finite" in err and "final/ is not saved" in err
    assert not (output_dir / "final").exists() and not (output_dir / "run.json").exists()
    best = load_file(output_dir / "best" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in best.values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------------ kind 9


def test_staging_folders_of_killed_runs_are_removed(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from hf_fss.staging import _host

    stale = checkpoints / f".step_00000004.partial.{_host()}.{dead.pid}.abcd1234"
    legacy = checkpoints / ".tmp-step_00000002"
    live = checkpoints / f".step_00000006.partial.{_host()}.{os.getpid()}.abcd1234"
    for folder in (stale, legacy, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    old = 1_000_000_000
    os.utime(legacy / "model.safetensors", (old, old))
    os.utime(legacy, (old, old))
    removed = remove_stale_checkpoint_staging(tmp_path / "run")
    assert sorted(removed) == sorted([stale, legacy])
    assert live.exists() and not stale.exists() and not legacy.exists()


# ------------------------------------------------------------------------------------------------ 2 processes


@pytest.mark.slow
def test_two_processes_resume_bit_exact(recipe, tmp_path):
    """`accelerate launch` with 2 CPU processes: a per-process RNG file each, one manifest, a bit-exact resume."""
    import socket

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}

    def launch(output_dir: Path, *flags: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                   str(port), str(root / "scripts" / "train.py"), "--config", str(recipe), "--output-dir",
                   str(output_dir), "--max-steps", "2", "--no-evaluate-at-end", "--validation-steps", "2",
                   "--checkpointing-steps", "1", *flags]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    launch(tmp_path / "whole")
    launch(tmp_path / "resumed", "--stop-after-steps", "1")
    manifest = verify_checkpoint(_step(tmp_path / "resumed", 1))
    assert {"rng_state_0.json", "rng_state_1.json"} <= set(manifest["files"])
    assert manifest["settings"]["num_processes"] == 2
    launch(tmp_path / "resumed", "--resume-from-checkpoint", "latest")
    expected = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
