"""The Gradio Space (spaces_app/app.py) on the pipeline: `/segment` equals it, errors, brush strokes, the page."""

import functools
import importlib.util
import logging
import os
import re
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

from hf_fss import (
    CosinePriorConfig,
    CosinePriorModel,
    CRCNetConfig,
    CRCNetModel,
    FewShotSegmentationImageProcessor,
    NTRENetConfig,
    NTRENetModel,
    SMCPModel,
)
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
def crcnet_dir(tmp_path_factory):
    """A saved tiny CRCNet (it segments the supports back from the query) and its processor."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_crcnet")
    tiny = {"reduce_dim": 16, "cross_reference_reduction": 4, "refinement_steps": 2, "finetune_steps": 2}
    CRCNetModel(
        CRCNetConfig(backbone_kwargs={"base_width": 8, "depths": [1, 1, 1, 1]}, image_size=96, **tiny)
    ).save_pretrained(folder)
    FewShotSegmentationImageProcessor(image_size=96).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def registry(model_dir):
    return app.ModelRegistry([str(model_dir)])


@pytest.fixture(scope="module")
def episode(tmp_path_factory):
    """A synthetic image, its primary class's mask and files: support, masks (0/255, 0/1, anti-aliased), RGBA query."""
    folder = tmp_path_factory.mktemp("episode")
    image, label = render_synthetic_example(0, 1, 4, image_size=120, ignore_boundary=0)
    target = label == 5
    assert target.mean() > 0.05
    Image.fromarray(image).save(folder / "support.png")
    Image.fromarray((target * 255).astype(np.uint8)).save(folder / "mask.png")
    Image.fromarray(target.astype(np.uint8)).save(folder / "mask01.png")
    Image.fromarray((target * 200 + 30).astype(np.uint8)).save(folder / "mask_soft.png")
    Image.fromarray((target[:60, :60] * 255).astype(np.uint8)).save(folder / "mask_small.png")
    query = np.asarray(Image.fromarray(image).resize((150, 90)))
    alpha = np.tile(np.linspace(0, 255, 150).astype(np.uint8), (90, 1))
    Image.fromarray(np.dstack([query, alpha]), mode="RGBA").save(folder / "query_rgba.png")
    return {"image": image, "target": target, "dir": folder}


@pytest.fixture(scope="module")
def server(model_dir, crcnet_dir, tmp_path_factory):
    """The app on a free localhost port with FSS_MODELS = the tiny model folders (the cosine prior is the default)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FSS_MODELS", f"{model_dir},{crcnet_dir}")
        patch.setenv("NO_PROXY", "127.0.0.1,localhost")
        patch.setenv("no_proxy", "127.0.0.1,localhost")
        patch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        demo = app.build_demo(examples=tmp_path_factory.mktemp("examples"))
        assert demo.registry.specs == [str(model_dir), str(crcnet_dir)]
        port = _free_port()
        app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            demo.close()


def _editor(image, layer=None):
    return {"background": image, "layers": [] if layer is None else [layer], "composite": None}


# ----------------------------------------------------------------------------------------- the pipeline behind it


@pytest.mark.parametrize("mask_file", ["mask.png", "mask01.png", "mask_soft.png"])
def test_segment_equals_the_pipeline_on_the_same_files(registry, episode, mask_file):
    folder = episode["dir"]
    support, mask, query = (str(folder / name) for name in ("support.png", mask_file, "query_rgba.png"))
    mask_path, overlay, info = app.segment_api(registry, support, mask, query)
    expected = registry.get(None)(query, support_image=support, support_mask=mask, output_type="numpy")["mask"]
    with Image.open(mask_path) as opened:
        assert opened.format == "PNG" and opened.mode == "L"
        np.testing.assert_array_equal(np.asarray(opened), expected * 255)  # the pipeline's 0/1 mask as 0/255
    assert Image.open(overlay).size == (150, 90) and info["query_size"] == [150, 90] and info["maps"] == ["prior"]
    assert expected.any() and info["target_fraction"] == round(float(expected.mean()), 6)
    again = app.segment_api(registry, support, str(folder / "mask.png"), query)[2]  # 0/255, 0/1, soft: one mask
    assert again["support_encoding_cached"] is True


def test_a_mask_of_another_size_is_the_same_error_in_processor_pipeline_and_space(registry, episode):
    folder = episode["dir"]
    support, small = str(folder / "support.png"), str(folder / "mask_small.png")
    sizes = "has size 60x60 (h x w) but its image has size 120x120 (h x w)"
    pipe = registry.get(None)
    with pytest.raises(ValueError, match=re.escape(f"`support_masks[0][0] (query 0, shot 0)` {sizes}")):
        pipe.image_processor(support_images=[support], support_masks=[small])
    with pytest.raises(ValueError, match=re.escape(f"`support_mask` {sizes}")):
        pipe(support, support_image=support, support_mask=small)
    with pytest.raises(gr.Error, match=re.escape(f"`support_mask` {sizes}")):
        app.segment_api(registry, support, small, support)


def test_run_ui_segments_every_query_with_maps_and_reuses_the_encoding(registry, episode):
    image, target = episode["image"], episode["target"]
    layer = np.zeros((*target.shape, 4), np.uint8)
    layer[target] = (*app.CLASS_COLORS["blue"], 150)
    queries = [str(episode["dir"] / "support.png"), str(episode["dir"] / "query_rgba.png")]
    editors = [_editor(image, layer)] + [None] * (app.MAX_SUPPORTS - 1)
    gallery, maps, files, details = app.run_ui(registry, None, "brush", queries, *editors, *[""] * app.MAX_SUPPORTS)
    assert [Image.open(picture).size for picture, _ in gallery] == [(120, 120), (150, 90)]
    assert [caption.split(". ")[1] for _, caption in maps] == ["prior", "prior"]
    assert "colour bar 0 (blue) to 1 (red)" in maps[0][1]
    assert "cosine_prior" in details and "blue: 1-shot" in details and "2 queries" in details
    expected = registry.get(None)(queries[1], support_image=image, support_mask=target, output_type="numpy")["mask"]
    np.testing.assert_array_equal(np.asarray(Image.open(files[1])), expected * 255)
    hits = registry.hits
    assert "reused from cache" in app.run_ui(registry, None, "brush", queries, *editors, *[""] * 5)[3]
    assert registry.hits == hits + 1
    # Two shots in box mode (the box around the strokes, and a typed box), then two classes by brush colour.
    boxed = app.run_ui(registry, None, "box", queries[:1], *editors[:1], *editors[:1], *[None] * 3, "", "4, 5, 60, 70")
    assert "blue: 2-shot" in boxed[3] and len(boxed[0]) == 1
    layer[:20, :20] = (*app.CLASS_COLORS["magenta"], 150)
    two = app.run_ui(registry, None, "brush", queries[:1], _editor(image, layer), *[None] * 4, *[""] * 5)
    assert "blue: 1-shot, magenta: 1-shot" in two[3] and len(two[1]) == 2 and len(two[2]) == 2
    with pytest.raises(gr.Error, match="has no target pixel"):
        app.run_ui(registry, None, "box", queries, _editor(image), *[None] * 4, "500, 500, 600, 600", *[""] * 4)


def test_compare_ui_runs_every_model_on_the_same_supports_with_its_own_maps(model_dir, episode, tmp_path):
    torch.manual_seed(0)
    ntrenet_dir = tmp_path / "tiny_ntrenet"
    tiny = {"reduce_dim": 16, "background_prototype_dim": 16, "pyramid_bins": (6, 3), "image_size": 96}
    config = NTRENetConfig(backbone_kwargs={"base_width": 8, "depths": [1, 1, 1, 1]}, **tiny)
    NTRENetModel(config).save_pretrained(ntrenet_dir)
    FewShotSegmentationImageProcessor(image_size=96).save_pretrained(ntrenet_dir)
    registry = app.ModelRegistry([str(model_dir), str(ntrenet_dir)])
    image, target = episode["image"], episode["target"]
    layer = np.zeros((*target.shape, 4), np.uint8)
    layer[target] = (*app.CLASS_COLORS["blue"], 150)
    editors = [_editor(image, layer)] + [None] * (app.MAX_SUPPORTS - 1)
    queries = [str(episode["dir"] / "query_rgba.png"), str(episode["dir"] / "support.png")]
    gallery, table = app.compare_ui(registry, "brush", queries, *editors, *[""] * app.MAX_SUPPORTS)
    captions = [caption for _, caption in gallery]
    assert len(gallery) == 2 + 1 + len(NTRENetModel.output_maps)  # per model its mask, then each of its maps
    assert captions[0].startswith(f"{model_dir} (cosine_prior, ") and "prior" in captions[1]
    assert any("distractor" in c and c.endswith("binary mask (orange)") for c in captions)
    assert [Image.open(picture).size for picture, _ in gallery[:1]] == [(150, 90)]  # the first query only
    assert table.count("\n| `") == 2 and "| ntrenet |" in table and "| cosine_prior |" in table
    # The same mask as the Run button gives for that model, from the same supports.
    run = app.run_ui(registry, str(ntrenet_dir), "brush", queries[:1], *editors, *[""] * app.MAX_SUPPORTS)
    np.testing.assert_array_equal(np.asarray(Image.open(run[0][0][0])), np.asarray(Image.open(gallery[2][0])))
    with pytest.raises(gr.Error, match="No model is configured"):
        app.compare_ui(app.ModelRegistry([]), "brush", queries, *editors, *[""] * app.MAX_SUPPORTS)


def test_the_supports_crcnet_predicts_back_are_shown_with_their_iou(model_dir, crcnet_dir, episode, one_thread):
    """Run and Compare show each support with the mask the model predicts back from the query, for a model that
    gives one (CRCNet), and nothing extra for one that does not (the cosine prior)."""
    image, target = episode["image"], episode["target"]
    layer = np.zeros((*target.shape, 4), np.uint8)
    layer[target] = (*app.CLASS_COLORS["blue"], 150)
    editors = [_editor(image, layer)] + [None] * (app.MAX_SUPPORTS - 1)
    queries = [str(episode["dir"] / "query_rgba.png"), str(episode["dir"] / "support.png")]
    registry = app.ModelRegistry([str(model_dir), str(crcnet_dir)])
    _, maps, _, _ = app.run_ui(registry, str(crcnet_dir), "brush", queries, *editors, *[""] * app.MAX_SUPPORTS)
    pipe = registry.get(str(crcnet_dir))
    for index, query in enumerate(queries):  # each query's maps, then the support as predicted back from it
        result = pipe(query, support_image=image, support_mask=target, return_support_predictions=True)
        (shot,) = result["support_predictions"]
        picture, caption = [(p, c) for p, c in maps if c.startswith(f"{index + 1}. support")][0]
        assert caption == (
            f"{index + 1}. support 1: predicted back from the query (CRCNet's symmetric prediction); "
            f"IoU {shot['iou']:.2f} with the marked target"
        )
        expected = app.overlay(image.astype(np.float32), np.asarray(shot["mask"]), [app.CLASS_COLORS["blue"]])
        np.testing.assert_array_equal(np.asarray(Image.open(picture)), np.asarray(expected))
    assert sum("refinement_step" in c for _, c in maps) == 2 * 2  # the refinement steps are shown too
    gallery, _ = app.compare_ui(registry, "brush", queries, *editors, *[""] * app.MAX_SUPPORTS)
    supports = [c for _, c in gallery if "predicted back" in c]
    assert len(supports) == 1 and supports[0].startswith(f"{crcnet_dir}: support 1:")
    assert len(gallery) == 2 + 1 + len(pipe.model.output_maps) + 1  # each model's mask and maps, CRCNet's support
    # Two classes (brush colours) on one support: a picture per class, in its colour.
    layer[:20, :20] = (*app.CLASS_COLORS["magenta"], 150)
    two = app.run_ui(registry, str(crcnet_dir), "brush", queries[:1], _editor(image, layer), *[None] * 4, *[""] * 5)
    assert [c.split(":")[0] for _, c in two[1] if "predicted back" in c] == [
        "1. support 1 [blue]",
        "1. support 1 [magenta]",
    ]
    files = [str(episode["dir"] / name) for name in ("support.png", "mask.png")] + queries[:1]
    assert 0.0 <= app.segment_api(registry, *files, str(crcnet_dir))[2]["support_iou"] <= 1.0  # `/segment`'s summary
    assert "support_iou" not in app.segment_api(registry, *files)[2]  # the cosine prior, the default


def test_error_messages_name_the_problem(registry, episode, tmp_path):
    folder = episode["dir"]
    support, mask = str(folder / "support.png"), str(folder / "mask.png")
    empty, broken = tmp_path / "empty.png", tmp_path / "broken.png"
    Image.new("L", (120, 120), 0).save(empty)
    broken.write_bytes(b"this is not a PNG")
    cases = [
        ((support, None, support), "`support_mask` (or `support_box`) is required"),
        ((support, str(empty), support), "`support_mask` has no target pixel"),
        ((support, str(broken), support), "`support_mask`: could not read image file"),
        ((None, mask, support), "`support_image` is required"),
        ((support, mask, str(broken)), "`query_image`: could not read image file"),
        ((support, mask, None), "`query_image` is required"),
    ]
    for args, message in cases:
        with pytest.raises(gr.Error, match=re.escape(message)):
            app.segment_api(registry, *args)
    # The UI: an uploaded support without strokes, strokes without an image, no model at all.
    editor = _editor(np.dstack([episode["image"], np.full((120, 120), 255, np.uint8)]))
    with pytest.raises(gr.Error, match="Support 1 has an image but no target marked"):
        app.collect_episodes("brush", [editor, None], ["", ""])
    with pytest.raises(gr.Error, match="No support image"):
        app.collect_episodes("brush", [None, None], ["", ""])
    with pytest.raises(gr.Error, match="a box is four numbers"):
        app.collect_episodes("box", [editor], ["1, 2, 3"])
    with pytest.raises(gr.Error, match="No model is configured.*FSS_MODELS"):
        app.ModelRegistry([]).get(None)


def test_model_folders_and_the_default_model(model_dir, tmp_path, monkeypatch, caplog):
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
    # The quickstart run folder, marked by training before it saved a model, is offered only once it has one.
    from hf_fss.run_folder import write_run_folder_marker

    quickstart = write_run_folder_marker(tmp_path / "quickstart").parent
    monkeypatch.setattr(app, "DEFAULT_MODEL_DIR", quickstart)
    assert app.resolve_model_specs() == []
    shutil.copytree(model_dir, quickstart / "final")
    assert app._local_path(str(quickstart)) == quickstart / "final"
    with caplog.at_level(logging.WARNING, logger="hf_fss.utils"):
        model = app.load_pipeline(str(run)).model
    assert model.config.model_type == "cosine_prior" and model.name_or_path == str(run / "best")
    assert f"{run} is a training run folder: using its best/" in caplog.text  # the rule evaluate.py follows too


def test_a_plain_transformers_folder_is_named_with_its_fix(tmp_path, capsys):
    """A SegGPT folder as transformers saves it, and a config.json without model_type: one line each, with the fix."""
    from conftest import TINY_SEGGPT
    from transformers import SegGptConfig, SegGptForImageSegmentation

    seggpt, empty = tmp_path / "seggpt", tmp_path / "notbb"
    SegGptForImageSegmentation(SegGptConfig(**TINY_SEGGPT)).save_pretrained(seggpt)
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    fix = f"not an hf_fss few-shot model; wrap it: SegGptFssModel.from_seggpt('{seggpt}') then save_pretrained"
    for folder, message in ((seggpt, fix), (empty, "holds no model_type in its config.json")):
        capsys.readouterr()
        with pytest.raises(gr.Error, match=re.escape(message)):
            app.load_pipeline(str(folder))
        logged = capsys.readouterr().err.strip().splitlines()
        assert logged[-1].startswith(
            f"hf_fss space: Model error: Could not load model '{folder}': ValueError: {folder}"
        )


def test_large_images_keep_their_size(registry, episode):
    """The pipeline takes any size (the processor scales to its canvas); the mask comes back at the query's size."""
    huge = Image.fromarray(episode["image"]).resize((1500, 1200), Image.Resampling.NEAREST)
    huge.save(episode["dir"] / "huge.png")
    support, mask = str(episode["dir"] / "support.png"), str(episode["dir"] / "mask.png")
    mask_path, _, info = app.segment_api(registry, support, mask, str(episode["dir"] / "huge.png"))
    assert Image.open(mask_path).size == (1500, 1200) and info["query_size"] == [1500, 1200]


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


def test_examples_are_rendered_into_a_cache_not_the_source_tree(tmp_path, monkeypatch):
    monkeypatch.delenv("FSS_EXAMPLES_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert app.examples_dir() == tmp_path / "xdg" / "hf_fss" / "space_examples"
    monkeypatch.setenv("FSS_EXAMPLES_DIR", str(tmp_path / "examples"))
    assert app.examples_dir() == tmp_path / "examples"
    before = sorted((ROOT / "spaces_app").rglob("*"))
    demo = app.build_demo(specs=[])
    assert demo.examples_dir == tmp_path / "examples" and len(list((tmp_path / "examples").glob("*.png"))) >= 10
    assert sorted((ROOT / "spaces_app").rglob("*")) == before  # nothing written into the source tree


# --------------------------------------------------------------------------------------------------------- API


def test_segment_api_through_gradio_client(server, registry, crcnet_dir, episode, tmp_path, one_thread):
    from gradio_client import Client, handle_file

    folder = episode["dir"]
    client = Client(server, verbose=False)
    endpoint = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/segment"]
    assert [p["parameter_name"] for p in endpoint["parameters"]] == [
        "support_image",
        "support_mask",
        "query_image",
        "model",
    ]
    files = {name: str(folder / f) for name, f in (("s", "support.png"), ("m", "mask01.png"), ("q", "query_rgba.png"))}
    mask_path, overlay_path, info = client.predict(
        support_image=handle_file(files["s"]),
        support_mask=handle_file(files["m"]),
        query_image=handle_file(files["q"]),
        api_name="/segment",
    )
    expected = registry.get(None)(files["q"], support_image=files["s"], support_mask=files["m"], output_type="numpy")
    with Image.open(mask_path) as opened:
        assert opened.format == "PNG"
        np.testing.assert_array_equal(np.asarray(opened), expected["mask"] * 255)
    assert Image.open(overlay_path).size == (150, 90)
    assert info["maps"] == ["prior"] and info["query_size"] == [150, 90] and "support_iou" not in info
    # CRCNet also segments the support back from the query: its IoU with the given mask is in the summary.
    crcnet = client.predict(*(handle_file(files[k]) for k in "smq"), model=str(crcnet_dir), api_name="/segment")[2]
    expected = app.ModelRegistry([str(crcnet_dir)]).get(None)(
        files["q"], support_image=files["s"], support_mask=files["m"], return_support_predictions=True
    )
    assert crcnet["model_type"] == "crcnet" and crcnet["support_iou"] == round(
        expected["support_predictions"][0]["iou"], 6
    )

    # Errors reach the client with the pipeline's message.
    with pytest.raises(Exception, match=re.escape("has size 60x60 (h x w) but its image has size 120x120")):
        client.predict(
            support_image=handle_file(files["s"]),
            support_mask=handle_file(folder / "mask_small.png"),
            query_image=handle_file(files["q"]),
            api_name="/segment",
        )


# ----------------------------------------------------------------------------------------------------- browser


def _chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), *CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def _assert_inside(box: dict | None, width: int, height: int) -> None:
    assert box and box["x"] >= 0 and box["y"] >= 0, box
    assert box["x"] + box["width"] <= width and box["y"] + box["height"] <= height, (box, width, height)


@pytest.mark.slow
def test_page_runs_an_example_in_headless_chromium(server, episode):
    executable = _chromium()
    if executable is None:
        pytest.skip("Chromium not found (looked for /usr/bin/chromium; install it with .ci/install_browser.sh)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright (the Python package) is needed for the browser test: pip install playwright")

    ARTIFACTS.mkdir(exist_ok=True)
    landscape = episode["dir"] / "landscape.png"  # a single landscape result used to be pushed down and cut off
    Image.fromarray(episode["image"]).resize((360, 120)).save(landscape)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
        for width, height in ((1280, 800), (800, 1000)):  # a laptop, and a narrow window where columns stack
            screenshot = ARTIFACTS / f"space_{width}x{height}.png"
            browser = playwright.chromium.launch_persistent_context(
                profile, executable_path=executable, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": width, "height": height},
            )  # fmt: skip
            browser.set_default_timeout(60_000)
            try:
                page = browser.new_page()
                errors = []
                page.on("pageerror", lambda error, errors=errors: errors.append(str(error)))
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
                page.wait_for_timeout(1000)
                page.screenshot(path=str(screenshot))
                _assert_inside(result.bounding_box(), width, height)  # the result image is in the window after the run
                captions = page.locator("#maps .caption-label").all()
                assert captions and all(c.evaluate("e => e.scrollWidth <= e.clientWidth") for c in captions)
                page.locator("#queries button[aria-label='Clear']").first.click()  # now one landscape query
                page.locator("#queries input[type=file]").first.set_input_files(str(landscape))
                page.wait_for_function("document.querySelectorAll('#queries img').length === 1")
                page.locator("#run").click()
                page.wait_for_function("document.querySelector('#result')?.innerText.includes('1. landscape')")
                page.wait_for_timeout(1000)
                page.screenshot(path=str(ARTIFACTS / f"space_{width}x{height}_landscape.png"))
                _assert_inside(page.locator("#result img").first.bounding_box(), width, height)
            except Exception:
                page.screenshot(path=str(screenshot), full_page=True)
                raise
            finally:
                browser.close()
            assert "cosine_prior" in details and "2 queries" in details, details
            assert not errors, errors
            assert screenshot.stat().st_size > 10_000
    print(f"browser test: {time.perf_counter() - start:.1f} s, screenshots in {ARTIFACTS}")


# ------------------------------------------------------------------------------------------- load, errors, maps


@pytest.mark.slow
def test_40_concurrent_segment_requests_all_succeed_and_a_user_error_is_one_log_line(server, episode, capfd):
    from gradio_client import Client, handle_file

    folder, client = episode["dir"], Client(server, verbose=False)
    args = [handle_file(folder / name) for name in ("support.png", "mask.png", "query_rgba.png")]
    jobs = [client.submit(*args, api_name="/segment") for _ in range(40)]  # the queue holds 64
    results = [job.result(timeout=240) for job in jobs]
    expected = np.asarray(Image.open(results[0][0]))
    for mask_path, overlay_path, info in results:  # every file complete (a truncated PNG fails to load)
        np.testing.assert_array_equal(np.asarray(Image.open(mask_path)), expected)
        assert Image.open(overlay_path).size == (150, 90) and info["query_size"] == [150, 90]
    capfd.readouterr()
    (folder / "it's broken.png").write_bytes(b"not a PNG")
    with pytest.raises(Exception, match="`query_image`: could not read image file") as raised:
        client.predict(*args[:2], handle_file(folder / "it's broken.png"), api_name="/segment")
    assert "&#x27;" not in str(raised.value) and "&quot;" not in str(raised.value)
    time.sleep(0.5)
    log = capfd.readouterr().err
    assert "Traceback" not in log and len([line for line in log.splitlines() if "Input error" in line]) == 1, log


def test_user_errors_are_plain_text_persistent_and_logged_once(registry, episode, capfd):
    folder, _ = episode["dir"], registry.get(None)
    capfd.readouterr()
    with pytest.raises(gr.Error) as raised:
        app.segment_api(registry, str(folder / "support.png"), str(folder / "mask.png"), str(folder / "it's.png"))
    assert raised.value.duration is None and raised.value.print_exception is False
    assert "&#x27;" not in raised.value.message and "&quot;" not in raised.value.message
    assert "it's.png" in raised.value.message and capfd.readouterr().err.count("\n") == 1


def test_a_missing_folder_or_unreachable_hub_model_fails_fast(tmp_path, monkeypatch):
    """Fast by construction, not by a wall-clock bound: a local path never reaches the Hub, and a Hub id is probed
    once with the Space's timeout instead of transformers' retries."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    for spec, message, probes in [
        ("outputs/missing", "Model folder 'outputs/missing' not found", []),
        ("./missing/model/best", "not found", []),
        ("outputs", "outputs holds no model: no config.json, and no best/ or final/", []),
        (
            "no-such-org-hf-fss/no-such-model",
            "Could not load model 'no-such-org-hf-fss/no-such-model' (check the Hub",
            [("no-such-org-hf-fss/no-such-model", app.HUB_TIMEOUT_S)],
        ),
    ]:
        calls = []
        monkeypatch.setattr(app.huggingface_hub, "model_info", functools.partial(_unreachable, calls))
        with pytest.raises(gr.Error, match=re.escape(message)) as raised:
            app.ModelRegistry([spec]).get(None)
        assert calls == probes and raised.value.duration is None and raised.value.title == "Model"


def _unreachable(calls, repo_id, timeout=None, **kwargs):
    calls.append((repo_id, timeout))
    raise ConnectionError("[Errno -2] Name or service not known")


def test_an_editor_layer_of_another_size_is_refused_not_stretched(episode):
    image = episode["image"]  # 120x120; a 100x130 layer (another photo's mask) is not resized onto it
    layer = np.zeros((100, 130, 4), np.uint8)
    layer[20:60, 20:60] = (*app.CLASS_COLORS["blue"], 150)
    with pytest.raises(
        gr.Error, match=re.escape("Support 1: the painted layer has size 100x130 but its image 120x120")
    ):
        app.collect_episodes("brush", [_editor(image, layer)], [""])


def test_maps_have_a_scale_and_the_distractor_map_is_a_binary_mask(episode):
    image = episode["image"]
    ramp = np.tile(np.linspace(0, 1, 120, dtype=np.float32), (120, 1))
    prior = np.asarray(app.heat_map(image, ramp))
    assert prior.shape[0] > 120 and prior.shape[1] == 120  # a colour bar below the map
    bar = prior[125:, 5:-5].reshape(-1, 3)
    assert bar[:, 2].mean() > 0 and (prior[130, 10] != prior[130, 110]).any()  # blue ... red
    distractor = np.asarray(app.heat_map(image, (ramp > 0.5).astype(np.float32), binary=True))
    orange = np.all(distractor == (255, 140, 0), axis=-1)  # only where the mask is 1; no colour bar (not a scale)
    assert distractor.shape == (120, 120, 3) and orange[:, 61:].all() and not orange[:, :60].any()
    ntrenet = NTRENetModel  # the captions are the model's declared `output_maps` / `binary_maps`
    assert "neither background nor" in app.map_caption(ntrenet, "distractor")
    assert app.map_caption(ntrenet, "distractor").endswith("binary mask (orange)")
    assert app.map_caption(ntrenet, "prior").endswith(app.SCALE)
    # SMCP: the first pass is a scale, its pseudo-mask a binary mask (the fused result is the segmentation itself)
    assert app.map_caption(SMCPModel, "pseudo_mask").endswith("binary mask (orange)")
    assert "first pass" in app.map_caption(SMCPModel, "first_pass") and app.map_caption(
        SMCPModel, "first_pass"
    ).endswith(app.SCALE)


def test_the_typed_box_is_drawn_on_the_support(episode):
    hidden = app.box_preview(_editor(episode["image"]), "4, 5")
    assert hidden["visible"] is False
    shown = app.box_preview(_editor(episode["image"]), "10, 20, 60, 70")
    drawn = np.asarray(Image.open(shown["value"]))
    assert shown["visible"] is True and tuple(drawn[20, 30]) == app.CLASS_COLORS["blue"]
    assert tuple(drawn[40, 30]) != app.CLASS_COLORS["blue"]


@pytest.mark.parametrize(
    ("file", "changes", "message"),
    [
        ("preprocessor_config.json", {"image_size": 0}, "`image_size` must be a positive int, got 0"),
        ("config.json", {"image_size": None}, "Field 'image_size' expected int, got NoneType"),
        ("config.json", {"model_type": "ntrenet"}, "unknown field"),
    ],
)
def test_a_broken_model_folder_in_fss_models_is_one_line_naming_the_file(model_dir, tmp_path, file, changes, message):
    import json

    folder = tmp_path / "broken"
    shutil.copytree(model_dir, folder)
    path = folder / file
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    with pytest.raises(gr.Error) as raised:
        app.ModelRegistry([str(folder)]).get(None)
    text = raised.value.message
    assert re.match(re.escape(f"Could not load model {str(folder)!r}: ") + r"\w*Error: " + re.escape(str(path)), text)
    assert message in text
    assert "\n" not in text and raised.value.title == "Model"
