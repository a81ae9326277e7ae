"""Hub side: model cards, atomic model folders, push_to_hub (HfApi monkeypatched) and loading a Hub id offline."""

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TINY_RESNET
from huggingface_hub import HfApi, ModelCard, scan_cache_dir
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file, save_file

import hf_fss
from hf_fss import FewShotSegmentationConfig, FewShotSegmentationImageProcessor, NTRENetConfig, NTRENetModel
from hf_fss.hub import (
    CARD_MARKER,
    check_model_folder,
    model_card_templates_dir,
    push_to_hub,
    render_model_card,
    save_pretrained_with_card,
)
from hf_fss.hub import model_card as model_card_module
from hf_fss.models.ntrenet import DIFFERENCES_FROM_OFFICIAL_CODE

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "org/ntrenet-r50-fold0"
TINY_NTRENET = {"reduce_dim": 16, "background_prototype_dim": 24, "pyramid_bins": (9, 4, 2, 1), "image_size": 65}
METRICS = {
    "miou": 0.61234,
    "fbiou": 0.77125,
    "precision": 0.7,
    "per_class_iou": {"aeroplane": 0.5, "bicycle": 0.6, "bird": 0.7, "boat": 0.55, "bottle": 0.7117},
    "num_episodes": 1000,
    "seed": 321,
    "fold": 0,
    "shot": 1,
    "protocol": {"name": "pfenet", "benchmark": "pascal5i", "label_size": "original", "num_episodes": 1000},
}
TRAINING = {
    "dataset": "synthetic",
    "benchmark": "pascal5i",
    "fold": 0,
    "shot": 1,
    "learning_rate": 0.03,
    "effective_batch_size": 32,
    "num_processes": 4,
    "max_steps": 120,
    "seed": 123,
    "optimizer": {"name": "sgd", "momentum": 0.9, "weight_decay": 0.0001},
}
PLACEHOLDERS = re.compile(r"TBD|TODO|More Information Needed|\{\{|\}\}|\{%|%\}|\bNone\b|\bnan\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def tiny_ntrenet():
    torch.manual_seed(0)
    model = NTRENetModel(NTRENetConfig(backbone_kwargs=dict(TINY_RESNET), **TINY_NTRENET))
    with torch.no_grad():
        model.bg_prototype.normal_()
    return model.eval()


@pytest.fixture(scope="module")
def processor():
    return FewShotSegmentationImageProcessor(image_size=TINY_NTRENET["image_size"])


def _episode(size=65, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(1, 3, size, size, generator=g)
    support = torch.randn(1, 1, 3, size, size, generator=g)
    masks = torch.zeros(1, 1, size, size, dtype=torch.long)
    masks[..., 10:40, 15:45] = 1
    return query, support, masks


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------- model cards


def test_card_from_a_real_model_and_metrics_reads_back_with_model_index(tmp_path, tiny_ntrenet, processor):
    folder = save_pretrained_with_card(
        tiny_ntrenet, processor, tmp_path / "ntrenet", metrics=METRICS, training=TRAINING
    )
    assert {p.name for p in folder.iterdir()} == {
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "README.md",
        "metrics.json",
        "training.json",
    }
    assert json.loads((folder / "metrics.json").read_text()) == METRICS
    assert json.loads((folder / "training.json").read_text()) == TRAINING

    card = ModelCard.load(folder / "README.md")
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"mean_iou", "fb_iou", "precision"}
    assert results["mean_iou"].metric_value == 61.23 and results["fb_iou"].metric_value == 77.12
    miou = results["mean_iou"]
    assert miou.task_type == "image-segmentation" and miou.metric_name == "mIoU"
    assert miou.dataset_type == "pascal5i" and miou.dataset_name == "PASCAL-5i fold 0 (1-shot)"
    assert miou.dataset_config == "fold0-1shot-pfenet" and miou.dataset_args["shot"] == 1
    # library_name hf_fss (issue 22 changed it from transformers): the Hub's snippet is the card's, with import hf_fss.
    assert card.data.pipeline_tag == "image-segmentation" and card.data.library_name == "hf_fss"
    assert "import hf_fss" in card.text.split("```python")[1].split("```")[0]
    assert "transformers" in card.data.tags and "ntrenet" in card.data.tags and "pascal5i" in card.data.tags
    # A tiny test backbone is not passed off as the published ResNet-50.
    assert "ResNet-50 (resized: base_width=8, depths=[1, 1, 1, 1])" in card.text

    text = card.text
    assert PLACEHOLDERS.search(card.content) is None, PLACEHOLDERS.search(card.content)
    assert "| mIoU | 61.23 |" in text and "| FB-IoU | 77.12 |" in text and "| bottle | 71.17 |" in text
    assert "| effective_batch_size | 32 |" in text and "| optimizer.momentum | 0.9 |" in text
    assert "| reduce_dim | 16 |" in text and "| pyramid_bins | 9, 4, 2, 1 |" in text
    assert "trained on the base classes of PASCAL-5i fold 0 with 1-shot episodes" in text
    assert f"{sum(p.numel() for p in tiny_ntrenet.parameters()):,} parameters" in text
    assert f'AutoModel.from_pretrained("{tmp_path / "ntrenet"}")' in text  # the folder, as there is no repo id yet
    assert all(item in text for item in DIFFERENCES_FROM_OFFICIAL_CODE)
    assert "@inproceedings{liu2022ntrenet" in text and "arXiv:2205.04903" in text
    assert CARD_MARKER in text


def test_card_without_metrics_or_training_leaves_them_out(tiny_ntrenet):
    card = render_model_card(tiny_ntrenet.config, repo_id=REPO_ID)
    assert card.data.eval_results is None and "model-index" not in card.content
    assert "## Evaluation results" not in card.text and "This model's run" not in card.text
    assert PLACEHOLDERS.search(card.content) is None
    assert f'AutoModel.from_pretrained("{REPO_ID}")' in card.text
    assert card.data.license is None  # unknown: left out, not guessed


def test_card_of_a_converted_checkpoint_says_so(tiny_ntrenet):
    training = {"converted_from": "train_epoch_200.pth", "shot": 1, "source": "github.com/LIUYUANWEI98/NERTNet"}
    card = render_model_card(tiny_ntrenet.config, training=training)
    assert "converted from a checkpoint of the official code" in card.text and "`train_epoch_200.pth`" in card.text
    assert "| source | github.com/LIUYUANWEI98/NERTNet |" in card.text
    assert PLACEHOLDERS.search(card.content) is None


def test_card_names_coco_canet_split_instead_of_fold_0(tiny_ntrenet):
    """COCO's canet_40_20_20 is one class split, not PFENet's fold 0: the card and the model index say which."""
    protocol = {"name": "pfenet", "benchmark": "coco20i", "fold_convention": "canet_40_20_20"}
    metrics = {**METRICS, "per_class_iou": {"toilet": 0.4}, "protocol": protocol}
    training = {**TRAINING, "benchmark": "coco20i", "fold_convention": "canet_40_20_20"}
    card = render_model_card(tiny_ntrenet.config, metrics=metrics, training=training)
    miou = next(r for r in card.data.eval_results if r.metric_type == "mean_iou")
    assert miou.dataset_name == "COCO-20i 40 / 20 / 20 class split (CANet's setting) (1-shot)"
    assert miou.dataset_config == "canet_40_20_20-1shot-pfenet"
    assert "trained on the base classes of COCO-20i, 40 / 20 / 20 class split (CANet's setting)" in card.text
    assert "COCO-20i fold 0" not in card.text


def test_undefined_values_are_left_out_of_the_model_index():
    metrics = {**METRICS, "precision": float("nan"), "per_class_iou": {"cat": float("nan"), "dog": 0.5}}
    metrics.pop("fold")
    card = render_model_card(NTRENetConfig(), metrics=metrics)
    assert {r.metric_type for r in card.data.eval_results} == {"mean_iou", "fb_iou"}
    assert card.data.eval_results[0].dataset_config == "1shot-pfenet"  # no fold known: left out, not guessed
    assert card.data.eval_results[0].dataset_name == "PASCAL-5i (1-shot)"
    assert "| cat | undefined (no episode) |" in card.text
    assert PLACEHOLDERS.search(card.content) is None


def _config_for(model_type):
    if model_type in hf_fss.MODEL_CLASSES:
        config_class = hf_fss.MODEL_CLASSES[model_type][0]
        if model_type == "ntrenet":
            return config_class(backbone_kwargs=dict(TINY_RESNET), **TINY_NTRENET)
        return config_class()
    # A method whose configuration is not written yet: the shared fields under its model type.
    return type(f"{model_type}StandIn", (FewShotSegmentationConfig,), {"model_type": model_type})()


TEMPLATES = sorted(p.stem for p in (ROOT / "hf_fss" / "model_cards").glob("*.md"))


def test_every_method_has_a_template():
    assert set(TEMPLATES) >= {"ntrenet", "qgnet", "crcnet", "smcp", "cosine_prior"}
    assert set(hf_fss.MODEL_CLASSES) <= set(TEMPLATES)
    assert model_card_templates_dir() == ROOT / "hf_fss" / "model_cards"


@pytest.mark.parametrize("model_type", TEMPLATES)
def test_every_template_renders_with_and_without_results(model_type):
    config = _config_for(model_type)
    for metrics, training in ((None, None), (METRICS, TRAINING), ([METRICS, {**METRICS, "shot": 5}], TRAINING)):
        card = render_model_card(config, metrics=metrics, training=training, repo_id=REPO_ID)
        assert PLACEHOLDERS.search(card.content) is None, (model_type, PLACEHOLDERS.search(card.content))
        assert card.text.count("```") % 2 == 0
        assert "import hf_fss" in card.text and f'AutoImageProcessor.from_pretrained("{REPO_ID}")' in card.text
        assert "## Citation" in card.text and "## Intended use and limitations" in card.text
        if metrics is None:
            assert card.data.eval_results is None
        else:
            names = {r.dataset_name for r in card.data.eval_results}
            expected = {"PASCAL-5i fold 0 (1-shot)"} | (
                {"PASCAL-5i fold 0 (5-shot)"} if isinstance(metrics, list) else set()
            )
            assert names == expected and "## Evaluation results" in card.text


def test_unknown_model_type_is_a_clear_error():
    stand_in = type("Nope", (FewShotSegmentationConfig,), {"model_type": "no_such_method"})()
    with pytest.raises(ValueError, match="no model-card template for model_type='no_such_method'"):
        render_model_card(stand_in)


# ------------------------------------------------------------------------------------------- atomic model folder


def test_a_failed_save_leaves_the_old_folder_intact(tmp_path, tiny_ntrenet, processor, monkeypatch):
    target = tmp_path / "model"
    save_pretrained_with_card(tiny_ntrenet, processor, target, metrics=METRICS, training=TRAINING)
    before = {p.name: _digest(p) for p in target.iterdir()}

    def broken_card(*args, **kwargs):  # fails after the weights and configs of the new save are written
        raise RuntimeError("disk full")

    monkeypatch.setattr(model_card_module, "render_model_card", broken_card)
    other = NTRENetModel(NTRENetConfig(backbone_kwargs=dict(TINY_RESNET), **TINY_NTRENET))
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained_with_card(other, processor, target, metrics={**METRICS, "miou": 0.1})
    assert {p.name: _digest(p) for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left behind

    monkeypatch.undo()
    with pytest.raises(ValueError, match="metrics must be a dict"):
        save_pretrained_with_card(other, processor, target, metrics="0.5")
    assert {p.name: _digest(p) for p in target.iterdir()} == before


def test_a_new_save_replaces_model_files_and_keeps_other_entries(tmp_path, tiny_ntrenet, processor):
    # Two renames (hf_fss.utils.io.replace_folder) on every system: the renameat2 exchange through ctypes is gone.
    target = tmp_path / "model"
    save_pretrained_with_card(tiny_ntrenet, processor, target, metrics=METRICS, training=TRAINING)
    (target / "checkpoint-10").mkdir()
    (target / "checkpoint-10" / "optimizer.bin").write_bytes(b"state")
    (target / "train.log").write_text("step 10\n")
    (target / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")

    other = NTRENetModel(NTRENetConfig(backbone_kwargs=dict(TINY_RESNET), **TINY_NTRENET)).eval()
    save_pretrained_with_card(other, processor, target)  # no metrics / training this time
    names = {p.name for p in target.iterdir()}
    assert names == {
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "README.md",
        "checkpoint-10",
        "train.log",
    }
    assert (target / "checkpoint-10" / "optimizer.bin").read_bytes() == b"state"
    saved = load_file(target / "model.safetensors")
    assert torch.equal(saved["bg_prototype"], other.state_dict()["bg_prototype"])
    assert "## Evaluation results" not in (target / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_saved_folder_has_mkdir_mode_and_stale_staging_is_removed(tmp_path, tiny_ntrenet, processor):
    # Saved folders used to be 0700 (the temporary folder's mode kept after the rename); killed saves left
    # `.model.tmp-*` folders behind for good.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    from hf_fss.staging import _host

    left = tmp_path / f".model.tmp.{_host()}.{dead_pid}.deadbeef"
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".model.tmp.{_host()}.{os.getppid()}.cafecafe"  # a live writer's: kept
    live.mkdir()
    legacy = tmp_path / ".model.tmp-abcd1234"  # an earlier version's, untouched since before this run
    legacy.mkdir()
    os.utime(legacy, (0, 0))
    old_umask = os.umask(0o022)
    try:
        target = save_pretrained_with_card(tiny_ntrenet, processor, tmp_path / "model")
        assert target.stat().st_mode & 0o777 == 0o755
        # transformers writes model.safetensors 0600: every saved file gets a plain open()'s mode instead
        assert {p.name: p.stat().st_mode & 0o777 for p in target.iterdir()} == {
            p.name: 0o644 for p in target.iterdir()
        }
        os.umask(0o027)
        save_pretrained_with_card(tiny_ntrenet, processor, tmp_path / "other")
        assert (tmp_path / "other").stat().st_mode & 0o777 == 0o750
        assert (tmp_path / "other" / "model.safetensors").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", "other", live.name])

    # A backup a killed save left while its folder was moved away is the only copy: never removed then.
    backup = tmp_path / f".fourth.old.{_host()}.{dead_pid}.0000beef"
    backup.mkdir()
    save_pretrained_with_card(tiny_ntrenet, processor, tmp_path / "fourth")
    assert backup.is_dir()


# ---------------------------------------------------------------------------------------------------- upload


@pytest.fixture
def hub_calls(monkeypatch):
    """HfApi with create_repo / create_branch / upload_folder recorded instead of sent."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        every_file = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        uploaded = sorted(filter_repo_objects(every_file, allow_patterns=kwargs["allow_patterns"]))
        calls.append(("upload_folder", kwargs["repo_id"], {**kwargs, "uploaded": uploaded}))
        return "commit-info"

    def forbidden(self, *args, **kwargs):
        raise AssertionError("no other Hub call is expected")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    for name in ("upload_file", "create_commit", "whoami", "repo_info"):
        monkeypatch.setattr(HfApi, name, forbidden)
    return calls


@pytest.mark.parametrize("model_type", ["ntrenet", "smcp"])
def test_push_to_hub_uploads_weights_configs_card_and_records(
    tmp_path, tiny_ntrenet, processor, hub_calls, model_type
):
    model = tiny_ntrenet
    if model_type == "smcp":
        torch.manual_seed(0)
        model = hf_fss.SMCPModel(
            hf_fss.SMCPConfig(backbone_kwargs={"base_width": 4}, reduce_dim=16, bottleneck_dim=8, image_size=65)
        ).eval()
    folder = save_pretrained_with_card(model, processor, tmp_path / model_type, metrics=METRICS, training=TRAINING)
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "optimizer.pt").write_bytes(b"pickled")  # never uploaded
    (folder / "notes.txt").write_text("local notes")

    assert push_to_hub(folder, REPO_ID, private=True, revision="v1", commit_message="first") == "commit-info"
    (create, repo, create_kwargs), (branch, _, branch_kwargs), (upload, _, upload_kwargs) = hub_calls
    assert (create, repo, branch, upload) == ("create_repo", REPO_ID, "create_branch", "upload_folder")
    assert create_kwargs["exist_ok"] is True and create_kwargs["private"] is True
    assert branch_kwargs["branch"] == "v1" and branch_kwargs["exist_ok"] is True
    assert upload_kwargs["revision"] == "v1" and upload_kwargs["commit_message"] == "first"
    assert upload_kwargs["uploaded"] == sorted(
        ["model.safetensors", "config.json", "preprocessor_config.json", "README.md", "metrics.json", "training.json"]
    )
    # The generated card was re-rendered for the repo: the snippet loads the Hub id, the results are kept.
    card = ModelCard.load(folder / "README.md")
    assert f'AutoModel.from_pretrained("{REPO_ID}")' in card.text
    assert card.data.eval_results[0].metric_value == 61.23 and card.data.model_name == "ntrenet-r50-fold0"


def test_push_to_hub_renders_a_missing_card_and_keeps_a_hand_written_one(tmp_path, tiny_ntrenet, processor, hub_calls):
    folder = tmp_path / "plain"
    tiny_ntrenet.save_pretrained(folder)
    processor.save_pretrained(folder)
    push_to_hub(folder, REPO_ID)
    assert [c[0] for c in hub_calls] == ["create_repo", "upload_folder"]
    assert "README.md" in hub_calls[-1][2]["uploaded"]
    card = ModelCard.load(folder / "README.md")
    assert f'from_pretrained("{REPO_ID}")' in card.text and card.data.eval_results is None

    (folder / "README.md").write_text("---\nlicense: mit\n---\n# My own card\n")
    push_to_hub(folder, "org/other")
    assert (folder / "README.md").read_text() == "---\nlicense: mit\n---\n# My own card\n"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "pytorch_model.bin").write_bytes(b"x"), r"pickle weight files \['pytorch_model.bin'\]"),
        (lambda f: (f / "extra.pth").write_bytes(b"x"), "pickle weight files"),
        (lambda f: (f / "model.safetensors").unlink(), r"lacks \['model.safetensors'\]"),
        (lambda f: (f / "preprocessor_config.json").unlink(), r"lacks \['preprocessor_config.json'\]"),
        (lambda f: (f / "config.json").unlink(), r"lacks \['config.json'\]"),
        (lambda f: (f / "model.safetensors").write_bytes(b"not safetensors"), "not a readable safetensors file"),
    ],
)
def test_push_to_hub_refuses_pickles_and_incomplete_folders(
    tmp_path, tiny_ntrenet, processor, hub_calls, damage, message
):
    folder = save_pretrained_with_card(tiny_ntrenet, processor, tmp_path / "m")
    damage(folder)
    with pytest.raises(ValueError, match=message):
        push_to_hub(folder, REPO_ID)
    assert hub_calls == []


def test_push_to_hub_checks_the_repo_id(tmp_path, tiny_ntrenet, processor, hub_calls):
    folder = save_pretrained_with_card(tiny_ntrenet, processor, tmp_path / "m")
    for bad in ("no-namespace", "org/bad name", "org//x"):
        with pytest.raises(ValueError, match="repo_id"):
            push_to_hub(folder, bad)
    with pytest.raises(ValueError, match="is not a folder"):
        push_to_hub(tmp_path / "missing", REPO_ID)
    assert hub_calls == []
    assert check_model_folder(folder)[0] == "model.safetensors"


def test_push_script(tmp_path, tiny_ntrenet, processor, hub_calls, monkeypatch, capsys):
    folder = save_pretrained_with_card(tiny_ntrenet, processor, tmp_path / "m", metrics=METRICS)
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import push_to_hub as script

    assert script.main(["--model-dir", str(folder), "--repo-id", REPO_ID, "--private", "--commit-message", "hi"]) == 0
    kinds = [c[0] for c in hub_calls]
    assert kinds == ["create_repo", "upload_folder"] and hub_calls[0][2]["private"] is True
    assert hub_calls[1][2]["commit_message"] == "hi"
    assert REPO_ID in capsys.readouterr().out
    (folder / "weights.pkl").write_bytes(b"x")
    assert script.main(["--model-dir", str(folder), "--repo-id", REPO_ID]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("push_to_hub.py: error: ") and "pickle" in err[0]


def test_push_script_takes_a_run_folder_as_its_best_model(
    tmp_path, tiny_ntrenet, processor, hub_calls, monkeypatch, capsys, caplog
):
    """`--model-dir outputs/RUN` (the script's own example) used to be refused as lacking model.safetensors."""
    from hf_fss.run_folder import write_run_folder_marker

    run = tmp_path / "run"
    for name in ("final", "best"):
        save_pretrained_with_card(tiny_ntrenet, processor, run / name, metrics=METRICS)
    write_run_folder_marker(run)
    (run / "run.json").write_text("{}")
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import push_to_hub as script

    assert script.main(["--model-dir", str(run), "--repo-id", REPO_ID]) == 0
    upload = hub_calls[-1][2]
    assert "config.json" in upload["uploaded"] and "run.json" not in upload["uploaded"]
    assert f"uploaded {run / 'best'} to {REPO_ID}" in capsys.readouterr().out
    assert f"{run} is a training run folder: using its best/" in caplog.text


# ------------------------------------------------------------------------------------------ Hub id, offline cache


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lay_out_hub_cache(hub_cache: Path, repo_id: str, folder: Path) -> str:
    """Put `folder`'s files in the cache exactly as `snapshot_download` leaves them; returns the commit."""
    repo_folder = hub_cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo_folder / "blobs").mkdir(parents=True)
    (repo_folder / "refs").mkdir()
    snapshot = repo_folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        # LFS files (the weights) are stored under their sha256, regular git files under their git blob sha1.
        etag = hashlib.sha256(data).hexdigest() if path.suffix == ".safetensors" else _git_blob_sha1(data)
        (repo_folder / "blobs" / etag).write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", etag), snapshot / path.name)
    (repo_folder / "refs" / "main").write_text(commit)
    return commit


SUBPROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    import hf_fss
    from transformers import AutoImageProcessor, AutoModel, pipeline

    repo_id, inputs_path, out_path = sys.argv[1:4]
    model = AutoModel.from_pretrained(repo_id)
    processor = AutoImageProcessor.from_pretrained(repo_id)
    inputs = load_file(inputs_path)
    with torch.no_grad():
        logits = model(inputs["query"], inputs["support"], inputs["masks"]).logits
    segmenter = pipeline("few-shot-segmentation", model=repo_id)
    image = (inputs["image"].numpy() * 255).astype(np.uint8)
    mask = inputs["image_mask"].numpy().astype(np.uint8)
    result = segmenter(image, support_image=image, support_mask=mask, output_type="numpy")
    save_file({"logits": logits, "pipeline_mask": torch.from_numpy(result["mask"])}, out_path)
    print(json.dumps({"model": type(model).__name__, "processor": type(processor).__name__,
                      "image_size": processor.image_size, "pipeline_model": type(segmenter.model).__name__,
                      "use_pretrained_backbone": model.config.use_pretrained_backbone}))
    """
)


def test_hub_id_loads_offline_from_the_cache(tmp_path, tiny_ntrenet, processor):
    from transformers import pipeline

    folder = save_pretrained_with_card(tiny_ntrenet, processor, tmp_path / "saved", metrics=METRICS)
    hf_home = tmp_path / "hf_home"
    commit = _lay_out_hub_cache(hf_home / "hub", REPO_ID, folder)

    info = scan_cache_dir(hf_home / "hub")
    assert info.warnings == []
    (repo,) = info.repos
    assert (repo.repo_id, repo.repo_type, repo.nb_files) == (REPO_ID, "model", 5)
    (revision,) = repo.revisions
    assert revision.commit_hash == commit and revision.refs == frozenset({"main"})
    assert {f.file_name for f in revision.files} == {p.name for p in folder.iterdir()}

    query, support, masks = _episode()
    image = torch.rand(40, 50, 3)
    image_mask = torch.zeros(40, 50)
    image_mask[5:25, 10:30] = 1
    save_file(
        {"query": query, "support": support, "masks": masks, "image": image, "image_mask": image_mask},
        tmp_path / "inputs.safetensors",
    )
    env = {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",  # a port nothing listens on: any network call fails at once
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    out = tmp_path / "out.safetensors"
    proc = subprocess.run(
        [sys.executable, "-c", SUBPROCESS, REPO_ID, str(tmp_path / "inputs.safetensors"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {
        "model": "NTRENetModel",
        "processor": "FewShotSegmentationImageProcessor",
        "image_size": TINY_NTRENET["image_size"],
        "pipeline_model": "NTRENetModel",
        "use_pretrained_backbone": False,
    }
    outputs = load_file(out)
    with torch.no_grad():
        expected = tiny_ntrenet(query, support, masks).logits
    torch.testing.assert_close(outputs["logits"], expected, rtol=1e-5, atol=1e-5)

    local = pipeline("few-shot-segmentation", model=tiny_ntrenet, image_processor=processor)
    array = (image.numpy() * 255).astype("uint8")
    result = local(array, support_image=array, support_mask=image_mask.numpy().astype("uint8"), output_type="numpy")
    assert torch.equal(outputs["pipeline_mask"], torch.from_numpy(result["mask"]))
