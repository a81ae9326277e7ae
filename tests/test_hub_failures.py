"""A failed push_to_hub changes nothing on disk and says in one line what failed (no network, no token, bad repo)."""

import hashlib
import sys
from pathlib import Path

import httpx2
import pytest
import torch
from conftest import TINY_RESNET
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

from hf_fss import FewShotSegmentationImageProcessor, NTRENetConfig, NTRENetModel
from hf_fss.hub import CARD_MARKER, HubUploadError, push_to_hub, save_pretrained_with_card

ROOT = Path(__file__).resolve().parents[1]
TINY_NTRENET = {"reduce_dim": 16, "background_prototype_dim": 24, "pyramid_bins": (9, 4, 2, 1), "image_size": 65}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = NTRENetModel(NTRENetConfig(backbone_kwargs=dict(TINY_RESNET), **TINY_NTRENET))
    folder = tmp_path_factory.mktemp("push") / "best"
    return save_pretrained_with_card(model, FewShotSegmentationImageProcessor(image_size=65), folder)


def _snapshot(folder: Path) -> dict:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in folder.iterdir()}


def _http_error(status: int) -> HfHubHTTPError:
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError(f"{status} Client Error", response=httpx2.Response(status, request=request))


FAILURES = {
    "offline": (OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled."), "no network"),
    "no network": (httpx2.ConnectError("[Errno -2] Name or service not known"), "no network: cannot reach the Hub"),
    "no token": (LocalTokenNotFoundError("Token is required"), "no valid Hub token"),
    "bad token": (_http_error(401), "no valid Hub token"),
    "no write access": (_http_error(403), "the token may not write to 'org/fake'"),
    "no such repo": (_http_error(404), "repo 'org/fake' or its namespace does not exist"),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
@pytest.mark.parametrize("where", ["create_repo", "upload_folder"])
def test_a_failed_upload_changes_nothing_and_says_why(saved, monkeypatch, failure, where):
    error, reason = FAILURES[failure]
    staged = []

    def fail(self, *args, **kwargs):
        staged.append(kwargs.get("folder_path"))
        raise error

    monkeypatch.setattr(HfApi, "create_repo", fail if where == "create_repo" else lambda self, *a, **k: None)
    monkeypatch.setattr(HfApi, "upload_folder", fail)
    before = _snapshot(saved)
    assert CARD_MARKER in (saved / "README.md").read_text()  # a generated card: it is re-rendered for the repo
    with pytest.raises(HubUploadError, match=f"upload of {saved} to org/fake failed: {reason}") as raised:
        push_to_hub(saved, "org/fake")
    assert "\n" not in str(raised.value)
    assert _snapshot(saved) == before  # README.md untouched, no temporary file left beside it
    if where == "upload_folder":
        assert staged[0] is not None and not Path(staged[0]).exists()  # the staging folder is gone too


def test_a_successful_upload_sends_the_rendered_card_then_writes_it(saved, tmp_path, monkeypatch):
    sent = {}

    def upload_folder(self, **kwargs):
        sent["card"] = (Path(kwargs["folder_path"]) / "README.md").read_text()
        assert 'from_pretrained("org/real")' in sent["card"]
        assert 'from_pretrained("org/real")' not in (saved / "README.md").read_text()  # not yet written locally
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: None)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    before = (saved / "README.md").read_text()
    try:
        assert push_to_hub(saved, "org/real") == "commit"
        assert (saved / "README.md").read_text() == sent["card"]
    finally:
        (saved / "README.md").write_text(before)


def test_the_script_prints_one_line_and_exits_2(saved, monkeypatch, capsys):
    def offline(self, *args, **kwargs):
        raise OfflineModeIsEnabled("offline mode is enabled")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    sys.modules.pop("push_to_hub", None)
    import push_to_hub as script

    before = _snapshot(saved)
    assert script.main(["--model-dir", str(saved), "--repo-id", "fake-org/fake-repo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"push_to_hub.py: error: upload of {saved} to fake-org/fake-repo failed: no network: HF_HUB_OFFLINE is set; "
        "unset it to upload"
    ]
    assert _snapshot(saved) == before
