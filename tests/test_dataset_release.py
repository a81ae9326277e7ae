"""
Datasets on release day (issue 26): `prepare_dataset.py` writes a dataset card (source, licence, splits, folds, the
build report's counts, how to load it) beside the `save_to_disk` files, exports the fixed test episode lists of each
protocol, and `--push-to-hub` uploads all of it (here into a local folder standing in for the Hub).
"""

import json
import shutil
from pathlib import Path

import datasets
import pytest
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects

from hf_fss.data import fold_classes, load_episodes_jsonl, make_test_episodes
from hf_fss.data.builders.card import render_dataset_card
from hf_fss.data.builders.prepare import main
from hf_fss.evaluation.episode_export import episodes_sha256

SIZES = ["--seed", "1", "--num-train", "6", "--num-val", "100"]  # default image size: 2 * 32 * 32 px objects


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The Hub as a local folder: DatasetDict.push_to_hub saves there, HfApi.upload_folder copies what it allows."""
    root = tmp_path / "hub"

    def push_dataset(self, repo_id, **kwargs):
        self.save_to_disk(str(root / repo_id / "data"))

    def upload_folder(self, *, folder_path, repo_id, repo_type=None, allow_patterns=None, **kwargs):
        assert repo_type == "dataset"
        folder = Path(folder_path)
        files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (root / repo_id / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(folder / name, root / repo_id / name)

    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", push_dataset)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return root


def test_a_pushed_build_carries_its_card_with_the_build_counts_and_its_episode_lists(tmp_path, hub):
    out = tmp_path / "synthetic"
    argv = ["synthetic", *SIZES, "--output-dir", str(out), "--push-to-hub", "someone/synthetic-fss"]
    assert main([*argv, "--export-episodes", "pfenet", "--episode-shots", "1"]) == 0
    pushed = hub / "someone" / "synthetic-fss"
    card = (pushed / "README.md").read_text()
    assert card == (out / "README.md").read_text()
    assert "| train | 6 | " in card and "| validation | 100 | " in card  # the build's row counts per split
    assert (
        "license: apache-2.0" in card
        and "task_categories:" in card
        and 'load_dataset("someone/synthetic-fss")' in card
    )
    assert "4 contiguous folds of 5 classes" in card
    index = json.loads((pushed / "episodes" / "index.json").read_text())
    assert [(e["protocol"], e["fold"], e["shot"], e["seed"]) for e in index] == [
        ("pfenet", f, 1, 321) for f in range(4)
    ]
    assert datasets.load_from_disk(str(out))["train"].num_rows == 6  # the card does not disturb loading


def test_an_exported_episode_list_reimports_to_the_same_episode_hash(tmp_path):
    out = tmp_path / "synthetic"
    assert main(["synthetic", *SIZES, "--output-dir", str(out), "--export-episodes", "pfenet", "panet"]) == 0
    index = json.loads((out / "episodes" / "index.json").read_text())
    assert {e["protocol"] for e in index} == {"pfenet", "panet"} and {e["shot"] for e in index} == {1, 5}
    validation = datasets.load_from_disk(str(out))["validation"]
    for entry in index[:3] + index[-2:]:
        episodes = load_episodes_jsonl(
            out / "episodes" / entry["file"], split=validation
        )  # evaluate.py --episodes-file
        assert episodes_sha256(episodes) == entry["sha256"] and len(episodes) == entry["num_episodes"]
        novel = fold_classes("synthetic", entry["fold"]).novel
        drawn = make_test_episodes(validation, novel, entry["num_episodes"], entry["shot"], entry["seed"])
        assert episodes_sha256(drawn) == entry["sha256"]  # what evaluate.py draws for that protocol and seed
    assert episodes_sha256(episodes[:-1]) != entry["sha256"]


def test_the_card_states_each_benchmarks_source_and_an_unknown_one_is_refused(tmp_path):
    out = tmp_path / "synthetic"
    assert main(["synthetic", *SIZES, "--output-dir", str(out)]) == 0
    saved = datasets.load_from_disk(str(out))
    assert "load_from_disk" in (out / "README.md").read_text() and not (out / "episodes").exists()
    coco = str(render_dataset_card(saved, "coco20i", repo_id="x/coco"))
    assert "cocodataset.org" in coco and "CC BY 4.0" in coco and "license: other" in coco
    with pytest.raises(ValueError, match="no dataset card for benchmark 'voc'"):
        render_dataset_card(saved, "voc")


def test_the_card_counts_what_the_build_fixed_and_skipped():
    from hf_fss.data.builders._common import REPORT_MARKER

    report = {
        "fixed": [{"id": "2007_000032", "kind": "file_fixed", "problem": "label resized to its image"}],
        "skipped": [
            {"id": "2007_000033", "kind": "file_skipped", "problem": "truncated JPEG"},
            {"id": "2007_000042", "kind": "file_skipped", "problem": "empty label"},
        ],
    }
    info = datasets.DatasetInfo(description="PASCAL-5i validation" + REPORT_MARKER + json.dumps(report))
    split = datasets.Dataset.from_dict({"image_id": ["2007_000039"], "class_ids": [[3, 7]]}, info=info)
    card = str(render_dataset_card(datasets.DatasetDict({"validation": split}), "pascal5i"))
    assert "| validation | 1 | 2 | 1 | 2 | file_fixed 1, file_skipped 2 |" in card
    assert "fold i tests classes 5i+1 .. 5i+5" in card and "host.robots.ox.ac.uk" in card
