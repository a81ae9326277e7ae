"""hf_fss.utils: folders replaced with renames only, so that a failure leaves the old one as it was."""

import os

import pytest

from hf_fss.utils.io import replace_folder


def _folder(path, files):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _contents(path):
    return {p.name: p.read_text() for p in path.iterdir()}


def test_replace_folder_swaps_in_the_new_folder_and_carries_what_it_is_told(tmp_path):
    target = _folder(tmp_path / "out", {"model": "old", "train.log": "kept"})
    new = _folder(tmp_path / ".out.tmp", {"model": "new"})
    replace_folder(new, target, carry=lambda name: name.endswith(".log"))
    assert _contents(target) == {"model": "new", "train.log": "kept"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no backup, no staging left
    replace_folder(_folder(tmp_path / ".fresh", {"a": "1"}), tmp_path / "absent")
    assert _contents(tmp_path / "absent") == {"a": "1"}


def test_a_failed_replace_leaves_the_old_folder_as_it_was(tmp_path, monkeypatch):
    target = _folder(tmp_path / "out", {"model": "old", "train.log": "kept"})
    new = _folder(tmp_path / ".out.tmp", {"model": "new"})
    rename = os.rename

    def failing(src, dst):
        if os.fspath(src) == os.fspath(new):
            raise OSError(28, "No space left on device")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError):
        replace_folder(new, target, carry=lambda name: name.endswith(".log"), backup=tmp_path / "backup")
    assert _contents(target) == {"model": "old", "train.log": "kept"}
    assert _contents(new) == {"model": "new"} and not (tmp_path / "backup").exists()


# ---------------------------------------------------------------------------------------------- hf-fss <verb>


def test_pyproject_declares_the_console_command_and_the_extras():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"hf-fss": "hf_fss.cli:main"}
    extras = project["optional-dependencies"]
    assert extras["space"] == ["gradio>=5.0"] and extras["coco"] == ["pycocotools>=2.0.8"]
    assert "hf_fss[space,coco]" in extras["test"]  # the test command installs everything the tests need
    assert not any(d.startswith(("gradio", "pycocotools")) for d in project["dependencies"])


@pytest.mark.parametrize("verb", ["train", "evaluate", "compare", "prepare", "pretrain", "convert", "push", "release"])
def test_each_verb_prints_its_help(verb, monkeypatch, capsys):
    import sys

    from hf_fss.cli import COMMANDS, main

    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main sets it for the command it runs
    with pytest.raises(SystemExit) as exit_:
        main([verb, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--" in out and verb in COMMANDS
    assert out.startswith(f"usage: hf-fss {verb} "), out.splitlines()[0]  # not the script's name (`release.py`)
    # A usage error names the command as called, too; the script alone keeps its own name.
    try:
        status = main([verb, "--no-such-flag"])  # train / pretrain return their status, the others exit
    except SystemExit as exit_:
        status = exit_.code
    assert status == 2 and capsys.readouterr().err.strip().splitlines()[-1].startswith(f"hf-fss {verb}: error:")


def test_a_missing_or_unknown_verb_is_one_line(capsys):
    from hf_fss.cli import main

    for argv in ([], ["fly"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("hf-fss: error:")


@pytest.mark.slow
def test_the_installed_hf_fss_command_answers_help_for_each_verb():
    """`pip install -e .` (the README's commands, and CI's) installs the `hf-fss` console command itself."""
    import shutil
    import subprocess

    from hf_fss.cli import COMMANDS

    command = shutil.which("hf-fss")
    assert command, "the hf-fss console command is not installed: run `pip install -e .`"
    for verb in COMMANDS:
        result = subprocess.run([command, verb, "--help"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and "usage:" in result.stdout, (verb, result.stderr[-2000:])
