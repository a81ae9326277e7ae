"""
Release day (`scripts/release.py`, issue 26): the manifest, the curated cards in model_cards/, and the one command
that converts, verifies, cards and writes (or pushes) every official checkpoint of a folder.

The official files are the parity tests' seeded checkpoints in the official layouts (NTRENet and QGNet ResNet-50, SMCP
dilated VGG-16, full size) and a MoCo checkpoint of a small prior extractor, written as the official code saves them.
"""

import json
import shutil
from pathlib import Path

import pytest
import test_ntrenet_parity
import test_qgnet_parity
import test_smcp_parity
import torch
from test_hub import hub_calls  # noqa: F401 (the recorded-HfApi fixture)
from test_qgnet import _moco_checkpoint, _random_prior

from hf_fss.hub.release import main
from hf_fss.hub.release_manifest import (
    default_cards_dir,
    load_manifest,
    read_measured,
    release_config,
    render_release_card,
)

CARDS = default_cards_dir()
HEADER, ENTRIES = load_manifest(CARDS)
BY_REPO = {entry.repo: entry for entry in ENTRIES}
# Files of the release folder -> the manifest row each must become (the official name where the release has one).
RELEASED = {
    "ntrenet-r50-pascal5i-fold0.pth": "ntrenet-r50-pascal5i-fold0",
    "qgnet-r50-pascal5i-fold1.pth": "qgnet-r50-pascal5i-fold1",
    "25000.pth": "smcp-vgg16-pascal5i-fold0",
    "checkpoint_2000.pth.tar": "qgnet-prior-extractor-r50-pascal5i",
}


def _prior(seed: int):
    """A small random prior extractor with valid batch-norm statistics (positive running variances)."""
    extractor = _random_prior(seed)
    for name, tensor in extractor.state_dict().items():
        if name.endswith("running_var"):
            tensor.abs_().add_(0.5)
    return extractor


def _write_official_files(folder: Path) -> Path:
    folder.mkdir()
    ntrenet = {"module." + k: v for k, v in test_ntrenet_parity.official_state_dict().items()}
    torch.save({"epoch": 200, "state_dict": ntrenet}, folder / "ntrenet-r50-pascal5i-fold0.pth")
    qgnet = {"module." + k: v for k, v in test_qgnet_parity.official_state_dict().items()}
    torch.save({"epoch": 200, "state_dict": qgnet}, folder / "qgnet-r50-pascal5i-fold1.pth")
    torch.save({"module." + k: v for k, v in test_smcp_parity.official_state_dict().items()}, folder / "25000.pth")
    torch.save(_moco_checkpoint(_prior(1), _prior(2)), folder / "checkpoint_2000.pth.tar")
    # Reported and skipped: a file the manifest does not know, a damaged one, one whose weights are not its row's.
    (folder / "notes.pth").write_bytes(b"not a checkpoint")
    (folder / "qgnet-r50-pascal5i-fold2.pth").write_bytes((folder / "25000.pth").read_bytes()[:4096])
    shutil.copy(folder / "ntrenet-r50-pascal5i-fold0.pth", folder / "ntrenet-r101-pascal5i-fold3.pth")
    return folder


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    files = _write_official_files(root / "official")
    cards = root / "model_cards"
    shutil.copytree(CARDS, cards)
    before = {p.name: p.read_text() for p in cards.glob("*.md")}
    argv = ["--checkpoints", str(files), "--output-dir", str(root / "out"), "--cards", str(cards), "--dry-run"]
    return root, main(argv), before


def test_dry_run_converts_verifies_and_writes_hub_ready_folders_with_their_cards(dry_run, capsys):
    root, status, before = dry_run
    assert status == 1  # some files were reported and skipped
    assert sorted(p.name for p in (root / "out").iterdir()) == sorted(RELEASED.values())  # no staging leftovers
    for repo in RELEASED.values():
        folder = root / "out" / repo
        assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
        card = (folder / "README.md").read_text()
        assert card == (root / "model_cards" / f"{repo}.md").read_text() == before[f"{repo}.md"]
        assert "not yet reproduced" in card or BY_REPO[repo].artifact == "prior_extractor"
        assert "model-index" not in card and "import hf_fss" in card
    from transformers import AutoModel

    model = AutoModel.from_pretrained(root / "out" / "smcp-vgg16-pascal5i-fold0")  # a folder that loads
    assert model.config.model_type == "smcp" and model.config.backbone == "vgg16_dilated"


def _fields(config) -> dict:
    """A config's fields, without what saving or loading adds (architectures, dtype, path, versions, the model's
    record of loaded weights)."""
    added = ("architectures", "_name_or_path", "dtype", "transformers_version", "loaded_pretrained_weights")
    return {k: v for k, v in config.to_dict().items() if k not in added}


def test_converted_configs_are_what_the_cards_in_model_cards_describe(dry_run):
    from transformers import AutoConfig

    root = dry_run[0]
    for repo in ("ntrenet-r50-pascal5i-fold0", "qgnet-r50-pascal5i-fold1", "smcp-vgg16-pascal5i-fold0"):
        converted = AutoConfig.from_pretrained(root / "out" / repo)
        assert _fields(converted) == _fields(release_config(BY_REPO[repo])), repo


def test_unknown_damaged_and_mismatched_files_are_reported_and_skipped(dry_run):
    root, _, before = dry_run
    out = (root / "out").iterdir()
    assert not {"qgnet-r50-pascal5i-fold2", "ntrenet-r101-pascal5i-fold3"} & {p.name for p in out}
    for repo in ("qgnet-r50-pascal5i-fold2", "ntrenet-r101-pascal5i-fold3"):  # their cards are untouched
        assert (root / "model_cards" / f"{repo}.md").read_text() == before[f"{repo}.md"]
    assert not (root / "model_cards" / "measured").exists()  # nothing was measured


def test_the_report_names_each_file_and_why(tmp_path, capsys):
    folder = tmp_path / "official"
    folder.mkdir()
    (folder / "notes.pth").write_bytes(b"x")
    (folder / "qgnet-r50-pascal5i-fold2.pth").write_bytes(b"truncated")
    ntrenet = {"module." + k: v for k, v in test_ntrenet_parity.official_state_dict().items()}
    torch.save({"state_dict": ntrenet}, folder / "ntrenet-r101-pascal5i-fold3.pth")
    cards = tmp_path / "cards"
    shutil.copytree(CARDS, cards)
    argv = ["--checkpoints", str(folder), "--output-dir", str(tmp_path / "out"), "--cards", str(cards), "--dry-run"]
    assert main(argv) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("unknown  notes.pth") and "not in the release manifest" in line for line in lines)
    assert any(
        "qgnet-r50-pascal5i-fold2.pth" in line and "not a readable PyTorch checkpoint" in line for line in lines
    )
    assert any(
        "ntrenet-r101-pascal5i-fold3.pth" in line and "the manifest row says ntrenet with resnet101" in line
        for line in lines
    )
    assert lines[-1] == "0 of 3 file(s) written" and not (tmp_path / "out").exists()  # nothing left on disk


# ------------------------------------------------------------------------------------------- parity with official

# A stand-in for the official NTRENet checkout (model/ourmodel.py, its constructor and forward signatures, official
# key names in and out), around a full-size hf_fss NTRENet: it loads the released file's weights like the official
# model; `OFFSET` shifts its logits so that a disagreement can be seen.
STAND_IN = """
from torch import nn

from hf_fss import NTRENetConfig, NTRENetModel
from hf_fss.models.ntrenet.convert_ntrenet import original_key_to_ours, our_key_to_original

OFFSET = {offset}


class NTRENet(nn.Module):
    def __init__(self, layers=50, classes=2, zoom_factor=8, pretrained=True, shot=1, ppm_scales=(60, 30, 15, 8)):
        super().__init__()
        self.inner = NTRENetModel(NTRENetConfig())

    def state_dict(self, *args, **kwargs):
        return {{our_key_to_original(k, False): v for k, v in self.inner.state_dict().items()}}

    def load_state_dict(self, state_dict, strict=True):
        return self.inner.load_state_dict({{original_key_to_ours(k, False): v for k, v in state_dict.items()}}, strict)

    def forward(self, s_x, s_y, x, y, classes):
        return self.inner(x, s_x, s_y.long()).logits + OFFSET
"""


def _checkout(folder: Path, offset: float) -> Path:
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "__init__.py").write_text("")
    (folder / "model" / "ourmodel.py").write_text(STAND_IN.format(offset=offset))
    return folder


@pytest.mark.slow
def test_parity_with_the_official_checkout_is_measured_into_the_card_and_a_gap_fails(tmp_path, capsys):
    folder = tmp_path / "official"
    folder.mkdir()
    ntrenet = {"module." + k: v for k, v in test_ntrenet_parity.official_state_dict().items()}
    torch.save({"state_dict": ntrenet}, folder / "ntrenet-r50-pascal5i-fold0.pth")
    cards = tmp_path / "cards"
    shutil.copytree(CARDS, cards)
    base = ["--checkpoints", str(folder), "--output-dir", str(tmp_path / "out"), "--cards", str(cards), "--dry-run"]
    assert main([*base, "--official", f"ntrenet={_checkout(tmp_path / 'same', 0.0)}"]) == 0
    measured = read_measured(cards, "ntrenet-r50-pascal5i-fold0")
    assert float(measured["parity"]["max_abs_logit_difference"]) < 1e-4
    card = (cards / "ntrenet-r50-pascal5i-fold0.md").read_text()
    assert "these weights loaded into the official model of" in card and "not yet reproduced" in card
    assert card == render_release_card(BY_REPO["ntrenet-r50-pascal5i-fold0"], HEADER["hub_organization"], measured)

    shutil.rmtree(tmp_path / "out")
    assert main([*base, "--official", f"ntrenet={_checkout(tmp_path / 'shifted', 0.01)}"]) == 1
    assert "logits differ from the official code's by 0.01" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- cards in model_cards/


def test_every_card_in_model_cards_is_rendered_from_its_manifest_row():
    assert sorted(p.stem for p in CARDS.glob("*.md")) == sorted(BY_REPO)
    for entry in ENTRIES:
        measured = read_measured(CARDS, entry.repo)
        card = (CARDS / f"{entry.repo}.md").read_text()
        assert card == render_release_card(entry, HEADER["hub_organization"], measured), entry.repo
        assert "library_name: hf_fss" in card and "import hf_fss" in card
        assert entry.facts["commit"] in card and entry.source in card  # official code, commit and provenance
        if entry.artifact == "model":
            assert f"`{entry.protocol}` preset" in card and "pipeline_tag: image-segmentation" in card
            assert f"{entry.paper_miou} mIoU ({entry.paper_table}), as reported by the authors" in card
            reproduced = bool(measured.get("evaluation"))
            assert ("**Reproduced**: not yet reproduced." in card) != reproduced
            assert ("model-index" in card) == reproduced
        assert ("official release publishes no file" in card) == (entry.official_file is None)


def test_manifest_rows_state_their_sources_and_unknowns_as_null():
    assert len({e.repo for e in ENTRIES}) == len(ENTRIES) == 26
    for entry in ENTRIES:
        assert entry.source and (entry.paper_miou is None) == (entry.paper_table is None)
    smcp = BY_REPO["smcp-vgg16-pascal5i-fold0"]
    assert (smcp.official_file, smcp.paper_miou, smcp.fold) == ("25000.pth", 50.6, 0)
    ntrenet = [e for e in ENTRIES if e.method == "ntrenet"]
    assert len(ntrenet) == 20 and all(e.official_file is None for e in ntrenet)  # the README names no file
    assert BY_REPO["ntrenet-r50-pascal5i-fold0"].paper_miou == 65.4  # Table 1, ResNet-50, 1-shot, Fold-0


def test_a_broken_manifest_is_a_usage_error_naming_it(tmp_path, capsys):
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "manifest.json").write_text(json.dumps({"methods": {}, "releases": [{"repo": "x"}]}))
    (tmp_path / "official").mkdir()
    argv = ["--checkpoints", str(tmp_path / "official"), "--output-dir", str(tmp_path / "out"), "--dry-run"]
    assert main([*argv, "--cards", str(tmp_path / "cards")]) == 2
    assert "row 'x' lacks" in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(["--checkpoints", str(tmp_path / "official"), "--output-dir", str(tmp_path / "out")])  # no --push


@pytest.mark.parametrize("files", [(), ("notes.txt", "model.pth")], ids=["empty", "no-release-file"])
def test_a_folder_without_a_release_file_is_a_usage_error_naming_it(tmp_path, capsys, files):
    folder = tmp_path / "official"
    folder.mkdir()
    for name in files:
        (folder / name).write_bytes(b"x")
    argv = ["--checkpoints", str(folder), "--output-dir", str(tmp_path / "out"), "--dry-run"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and err.startswith("release.py: error: --checkpoints") and str(folder) in err
    assert "25000.pth" in err and "<repo>.pth" in err and "file(s) written" not in captured.out
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- evaluation and push


@pytest.mark.slow
def test_push_uploads_each_release_and_an_evaluation_makes_the_reproduced_line(tmp_path, hub_calls, capsys):  # noqa: F811
    folder = tmp_path / "official"
    folder.mkdir()
    torch.save({"module." + k: v for k, v in test_smcp_parity.official_state_dict().items()}, folder / "25000.pth")
    torch.save(_moco_checkpoint(_prior(1), _prior(2)), folder / "checkpoint_2000.pth.tar")
    cards = tmp_path / "cards"
    shutil.copytree(CARDS, cards)
    # The test's manifest says the SMCP row is a synthetic-benchmark model: an evaluation reproduces a row only on its
    # own benchmark (the COCO row, evaluated on the same --dataset, is not).
    manifest = json.loads((cards / "manifest.json").read_text())
    for row in manifest["releases"]:
        row["benchmark"] = "synthetic" if row["repo"] == "smcp-vgg16-pascal5i-fold0" else row["benchmark"]
    (cards / "manifest.json").write_text(json.dumps(manifest))
    coco = {"module." + k: v for k, v in test_ntrenet_parity.official_state_dict().items()}
    torch.save({"state_dict": coco}, folder / "ntrenet-r50-coco20i-fold0.pth")
    argv = ["--checkpoints", str(folder), "--output-dir", str(tmp_path / "out"), "--cards", str(cards)]
    argv += ["--push", "someorg", "--dataset", "synthetic", "--seeds", "1", "2", "--num-episodes", "1"]
    assert main(argv) == 0
    uploads = {call[1]: call[2] for call in hub_calls if call[0] == "upload_folder"}
    assert sorted(uploads) == [
        "someorg/ntrenet-r50-coco20i-fold0",
        "someorg/qgnet-prior-extractor-r50-pascal5i",
        "someorg/smcp-vgg16-pascal5i-fold0",
    ]
    assert "not evaluated: --dataset is synthetic, the row coco20i" in capsys.readouterr().out
    assert "not yet reproduced" in (cards / "ntrenet-r50-coco20i-fold0.md").read_text()
    assert not (cards / "measured" / "ntrenet-r50-coco20i-fold0.json").exists()
    assert "README.md" in uploads["someorg/smcp-vgg16-pascal5i-fold0"]["uploaded"]
    measured = read_measured(cards, "smcp-vgg16-pascal5i-fold0")
    runs = measured["evaluation"]
    assert [run["seed"] for run in runs] == [1, 2] and all(run["dataset"] == "synthetic" for run in runs)
    card = (cards / "smcp-vgg16-pascal5i-fold0.md").read_text()
    assert (
        "over 2 seed(s) [1, 2], 1 episode(s) per seed, protocol `panet` with num_episodes changed from the preset"
        in card
    )
    assert "on synthetic" in card and "not yet reproduced" not in card
    assert "model-index" in card and 'from_pretrained("someorg/smcp-vgg16-pascal5i-fold0")' in card
    assert card == (tmp_path / "out" / "smcp-vgg16-pascal5i-fold0" / "README.md").read_text()


def test_the_space_lists_the_released_models_and_datasets_of_the_manifest():
    from huggingface_hub import metadata_load

    from hf_fss.hub.release_manifest import space_metadata

    front = metadata_load(Path(__file__).resolve().parents[1] / "spaces_app" / "README.md")
    expected = space_metadata(CARDS)
    assert front["models"] == expected["models"] and front["datasets"] == expected["datasets"]
    assert len(expected["models"]) == 25 and "hf-fss/smcp-vgg16-pascal5i-fold0" in expected["models"]
