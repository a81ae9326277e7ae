"""`--dataset` resolution shared by the scripts."""

import datasets
import huggingface_hub
import pytest
from huggingface_hub.errors import RepositoryNotFoundError

from hf_fss.data import load_benchmark
from hf_fss.data.loading import check_hub_dataset


def test_synthetic_is_built_on_the_fly_and_a_saved_folder_loads_back(tmp_path):
    built = load_benchmark("synthetic", synthetic_seed=3, num_train=4, num_val=2, image_size=64)
    assert set(built) == {"train", "validation"} and built["train"].num_rows == 4
    built.save_to_disk(str(tmp_path / "bench"))
    loaded = load_benchmark(str(tmp_path / "bench"))
    assert isinstance(loaded, datasets.DatasetDict)
    assert loaded["validation"]["image_id"] == built["validation"]["image_id"]


def test_bad_dataset_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="not a DatasetDict written by save_to_disk"):
        load_benchmark(str(tmp_path))
    with pytest.raises(ValueError, match="neither 'synthetic', an existing folder, nor a Hub dataset id"):
        load_benchmark("no-such-thing")


def test_a_missing_local_folder_is_folder_not_found_without_hub_lookups(tmp_path, monkeypatch):
    from hf_fss.data import infer_benchmark

    # Used to fall through to datasets.load_dataset: 33-62 s of Hub retries, then a traceback.
    def no_hub(*args, **kwargs):
        raise AssertionError("a local-looking path reached the Hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for missing in ("./data/pascal5i", str(tmp_path / "nothing"), "~/no-such-hf-fss-folder", "data/pascal5i", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="folder not found"):
            load_benchmark(missing)
        with pytest.raises(FileNotFoundError, match="folder not found"):  # before asking for --benchmark
            infer_benchmark(missing)


def test_a_saved_synthetic_folder_is_recognised_as_synthetic(tmp_path, monkeypatch):
    from hf_fss.data import infer_benchmark

    monkeypatch.setattr(huggingface_hub, "dataset_info", lambda *a, **k: None)  # "org/name" exists on the Hub
    from hf_fss.data.loading import benchmark_required_message

    built = load_benchmark("synthetic", num_train=4, num_val=2, image_size=32)
    built.save_to_disk(str(tmp_path / "synthetic"))
    assert infer_benchmark(str(tmp_path / "synthetic")) == "synthetic"
    assert infer_benchmark(built) == "synthetic" and infer_benchmark("synthetic") == "synthetic"
    assert infer_benchmark("org/name") is None and infer_benchmark(str(tmp_path)) is None
    message = benchmark_required_message("org/name")
    assert "pascal5i, coco20i, synthetic, fss1000" in message


def test_training_and_evaluation_infer_the_benchmark_of_a_saved_folder(tmp_path):
    from hf_fss.training.arguments import EpisodicArguments

    load_benchmark("synthetic", num_train=4, num_val=2, image_size=32).save_to_disk(str(tmp_path / "s"))
    args = EpisodicArguments(dataset=str(tmp_path / "s"), model_type="ntrenet")
    assert args.benchmark == "synthetic"
    with pytest.raises(ValueError, match="--benchmark is required .* one of pascal5i, coco20i, synthetic, fss1000"):
        EpisodicArguments(dataset="org/name", model_type="ntrenet")


@pytest.fixture
def saved_synthetic(tmp_path):
    folder = tmp_path / "bench"
    load_benchmark("synthetic", num_train=4, num_val=2, image_size=32).save_to_disk(str(folder))
    return folder


def test_a_contradicting_benchmark_is_refused_by_every_script(saved_synthetic, tmp_path, capsys):
    """`--dataset synthetic --benchmark pascal5i` used to train and write a card claiming PASCAL-5i fold 0."""
    from hf_fss.evaluation.compare import main as compare_main
    from hf_fss.evaluation.runner import main as evaluate_main
    from hf_fss.training.episodic import main as train_main

    models = [tmp_path / "model_a", tmp_path / "model_b"]
    for model in models:
        model.mkdir()
    out = tmp_path / "out"
    for dataset, benchmark in (("synthetic", "pascal5i"), (str(saved_synthetic), "COCO-20i")):
        data = ["--dataset", dataset, "--benchmark", benchmark]
        runs = {  # (main, argv)
            "train.py": (train_main, [*data, "--output-dir", str(out), "--max-steps", "1"]),
            "evaluate.py": (evaluate_main, ["--model", str(models[0]), *data, "--output", str(out / "m.json")]),
            "compare.py": (compare_main, ["--models", *map(str, models), *data, "--output-dir", str(out)]),
        }
        for script, (main, argv) in runs.items():
            assert main(argv) == 2, script
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and err.startswith(f"{script}: error: --benchmark {benchmark}"), err
            # Issue 22 F3: the name 'synthetic' is the embedded benchmark, not something "recorded when it was built".
            what = "the embedded synthetic benchmark;" if dataset == "synthetic" else "synthetic (recorded when it"
            assert f"contradicts --dataset {dataset!r}, which is {what}" in err
            assert "or pass --benchmark synthetic" in err
            assert not out.exists(), script


def test_a_benchmark_name_as_dataset_says_how_to_build_it(tmp_path, capsys, monkeypatch):
    """Issue 22 F2: `--dataset pascal5i` (no such folder) asked for --benchmark, or called it no Hub dataset id."""
    from hf_fss.evaluation.compare import main as compare_main
    from hf_fss.evaluation.runner import main as evaluate_main
    from hf_fss.training.episodic import main as train_main

    monkeypatch.chdir(tmp_path)
    models = [tmp_path / "model_a", tmp_path / "model_b"]
    for model in models:
        model.mkdir()
    out = tmp_path / "out"
    for dataset, kind, benchmark in (("pascal5i", "pascal5i", []), ("COCO-20i", "coco20i", ["--benchmark", "coco"]),
                                     ("fss1000", "fss1000", [])):  # fmt: skip
        data = ["--dataset", dataset, *benchmark]
        runs = {
            "train.py": (train_main, [*data, "--output-dir", str(out), "--max-steps", "1"]),
            "evaluate.py": (evaluate_main, ["--model", str(models[0]), *data, "--output", str(out / "m.json")]),
            "compare.py": (compare_main, ["--models", *map(str, models), *data, "--output-dir", str(out)]),
        }
        for script, (main, argv) in runs.items():
            assert main(argv) == 2, script
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1, err
            assert err.startswith(f"{script}: error: --dataset {dataset!r} is a benchmark name, not a dataset"), err
            assert (
                f"scripts/prepare_dataset.py {kind} ... --output-dir data/{kind}, then pass --dataset data/{kind}"
                in err
            )
            assert not out.exists(), script
    with pytest.raises(ValueError, match="is a benchmark name"):
        load_benchmark("pascal5i")


def test_resolve_benchmark_takes_an_older_folder_at_its_word(saved_synthetic, tmp_path):
    from hf_fss.data.loading import resolve_benchmark

    assert resolve_benchmark(str(saved_synthetic), None) == "synthetic"
    assert resolve_benchmark(str(saved_synthetic), "Synthetic") == "synthetic"
    # A folder that recorded no benchmark (a foreign or older save) and a Hub id: --benchmark as given.
    foreign = datasets.load_from_disk(str(saved_synthetic))
    for split in foreign.values():
        split.info.description = ""
    foreign.save_to_disk(str(tmp_path / "foreign"))
    assert resolve_benchmark(str(tmp_path / "foreign"), "pascal5i") == "pascal5i"
    assert resolve_benchmark("org/name", "coco20i") == "coco20i"
    with pytest.raises(ValueError, match="--benchmark is required"):
        resolve_benchmark(str(tmp_path / "foreign"), None)


def test_an_episodes_file_saved_by_a_windows_editor_reads_the_same(tmp_path):
    from hf_fss.data.episodes import Episode, load_episodes_jsonl

    lines = [
        '{"query": "a", "supports": ["b"], "class_id": 3}',
        '{"query": "c", "supports": ["d", "e"], "class_id": 1}',
    ]
    expected = [Episode("a", ("b",), 3), Episode("c", ("d", "e"), 1)]
    path = tmp_path / "episodes.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    assert load_episodes_jsonl(path) == expected
    path.write_text("\n".join(lines), encoding="utf-16")
    assert load_episodes_jsonl(path) == expected
    path.write_bytes("\n".join(lines).encode("utf-16-le"))  # no byte-order mark
    with pytest.raises(ValueError, match=r"episodes file .*episodes\.jsonl holds NUL characters.*save it as UTF-8"):
        load_episodes_jsonl(path)


@pytest.mark.parametrize("hub", ["unreachable", "not found"])
def test_a_missing_folder_under_a_missing_parent_is_one_hub_probe_then_one_line(tmp_path, monkeypatch, capsys, hub):
    """`--dataset data/pascal5i` where no data/ exists has the shape of a Hub id: it was reported as a missing
    --benchmark, then as minutes of Hub retries. Now: one probe with a timeout, then the folder and the fix."""
    from hf_fss.evaluation.runner import main

    probes = []

    def dataset_info(repo_id, timeout=None, **kwargs):
        probes.append((repo_id, timeout))
        if hub == "not found":
            raise RepositoryNotFoundError("404", response=None)
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "dataset_info", dataset_info)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("datasets' retries were reached"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.chdir(tmp_path)
    check_hub_dataset.cache_clear()
    (tmp_path / "model").mkdir()
    out = tmp_path / "metrics.json"
    assert main(["--model", "model", "--dataset", "data/pascal5i", "--fold", "0", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--benchmark" not in err
    assert (
        f"--dataset 'data/pascal5i': neither a local folder ({tmp_path / 'data' / 'pascal5i'} does not exist)" in err
    )
    assert "scripts/prepare_dataset.py KIND --output-dir data/pascal5i" in err
    assert probes == [("data/pascal5i", 10.0)] and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_cached_hub_dataset_is_not_probed(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "dataset_info", lambda *a, **k: pytest.fail("a cached dataset was probed"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    (tmp_path / "datasets--org--cached").mkdir()
    check_hub_dataset.cache_clear()
    assert check_hub_dataset("org/cached") is None


@pytest.mark.parametrize("kind", ["folder", "fss1000"])
def test_fold_classes_given_a_path_asks_for_the_loaded_dataset(kind):
    """A path as `dataset` was read as a mapping of its characters ("has ['/', 'a', 'a', ...]")."""
    from hf_fss.data import fold_classes

    with pytest.raises(ValueError, match=r"^dataset must be the loaded DatasetDict, not the path 'data/cf': pass "):
        fold_classes(kind, dataset="data/cf")
