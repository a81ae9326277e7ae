"""The Gradio Space (spaces_app/app.py): the core `segment`, its error messages, the `/segment` API and the page."""

import importlib.util
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from hf_fss import CosinePriorConfig, CosinePriorModel, FewShotSegmentationImageProcessor
from hf_fss.data.synthetic import render_synthetic_example

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _load_app():
    spec = importlib.util.spec_from_file_location("hf_fss_space_app", ROOT / "spaces_app" / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


app = _load_app()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny cosine prior model and its processor."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_cosine_prior")
    config = CosinePriorConfig(
        backbone="resnet50", backbone_kwargs={"base_width": 8, "depths": [1, 1, 1, 1]}, image_size=96
    )
    CosinePriorModel(config).save_pretrained(folder)
    FewShotSegmentationImageProcessor(image_size=96).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(model_dir):
    return app.load_model(str(model_dir))


@pytest.fixture(scope="module")
def episode(tmp_path_factory):
    """A synthetic image, its primary class's mask and the files of both (white = target)."""
    folder = tmp_path_factory.mktemp("episode")
    image, label = render_synthetic_example(0, 1, 4, image_size=120, ignore_boundary=0)
    target = label == 5
    assert target.mean() > 0.05
    Image.fromarray(image).save(folder / "support.png")
    Image.fromarray((target * 255).astype(np.uint8)).save(folder / "mask.png")
    return {"image": image, "target": target, "dir": folder}


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """The app on a free localhost port with FSS_MODELS = the tiny model folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FSS_MODELS", str(model_dir))
        patch.setenv("NO_PROXY", "127.0.0.1,localhost")
        patch.setenv("no_proxy", "127.0.0.1,localhost")
        patch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        demo = app.build_demo(examples_dir=tmp_path_factory.mktemp("examples"))
        assert demo.registry.specs == [str(model_dir)]
        port = _free_port()
        app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            demo.close()


# ------------------------------------------------------------------------------------------------ core function


def test_segment_returns_masks_maps_and_reuses_the_support_encoding(loaded, episode):
    cache = app.SupportEncodingCache()
    image, target = episode["image"], episode["target"]
    query = Image.fromarray(image).resize((150, 90))
    result = app.segment(loaded, [image], [target], [image, query], cache=cache)
    assert not result.cache_hit and cache.misses == 1
    assert [r.mask.shape for r in result.queries] == [(120, 120), (90, 150)]
    assert set(np.unique(result.queries[0].mask)) <= {0, 1}
    assert set(result.queries[0].maps) == {"prior"} and result.queries[0].maps["prior"].shape == (120, 120)
    again = app.segment(loaded, [image], [target], [query], cache=cache)
    assert again.cache_hit and cache.hits == 1
    np.testing.assert_array_equal(again.queries[0].mask, result.queries[1].mask)
    # A box annotation and two shots work too.
    boxed = app.segment(loaded, [image, image], [(10, 10, 80, 90), target], [image], cache=None)
    assert boxed.queries[0].mask.shape == (120, 120)


def test_error_messages_name_the_problem(loaded, episode, tmp_path):
    image, target = episode["image"], episode["target"]
    with pytest.raises(gr.Error, match="Support mask is missing"):
        app.segment(loaded, [image], [None], [image])
    with pytest.raises(gr.Error, match="Support mask is empty"):
        app.segment(loaded, [image], [np.zeros_like(target)], [image])
    with pytest.raises(gr.Error, match="Support mask 2 is empty"):
        app.segment(loaded, [image, image], [target, np.zeros_like(target)], [image])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a PNG")
    with pytest.raises(gr.Error, match=r"Query image: could not read 'broken.png' as an image"):
        app.segment(loaded, [image], [target], [str(broken)])
    with pytest.raises(gr.Error, match=r"Support mask: could not read 'broken.png'"):
        app.segment(loaded, [image], [str(broken)], [image])
    with pytest.raises(gr.Error, match="Support image is missing"):
        app.segment(loaded, [None], [target], [image])
    with pytest.raises(gr.Error, match="No query image"):
        app.segment(loaded, [image], [target], [])
    with pytest.raises(gr.Error, match="must have the image's size"):
        app.segment(loaded, [image], [target[:, :60]], [image])
    with pytest.raises(gr.Error, match="Support mask has no target pixel"):
        app.segment(loaded, [image], [(500, 500, 600, 600)], [image])  # a box outside the image
    # The UI: an uploaded support without strokes, strokes without an image, no model at all.
    editor = {
        "background": np.dstack([image, np.full(image.shape[:2], 255, np.uint8)]),
        "layers": [],
        "composite": None,
    }
    with pytest.raises(gr.Error, match="Support 1 has an image but no target marked"):
        app.collect_episodes("brush", [editor, None], ["", ""])
    with pytest.raises(gr.Error, match="No support image"):
        app.collect_episodes("brush", [None, None], ["", ""])
    with pytest.raises(gr.Error, match="a box is four numbers"):
        app.collect_episodes("box", [editor], ["1, 2, 3"])
    with pytest.raises(gr.Error, match="No model is configured.*FSS_MODELS"):
        app.ModelRegistry([]).get(None)


def test_model_folders_and_the_default_model(model_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "final")
    assert app._local_path(str(run)) == run / "final"
    shutil.copytree(model_dir, run / "best")
    assert app._local_path(str(run)) == run / "best"
    assert app._local_path("org/model-id") is None
    assert app.resolve_model_specs(f" {run}, org/model-id ,") == [str(run), "org/model-id"]
    monkeypatch.setattr(app, "DEFAULT_MODEL_DIR", tmp_path / "missing")
    monkeypatch.delenv("FSS_MODELS", raising=False)
    assert app.resolve_model_specs() == []
    assert app.load_model(str(run)).model.config.model_type == "cosine_prior"


def test_huge_images_are_scaled_down_with_a_note(loaded, episode):
    image, target = episode["image"], episode["target"]
    huge = np.asarray(Image.fromarray(image).resize((1500, 1200), Image.Resampling.NEAREST))
    result = app.segment(loaded, [image], [target], [huge], cache=None)
    assert result.queries[0].mask.shape == (819, 1024)
    assert any("1500x1200; resized to 1024x819 (longest side limit 1024)" in note for note in result.notes)
    # A box on a huge support is given in its original pixels: the bottom-right corner stays inside.
    boxed = app.segment(loaded, [huge], [(1400, 1100, 1500, 1200)], [image], cache=None)
    assert boxed.notes == ["Support image is 1500x1200; resized to 1024x819 (longest side limit 1024)."]


def test_brush_colours_become_classes(episode):
    image, target = episode["image"], episode["target"]
    layer = np.zeros((*target.shape, 4), np.uint8)
    layer[target] = (*app.CLASS_COLORS["blue"], 150)
    layer[:10, :10] = (*app.CLASS_COLORS["magenta"], 150)
    editor = {"background": image, "layers": [layer], "composite": None}
    episodes = app.collect_episodes("brush", [editor, None], ["", ""])
    assert sorted(episodes) == [0, 1]
    np.testing.assert_array_equal(episodes[0][1][0], target)
    assert episodes[1][1][0].sum() == 100
    boxed = app.collect_episodes("box", [editor], ["4, 5, 60, 70"])
    assert boxed == {0: ([image], [(4.0, 5.0, 60.0, 70.0)])}


# --------------------------------------------------------------------------------------------------------- API


def test_segment_api_returns_a_mask_png_of_the_query_size(server, episode, tmp_path):
    from gradio_client import Client, handle_file

    folder, target = episode["dir"], episode["target"]
    client = Client(server, verbose=False)
    endpoint = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/segment"]
    assert [p["parameter_name"] for p in endpoint["parameters"]][:3] == [
        "support_image",
        "support_mask",
        "query_image",
    ]

    mask_path, overlay_path, info = client.predict(
        support_image=handle_file(folder / "support.png"),
        support_mask=handle_file(folder / "mask.png"),
        query_image=handle_file(folder / "support.png"),  # the query is the support: its target must be found
        api_name="/segment",
    )
    with Image.open(mask_path) as opened:
        assert opened.format == "PNG"
        mask = np.asarray(opened)
    assert mask.shape == target.shape and set(np.unique(mask)) <= {0, 255}
    found = mask == 255
    assert found[target].mean() > 0.5 and found[target].mean() > found[~target].mean()
    assert Image.open(overlay_path).size == (120, 120)
    assert info["maps"] == ["prior"] and info["query_size"] == [120, 120]

    query = tmp_path / "query.jpg"
    Image.open(folder / "support.png").resize((150, 90)).save(query)
    mask_path, _, info = client.predict(
        support_image=handle_file(folder / "support.png"),
        support_mask=handle_file(folder / "mask.png"),
        query_image=handle_file(query),
        api_name="/segment",
    )
    assert Image.open(mask_path).size == (150, 90)
    assert info["support_encoding_cached"] is True

    # Errors reach the client with the app's message.
    empty, broken = tmp_path / "empty.png", tmp_path / "broken.png"
    Image.new("L", (120, 120), 0).save(empty)
    broken.write_bytes(b"this is not a PNG")
    for mask, message in ((empty, "support_mask is empty"), (broken, "support_mask: could not read 'broken.png'")):
        with pytest.raises(Exception, match=message):
            client.predict(
                support_image=handle_file(folder / "support.png"),
                support_mask=handle_file(mask),
                query_image=handle_file(query),
                api_name="/segment",
            )


# ----------------------------------------------------------------------------------------------------- browser


def _chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), *CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def test_page_runs_an_example_in_headless_chromium(server):
    executable = _chromium()
    if executable is None:
        pytest.skip("Chromium not found (looked for /usr/bin/chromium; install it with .ci/install_browser.sh)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright (the Python package) is needed for the browser test: pip install playwright")

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "space.png"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=executable,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1700},
        )
        browser.set_default_timeout(60_000)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server, wait_until="load")
            page.locator("#examples button").first.click()
            page.locator("#queries img").first.wait_for()
            page.locator("#run").click()
            result = page.locator("#result img").first
            result.wait_for()
            assert result.get_attribute("src")
            page.locator("#maps img").first.wait_for()
            page.wait_for_function("document.querySelector('#details')?.innerText.includes('1-shot')")
            details = page.locator("#details").inner_text()
            page.wait_for_timeout(500)
            page.screenshot(path=str(screenshot), full_page=True)
        except Exception:
            page.screenshot(path=str(screenshot), full_page=True)
            raise
        finally:
            browser.close()
    assert "cosine_prior" in details and "2 queries" in details, details
    assert not errors, errors
    assert screenshot.stat().st_size > 10_000
    print(f"browser test: {time.perf_counter() - start:.1f} s, screenshot {screenshot}")
