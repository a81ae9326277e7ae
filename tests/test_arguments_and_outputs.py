"""
Issue 22, kinds 2, 4 and 5: every numeric flag has its range checked up front (flags and `--config` recipe values
alike), one line naming the flag and the range, exit status 2, nothing written; a run holds its output folder
(a second run is refused naming the first, a stale lock is taken over with a line saying so); operating-system
errors (a file where the folder should be, a folder one may not write, a full disk mid-save) are one line, exit 2,
with what was saved before intact.
"""

import errno
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from hf_fss.evaluation.runner import main as evaluate_main
from hf_fss.file_utils import LOCK_NAME, OutputLock
from hf_fss.training import main as train_main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_training  # noqa: E402

recipe, _one_thread, _run = test_training.tiny_recipe, test_training._one_thread, test_training._run

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _one_line(err: str, prog: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------------ kind 2: ranges


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--max-grad-norm", "-1"], "--max-grad-norm: max_grad_norm must be a finite number > 0 (or unset), got -1.0"),
        (["--scale-max", "1e30"], "--scale-max: scale_max must be a finite number in (0, 10], got 1e+30"),
        (["--learning-rate", "0"], "--learning-rate: learning_rate must be a finite number > 0, got 0.0"),
        (
            ["--learning-rate", "inf"],
            "--learning-rate: learning_rate must be a finite number, got inf (allowed: a finite number > 0)",
        ),
        (["--image-size", "7"], "--image-size: image_size must be an integer >= 32, got 7"),
        (["--momentum", "1.5"], "--momentum: momentum must be a finite number in [0, 1), got 1.5"),
        (["--seed", "-1"], "--seed: seed must be an integer in [0, 4294967295], got -1"),
        (["--model-kwargs", "[1, 2]"], "--model-kwargs (recipe key model) must be a JSON object"),
        (["--model-kwargs", '{"reduce_dim": -1}'], "--model-kwargs (recipe key model): reduce_dim must be positive"),
        (["--model-kwargs", '{"reduce_dim": "x"}'], "Field 'reduce_dim' expected int"),
    ],
)
def test_train_flags_out_of_range_are_one_line_and_write_nothing(recipe, tmp_path, capsys, flags, expected):
    out = tmp_path / "out"
    assert _run(recipe, out, *flags) == 2
    assert expected in _one_line(capsys.readouterr().err, "train.py")
    assert not out.exists()


def test_recipe_values_are_checked_as_flags(recipe, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), "max_grad_norm": -1.0, "model": [1]}))
    assert train_main(["--config", str(bad), "--output-dir", str(tmp_path / "out")]) == 2
    assert "--model-kwargs (recipe key model) must be a JSON object" in _one_line(capsys.readouterr().err, "train.py")
    bad.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), "max_grad_norm": -1.0}))
    assert train_main(["--config", str(bad), "--output-dir", str(tmp_path / "out")]) == 2
    assert "max_grad_norm must be a finite number > 0" in _one_line(capsys.readouterr().err, "train.py")
    bad.write_text("model:\n  backbone: resnet50\n bad: [1\n")  # PyYAML's own message spans three lines
    assert train_main(["--config", str(bad), "--output-dir", str(tmp_path / "out")]) == 2
    assert "is not valid YAML at line 3, column 2: expected <block end>" in _one_line(
        capsys.readouterr().err, "train.py"
    )
    assert not (tmp_path / "out").exists()


def test_pretrain_flag_out_of_range(tmp_path, capsys):
    from hf_fss.pretraining.training import main as pretrain_main

    assert pretrain_main(["--temperature", "0", "--output-dir", str(tmp_path / "out")]) == 2
    assert "--temperature: temperature must be a finite number > 0" in _one_line(
        capsys.readouterr().err, "pretrain_prior.py"
    )
    assert not (tmp_path / "out").exists()


def test_evaluate_flags_out_of_range(tmp_path, capsys):
    out = tmp_path / "metrics.json"
    for flags, expected in (
        (["--shot", "0"], "--shot must be an integer >= 1, got 0"),
        (["--seeds", "1", "-2"], "--seeds must be an integer in [0, 4294967295], got -2"),
        (
            ["--inference-scales", "nan"],
            "--inference-scales must be a finite number, got nan (allowed: a finite number > 0)",
        ),
    ):
        assert (
            evaluate_main(["--model", str(tmp_path / "model"), "--dataset", "synthetic", "--output", str(out), *flags])
            == 2
        )
        assert expected in _one_line(capsys.readouterr().err, "evaluate.py")
    assert not out.exists()


@pytest.mark.parametrize(
    "script, flags, expected",
    [
        ("benchmark.py", ["--image-size", "7"], "--image-size must be an integer >= 32, got 7"),
        ("benchmark.py", ["--model-kwargs", "[1,2]"], "--model-kwargs: must be a JSON object"),
        (
            "compare.py",
            ["--models", "a", "b", "--dataset", "synthetic", "--confidence", "1"],
            "--confidence must be a finite number in (0, 1)",
        ),
        ("prepare_dataset.py", ["synthetic", "--num-proc", "0"], "--num-proc must be an integer >= 1, got 0"),
        ("visualize_episodes.py", ["--scale", "0"], "--scale must be an integer >= 1, got 0"),
        (
            "convert_original_checkpoint.py",
            ["--model-type", "ntrenet", "--checkpoint", "x.pth", "--pyramid-bins", "-1"],
            "--pyramid-bins: must be a finite number > 0",
        ),
    ],
)
def test_scripts_refuse_out_of_range_flags_with_exit_2(tmp_path, script, flags, expected):
    target = ["--output-dir", str(tmp_path / "out")]
    if script == "visualize_episodes.py":
        target = ["--output", str(tmp_path / "out" / "x.png")]
    elif script == "benchmark.py":
        target = ["--output", str(tmp_path / "out" / "x.json")]
    elif script == "compare.py":
        target = ["--output-dir", str(tmp_path / "out")]
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *flags, *target],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert expected in _one_line(result.stderr, script)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ kind 4: runs that mix

_HOLD = textwrap.dedent(
    """
    import sys, time
    from hf_fss.file_utils import OutputLock
    with OutputLock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(120)
    """
)


def test_a_second_run_into_a_held_folder_is_refused_naming_the_first(recipe, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _run(recipe, out, "--max-steps", "1") == 2
        line = _one_line(capsys.readouterr().err, "train.py")
        assert f"is in use by another run (pid {holder.pid} on " in line and "choose another --output-dir" in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, f"{LOCK_NAME}.json"]  # the first run's only
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_with_a_line_and_released_after_the_run(recipe, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"host": os.uname().nodename, "pid": int(dead.stdout), "started": "earlier", "command": ["train.py"]}
    (out / f"{LOCK_NAME}.json").write_text(json.dumps(record))
    assert _run(recipe, out, "--max-steps", "1", "--no-evaluate-at-end") == 0
    assert f"taking over the lock of a run that ended without releasing it (pid {int(dead.stdout)}" in (
        capsys.readouterr().out
    )
    assert not (out / f"{LOCK_NAME}.json").exists()  # released on exit
    with OutputLock(out):  # free again
        pass


def _folder_state(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_a_finished_run_is_refused_without_overwrite_even_under_an_overwriting_recipe(recipe, tmp_path, capsys):
    """The quickstart recipe's `overwrite_output_dir: true` let a second run with another --output-dir replace
    run.json and final/ of a finished run there (beside its old best/): it covers only the recipe's own folder."""
    overwriting = tmp_path / "quick.yaml"
    settings = {"overwrite_output_dir": True, "output_dir": str(tmp_path / "recipe_out"), "validation_steps": None}
    overwriting.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), **settings}))
    out = tmp_path / "out"
    assert _run(overwriting, out, "--max-steps", "1") == 0
    (out / "best").mkdir()  # as an earlier run with validation left it
    (out / "best" / "config.json").write_text("{}")
    before = _folder_state(out)
    capsys.readouterr()
    assert _run(overwriting, out, "--max-steps", "1", "--seed", "5") == 2
    line = _one_line(capsys.readouterr().err, "train.py")
    assert f"--output-dir '{out}' already holds a run (run.json, config.json, final, best" in line
    assert "--overwrite-output-dir to start over" in line
    assert _folder_state(out) == before
    # With the flag the old run goes whole: no best/ of the old run beside the new final/.
    assert _run(overwriting, out, "--max-steps", "1", "--seed", "5", "--overwrite-output-dir") == 0
    assert not (out / "best").exists() and json.loads((out / "run.json").read_text())["arguments"]["seed"] == 5


@pytest.mark.parametrize("trace", ["config.json", "best", "final", "baseline_metrics.json", "model.safetensors"])
def test_any_trace_of_a_run_is_refused(recipe, tmp_path, capsys, trace):
    out = tmp_path / "out"
    out.mkdir()
    if "." in trace:
        (out / trace).write_text("{}")
    else:
        (out / trace).mkdir()
    assert _run(recipe, out, "--max-steps", "1") == 2
    assert f"already holds a run ({trace})" in _one_line(capsys.readouterr().err, "train.py")
    assert [p.name for p in out.iterdir()] == [trace]


def test_the_quickstart_overwrites_only_its_own_folder():
    from hf_fss.training.arguments import parse_args

    assert parse_args([])[0].overwrite_output_dir  # run again, the quickstart replaces outputs/quickstart
    assert not parse_args(["--output-dir", "elsewhere"])[0].overwrite_output_dir
    assert parse_args(["--output-dir", "elsewhere", "--overwrite-output-dir"])[0].overwrite_output_dir


def test_a_run_that_fails_after_starting_leaves_no_run_folder_marker(recipe, tmp_path, capsys):
    """The marker config.json was written at the start: a diverged run left it, a 'run folder' without a model."""
    out = tmp_path / "out"
    assert _run(recipe, out, "--learning-rate", "1e30", "--max-steps", "1") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # progress bars aside
    assert len(errors) == 1 and errors[0].startswith("train.py: error: ") and "non-finite" in errors[0], errors
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ kind 5: OS errors


def test_output_dir_that_is_a_file(recipe, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("not a folder")
    assert _run(recipe, out, "--max-steps", "1") == 2
    assert f"--output-dir '{out}' is a file; give a folder path" in _one_line(capsys.readouterr().err, "train.py")
    assert out.read_text() == "not a folder"


def test_output_dir_one_may_not_write(recipe, tmp_path, capsys, monkeypatch):
    # Tests run as root, where chmod does not stop writes: the check's os.access answers as for another user.
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != tmp_path)
    assert _run(recipe, tmp_path / "out", "--max-steps", "1") == 2
    assert "is not writable by you; choose a folder you may write" in _one_line(capsys.readouterr().err, "train.py")
    assert not (tmp_path / "out").exists()


def test_too_little_free_space_is_refused_before_training(recipe, tmp_path, capsys, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    assert _run(recipe, tmp_path / "out", "--max-steps", "1") == 2
    line = _one_line(capsys.readouterr().err, "train.py")
    assert "MiB free there, about" in line and "free some space or choose another folder" in line
    assert not (tmp_path / "out").exists()


def test_a_full_disk_mid_save_keeps_the_earlier_checkpoints(recipe, tmp_path, capsys, monkeypatch):
    import hf_fss.training.loop as loop_module

    out = tmp_path / "out"
    assert _run(recipe, out, "--checkpointing-steps", "1", "--stop-after-steps", "1") == 0
    first = out / "checkpoints" / "step_00000001"
    before = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    saved = loop_module.save_tree

    def full_disk(tree, folder, name):
        if name == "scheduler":  # after the weights and the optimizer state were written
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / f"{name}.json"))
        return saved(tree, folder, name)

    monkeypatch.setattr(loop_module, "save_tree", full_disk)
    capsys.readouterr()
    assert _run(recipe, out, "--checkpointing-steps", "1", "--resume-from-checkpoint", "latest") == 2
    # The progress bar precedes the error on stderr; closed, it ends its line: one error, on a line of its own.
    errors = re.findall(r"^train\.py: error: .*", capsys.readouterr().err, flags=re.MULTILINE)
    assert len(errors) == 1, errors
    line = errors[0]
    assert "scheduler.json: the disk is full: free some space or choose another folder" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001"]  # no partial one
    assert {p: p.read_bytes() for p in first.rglob("*") if p.is_file()} == before
    assert not (out / f"{LOCK_NAME}.json").exists()  # the lock is released on the error too
