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
