"""The "few-shot-segmentation" pipeline: single class, boxes, K shots, several classes, support reuse, errors."""

import numpy as np
import pytest
import torch
from conftest import TINY_RESNET
from PIL import Image
from transformers import pipeline
from transformers.pipelines import PIPELINE_REGISTRY

import hf_fss
from hf_fss import CosinePriorConfig, CosinePriorModel, FewShotSegmentationImageProcessor, FewShotSegmentationPipeline
from hf_fss.modeling_fss import FewShotSegmentationOutput
from hf_fss.models.cosine_prior.modeling_cosine_prior import CosinePriorSupportEncoding

SIZE = 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CosinePriorModel(CosinePriorConfig(backbone_kwargs=dict(TINY_RESNET), image_size=SIZE)).eval()


@pytest.fixture(scope="module")
def pipe(model):
    return pipeline("few-shot-segmentation", model=model)


def _image(height, width, seed):
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


def _mask(height, width, box):
    x0, y0, x1, y1 = box
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def _direct_masks(model, processor, query, supports, masks):
    """What model + image processor give without the pipeline (the reference)."""
    inputs = processor(images=query, support_images=supports, support_masks=masks, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    height, width = np.asarray(query).shape[:2]
    return processor.post_process_semantic_segmentation(outputs, target_sizes=[(height, width)])[0].numpy()


# ------------------------------------------------------------------------------------------------- registration


def test_import_registers_the_task():
    assert "few-shot-segmentation" in PIPELINE_REGISTRY.get_supported_tasks()
    assert PIPELINE_REGISTRY.supported_tasks["few-shot-segmentation"]["impl"] is FewShotSegmentationPipeline
    hf_fss.pipelines.register_pipeline()  # idempotent
    assert PIPELINE_REGISTRY.supported_tasks["few-shot-segmentation"]["impl"] is FewShotSegmentationPipeline


def test_pipeline_loads_model_and_processor_from_a_folder(tmp_path, model):
    model.save_pretrained(tmp_path)
    FewShotSegmentationImageProcessor(image_size=SIZE, pad_with_mean=True).save_pretrained(tmp_path)
    pipe = pipeline("few-shot-segmentation", model=str(tmp_path))
    assert isinstance(pipe, FewShotSegmentationPipeline) and isinstance(pipe.model, CosinePriorModel)
    assert pipe.image_processor.image_size == SIZE and pipe.image_processor.pad_with_mean


# ------------------------------------------------------------------------------------------------ single class


@pytest.mark.parametrize("query_size", [(40, 56), (90, 130)])  # kept as is / resized by the processor
def test_single_class_matches_model_and_processor(pipe, model, query_size):
    query, support = _image(*query_size, seed=1), _image(60, 50, seed=2)
    mask = _mask(60, 50, (5, 10, 30, 40))
    result = pipe(query, support_image=support, support_mask=mask)
    assert set(result) == {"mask", "scores", "labels"}
    assert isinstance(result["mask"], Image.Image) and result["mask"].mode == "L"
    assert result["mask"].size == (query_size[1], query_size[0])
    scores = result["scores"]
    assert scores.shape == query_size and scores.dtype == np.float32
    assert float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0
    array = np.array(result["mask"])
    assert set(np.unique(array)) <= {0, 1}
    np.testing.assert_array_equal(array, (scores > 0.5).astype(np.uint8))
    np.testing.assert_array_equal(array, _direct_masks(model, pipe.image_processor, query, [support], [mask]))
    assert result["labels"] == ["background", "target"]

    numpy_result = pipe(query, support_image=support, support_mask=mask, output_type="numpy")
    assert numpy_result["mask"].dtype == np.uint8 and numpy_result["mask"].shape == query_size
    np.testing.assert_array_equal(numpy_result["mask"], array)


def test_box_support_equals_the_mask_of_the_box(pipe):
    query, support = _image(48, 48, seed=3), _image(48, 48, seed=4)
    box = (8, 6, 30, 40)
    from_box = pipe(query, support_image=support, support_box=box, output_type="numpy")
    from_mask = pipe(query, support_image=support, support_mask=_mask(48, 48, box), output_type="numpy")
    np.testing.assert_array_equal(from_box["mask"], from_mask["mask"])
    np.testing.assert_allclose(from_box["scores"], from_mask["scores"])


def test_two_shots_match_the_direct_k2_call(pipe, model):
    query = _image(50, 50, seed=5)
    supports = [_image(50, 50, seed=6), _image(44, 52, seed=7)]
    masks = [_mask(50, 50, (0, 0, 20, 20)), _mask(44, 52, (10, 10, 40, 30))]
    result = pipe(query, support_image=supports, support_mask=masks, output_type="numpy")
    np.testing.assert_array_equal(result["mask"], _direct_masks(model, pipe.image_processor, query, supports, masks))
    one_shot = pipe(query, support_image=supports[0], support_mask=masks[0], output_type="numpy")
    assert not np.allclose(result["scores"], one_shot["scores"])  # the second shot matters


def test_supports_are_encoded_once_for_many_queries(pipe, monkeypatch):
    calls = []
    encode = pipe.model.encode_support

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return encode(*args, **kwargs)

    monkeypatch.setattr(pipe.model, "encode_support", counting)
    queries = [_image(40, 40, seed=s) for s in (8, 9, 10)]
    support, mask = _image(40, 40, seed=11), _mask(40, 40, (5, 5, 25, 25))
    results = pipe(queries, support_image=support, support_mask=mask, output_type="numpy")
    assert len(results) == 3 and len(calls) == 1 and tuple(calls[0][:2]) == (1, 1)
    for query, result in zip(queries, results):
        single = pipe(query, support_image=support, support_mask=mask, output_type="numpy")
        np.testing.assert_array_equal(result["mask"], single["mask"])

    calls.clear()
    encoded = pipe.encode_supports(supports={"a": (support, mask), "b": ([support, support], [mask, mask])})
    assert len(calls) == 2 and encoded.labels == ["a", "b"]
    reused = pipe(queries, support_encoding=encoded, output_type="numpy")
    assert len(calls) == 2 and len(reused) == 3 and reused[0]["scores"].shape == (2, 40, 40)


def test_return_maps_gives_the_methods_maps_at_the_query_size(pipe, model):
    query, support = _image(90, 130, seed=20), _image(60, 50, seed=21)
    mask = _mask(60, 50, (5, 10, 30, 40))
    result = pipe(query, support_image=support, support_mask=mask, return_maps=True, output_type="numpy")
    assert set(result) == {"mask", "scores", "labels", "maps"} and set(result["maps"]) == {"prior"}
    prior = result["maps"]["prior"]
    assert prior.shape == (90, 130) and prior.dtype == np.float32
    assert float(prior.min()) >= 0.0 and float(prior.max()) <= 1.0
    processor = pipe.image_processor
    inputs = processor(images=query, support_images=[support], support_masks=[mask], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    expected = processor.resize_logits(outputs.maps["prior"][0].float(), (90, 130))[0].clamp(0, 1)
    np.testing.assert_allclose(prior, expected.numpy(), atol=1e-5)
    assert "maps" not in pipe(query, support_image=support, support_mask=mask)  # only when asked for
    several = pipe(query, supports=[(support, mask), (support, (0, 0, 20, 20))], return_maps=True)
    assert several["maps"]["prior"].shape == (2, 90, 130)
    np.testing.assert_allclose(several["maps"]["prior"][0], prior, atol=1e-6)


def test_grayscale_and_rgba_files_follow_the_processor_policy(pipe, tmp_path):
    """A grayscale mask is thresholded (white = target), an RGBA query composited onto white, as in the processor."""
    query = np.dstack([_image(40, 48, seed=22), np.tile(np.linspace(0, 255, 48, dtype=np.uint8), (40, 1))])
    Image.fromarray(query, mode="RGBA").save(tmp_path / "query.png")
    support = _image(40, 40, seed=23)
    target = _mask(40, 40, (5, 5, 25, 30))
    soft = (target * 180 + 40).astype(np.uint8)  # 40 / 220: neither {0, 1} nor {0, 255}
    Image.fromarray(soft).save(tmp_path / "soft.png")
    from_files = pipe(str(tmp_path / "query.png"), support_image=support, support_mask=str(tmp_path / "soft.png"))
    alpha = query[..., 3:] / 255.0
    white = (query[..., :3] * alpha + 255 * (1 - alpha)).astype(np.float32) / 255
    direct = pipe(white, support_image=support, support_mask=target, output_type="numpy")
    np.testing.assert_array_equal(np.array(from_files["mask"]), direct["mask"])
    np.testing.assert_allclose(from_files["scores"], direct["scores"], atol=1e-5)


# ------------------------------------------------------------------------------------------------ several classes


class _OracleEncoding(CosinePriorSupportEncoding):
    pass


@pytest.fixture
def oracle_pipe(monkeypatch):
    """
    A pipeline whose model 'finds' the support mask at the same place in the query, with a confidence set by the
    support image's brightness: logits = (0, 4 * mean support pixel * support mask). With `do_normalize=False` a white
    support gives confidence 4 (target probability sigmoid(4) = 0.982), a grey (128) one 2.008 (0.882).
    """
    torch.manual_seed(0)
    model = CosinePriorModel(CosinePriorConfig(backbone_kwargs=dict(TINY_RESNET), image_size=SIZE)).eval()

    def encode(support_pixel_values, support_masks):
        confidence = 4 * support_pixel_values.mean(dim=(1, 2, 3, 4))  # (B,)
        masks = (support_masks == 1).float().mean(dim=1, keepdim=True)  # (B, 1, H, W), averaged over shots
        return _OracleEncoding(shot=support_masks.shape[1], features=confidence[:, None], masks=masks)

    def segment(pixel_values, support_encoding, labels=None, **kwargs):
        target = support_encoding.features[:, :, None, None] * support_encoding.masks
        return FewShotSegmentationOutput(logits=torch.cat([torch.zeros_like(target), target], dim=1))

    monkeypatch.setattr(model, "_encode_support", encode)
    monkeypatch.setattr(model, "_segment", segment)
    processor = FewShotSegmentationImageProcessor(image_size=SIZE, do_normalize=False)
    return pipeline("few-shot-segmentation", model=model, image_processor=processor)


def test_several_classes_give_a_labelled_map_by_argmax_with_a_background_threshold(oracle_pipe):
    white, grey = np.full((SIZE, SIZE, 3), 255, np.uint8), np.full((SIZE, SIZE, 3), 128, np.uint8)
    left = _mask(SIZE, SIZE, (0, 0, 40, 32))  # rows 0..31, columns 0..39
    right = _mask(SIZE, SIZE, (24, 0, SIZE, SIZE))  # columns 24..63, all rows
    query = _image(SIZE, SIZE, seed=12)
    supports = {"left": (white, left), "right": (grey, right)}

    result = oracle_pipe(query, supports=supports, output_type="numpy")
    expected = np.zeros((SIZE, SIZE), dtype=np.uint8)
    expected[right == 1] = 2
    expected[left == 1] = 1  # the overlap (rows 0..31, columns 24..39) goes to the more confident class
    np.testing.assert_array_equal(result["mask"], expected)
    assert result["labels"] == ["background", "left", "right"]
    assert result["scores"].shape == (2, SIZE, SIZE)
    np.testing.assert_allclose(result["scores"][0][left == 1], 1 / (1 + np.exp(-4.0)), rtol=1e-5)
    np.testing.assert_allclose(result["scores"][1][right == 1], 1 / (1 + np.exp(-4 * 128 / 255)), rtol=1e-5)
    np.testing.assert_allclose(result["scores"][1][right == 0], 0.5, rtol=1e-6)  # logits (0, 0)

    # A stricter background threshold drops the class whose probability (0.882) stays below it.
    strict = oracle_pipe(query, supports=supports, threshold=0.9, output_type="numpy")
    np.testing.assert_array_equal(strict["mask"], left)

    # A list of support sets: classes named by position; the PIL mask holds the same labels.
    listed = oracle_pipe(query, supports=[(white, left), (grey, right)])
    np.testing.assert_array_equal(np.array(listed["mask"]), expected)
    assert listed["labels"] == ["background", "class_1", "class_2"]

    # One class: the mask is its target probability above the threshold.
    single = oracle_pipe(query, support_image=grey, support_mask=right, output_type="numpy")
    np.testing.assert_array_equal(single["mask"], right)
    assert single["scores"].shape == (SIZE, SIZE)


def test_several_classes_accept_boxes_and_dicts(pipe):
    query, support = _image(40, 40, seed=13), _image(40, 40, seed=14)
    result = pipe(
        query,
        supports={
            "boxed": (support, (2, 2, 20, 20)),
            "masked": {"support_image": [support, support], "support_mask": [_mask(40, 40, (10, 10, 30, 30))] * 2},
        },
        output_type="numpy",
    )
    assert result["scores"].shape == (2, 40, 40) and set(np.unique(result["mask"])) <= {0, 1, 2}
    best = result["scores"].argmax(0) + 1
    expected = np.where(result["scores"].max(0) > 0.5, best, 0)
    np.testing.assert_array_equal(result["mask"], expected)


# ------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "`support_image` and `support_mask` (or `support_box`) are required"),
        ({"support_image": "IMG"}, "`support_mask` (or `support_box`) is required"),
        ({"support_image": "IMG", "support_mask": "EMPTY"}, "`support_mask` has no target pixel"),
        ({"support_image": "/no/such/file.png", "support_mask": "MASK"}, "`support_image`: could not read image file"),
        (
            {"support_image": ["IMG", "IMG"], "support_mask": ["MASK", "EMPTY"]},
            "`support_mask[1]` has no target pixel",
        ),
        ({"support_image": ["IMG", "IMG"], "support_mask": ["MASK"]}, "`support_mask` has 1 annotation(s)"),
        ({"support_image": "IMG", "support_mask": "MASK", "support_box": (0, 0, 4, 4)}, "not both"),
        ({"support_image": "IMG", "support_box": (0, 0, 4)}, "`support_box` must be a box"),
        ({"support_image": "IMG", "support_box": (50, 50, 60, 60)}, "`support_box` has no target pixel"),
        (
            {"support_image": "IMG", "support_mask": "SMALL"},
            "`support_mask` has size 10x10 (h x w) but its image has size 32x32 (h x w)",
        ),
        ({"supports": {"cat": ("IMG", "EMPTY")}}, "`supports['cat'] mask` has no target pixel"),
        ({"supports": {"cat": "IMG"}}, "`supports['cat']` must be an (images, masks) pair"),
        ({"supports": {"cat": ("IMG", "MASK")}, "support_image": "IMG"}, "either `supports`"),
        ({"supports": {}}, "`supports` is empty"),
        ({"support_image": "IMG", "support_mask": "MASK", "threshold": 2}, "`threshold` must be a number in [0, 1]"),
        ({"support_image": "IMG", "support_mask": "MASK", "output_type": "tensor"}, "`output_type` must be"),
        ({"support_encoding": "nope"}, "`support_encoding` must come from pipeline.encode_supports"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(pipe, kwargs, message):
    values = {
        "IMG": _image(32, 32, seed=15),
        "MASK": _mask(32, 32, (4, 4, 20, 20)),
        "EMPTY": np.zeros((32, 32), dtype=np.uint8),
        "SMALL": _mask(10, 10, (0, 0, 5, 5)),
    }

    def resolve(value):
        if isinstance(value, str):
            return values.get(value, value)
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if isinstance(value, tuple) and not all(isinstance(v, int) for v in value):
            return tuple(resolve(v) for v in value)
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        return value

    with pytest.raises(ValueError) as info:
        pipe(values["IMG"], **{k: resolve(v) for k, v in kwargs.items()})
    assert message in str(info.value)


def test_unreadable_or_missing_query_raises_value_errors(pipe):
    support, mask = _image(32, 32, seed=16), _mask(32, 32, (4, 4, 20, 20))
    with pytest.raises(ValueError, match=r"`images`: could not read image file"):
        pipe("/no/such/query.jpg", support_image=support, support_mask=mask)
    with pytest.raises(ValueError, match=r"`images\[1\]`: could not read image file"):
        pipe([support, "/no/such/query.jpg"], support_image=support, support_mask=mask)
    with pytest.raises(ValueError, match="`images` is required"):
        pipe(None, support_image=support, support_mask=mask)
    with pytest.raises(ValueError, match="`images` is an empty list"):
        pipe([], support_image=support, support_mask=mask)


# -------------------------------------------------------------------------- images as users bring them (issue 10)


def test_16_bit_and_exif_rotated_files_decode_as_in_the_processor(pipe, tmp_path):
    """Kind 3: a 16-bit PNG (path or Image.open) is scaled by 65535 like a uint16 array; an EXIF-rotated JPEG opened
    with Image.open is turned upright as its path is."""
    deep = (np.random.default_rng(30).random((40, 48)) * 65535).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    support, target = _image(40, 40, seed=31), _mask(40, 40, (5, 5, 25, 30))
    reference = pipe((deep / 65535.0).astype(np.float32), support_image=support, support_mask=target)
    for query in (tmp_path / "deep.png", str(tmp_path / "deep.png"), Image.open(tmp_path / "deep.png"), deep):
        result = pipe(query, support_image=support, support_mask=target)
        np.testing.assert_allclose(result["scores"], reference["scores"], atol=1e-4)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(_image(40, 48, seed=32), k=1).copy()).save(tmp_path / "turned.jpg", exif=exif)
    from_path = pipe(str(tmp_path / "turned.jpg"), support_image=support, support_mask=target)
    from_pil = pipe(Image.open(tmp_path / "turned.jpg"), support_image=support, support_mask=target)
    assert from_pil["mask"].size == (48, 40)  # displayed as 48 x 40 (w x h), stored as 40 x 48
    np.testing.assert_array_equal(from_pil["scores"], from_path["scores"])


def test_a_small_target_on_a_large_support_is_kept(pipe):
    """Kind 4: a 2-px stroke and a 3x3 object on a 2000x1500 support (64-px canvas: 1 row in 31 is sampled) used
    to vanish and make the model raise 'no target pixel'."""
    support = _image(1500, 2000, seed=33)
    stroke = np.zeros((1500, 2000), dtype=np.uint8)
    stroke[701:703, 300:1700] = 1
    dot = np.zeros((1500, 2000), dtype=np.uint8)
    dot[701:704, 1001:1004] = 1
    for mask in (stroke, dot):
        result = pipe(_image(60, 80, seed=34), support_image=support, support_mask=mask, output_type="numpy")
        assert result["mask"].shape == (60, 80)


def test_a_40000_by_100_query_is_segmented(pipe):
    """Kind 5: post-processing a 40000x100 query no longer tries to build a 40000 x 40000 logit square."""
    query = np.full((40000, 100, 3), 128, dtype=np.uint8)
    result = pipe(
        query, support_image=_image(40, 40, seed=35), support_mask=_mask(40, 40, (5, 5, 25, 30)), return_maps=True
    )
    assert result["mask"].size == (100, 40000) and result["scores"].shape == (40000, 100)
    assert all(value.shape == (40000, 100) for value in result["maps"].values())


def test_a_support_set_without_images_is_named_as_such(pipe):
    # An empty (images, masks) pair used to be taken for boxes: "must be a box ..., got []".
    with pytest.raises(ValueError, match=r"`supports\['x'\] image` is empty"):
        pipe(_image(20, 20, 0), supports={"x": ([], [])})


def test_a_two_pass_model_matches_model_and_processor_and_returns_both_of_its_maps():
    """SMCP segments the query twice (pseudo-prototype fusion); the pipeline returns the fused result and its maps."""
    torch.manual_seed(0)
    model = hf_fss.SMCPModel(
        hf_fss.SMCPConfig(backbone_kwargs={"base_width": 4}, reduce_dim=16, bottleneck_dim=8, image_size=SIZE)
    ).eval()
    smcp_pipe = pipeline("few-shot-segmentation", model=model, image_processor=FewShotSegmentationImageProcessor(SIZE))
    query, support = _image(90, 130, seed=30), _image(60, 50, seed=31)
    mask = _mask(60, 50, (5, 10, 30, 40))
    result = smcp_pipe(query, support_image=support, support_mask=mask, return_maps=True, output_type="numpy")
    expected = _direct_masks(model, smcp_pipe.image_processor, query, [support], [mask])
    np.testing.assert_array_equal(result["mask"], expected)
    assert set(result["maps"]) == set(model.output_maps) == {"first_pass", "pseudo_mask"}
    assert all(value.shape == (90, 130) for value in result["maps"].values())


# ----------------------------------------------------------------------------------------- support predictions


def test_support_predictions_of_crcnet_are_at_each_support_size_and_match_the_model(one_thread):
    """CRCNet segments each support back from the query (`support_logits`): the pipeline returns them resized to
    each support's own size like the query's logits, thresholded, with the IoU against the given mask."""
    torch.manual_seed(0)
    tiny = {"reduce_dim": 16, "cross_reference_reduction": 4, "refinement_steps": 2, "shot_fusion": "average"}
    model = hf_fss.CRCNetModel(hf_fss.CRCNetConfig(backbone_kwargs=dict(TINY_RESNET), image_size=SIZE, **tiny))
    crcnet_pipe = pipeline("few-shot-segmentation", model=model.eval())
    query, supports = _image(50, 70, seed=40), [_image(90, 70, seed=41), _image(40, 52, seed=42)]  # resized, kept
    masks = [_mask(90, 70, (5, 10, 50, 60)), _mask(40, 52, (10, 5, 40, 30))]
    masks[1][0, :] = 255  # an ignored row: left out of the IoU
    result = crcnet_pipe(query, support_image=supports, support_mask=masks, return_support_predictions=True)
    predictions = result["support_predictions"]
    assert len(predictions) == 2 and [p["mask"].size for p in predictions] == [(70, 90), (52, 40)]
    processor = crcnet_pipe.image_processor
    inputs = processor(images=query, support_images=supports, support_masks=masks, return_tensors="pt")
    with torch.no_grad():
        support_logits = model(**inputs).support_logits  # (1, K, 2, S, S)
    for shot_logits, prediction, given in zip(support_logits[0], predictions, masks):
        expected = processor.resize_logits(shot_logits, given.shape).softmax(dim=0)[1].numpy()
        np.testing.assert_allclose(prediction["scores"], expected, atol=1e-5)
        mask = np.asarray(prediction["mask"])
        np.testing.assert_array_equal(mask, (prediction["scores"] > 0.5).astype(np.uint8))
        predicted, target = (mask == 1) & (given != 255), given == 1
        assert prediction["iou"] == pytest.approx((predicted & target).sum() / max((predicted | target).sum(), 1))
    several = crcnet_pipe(
        query, supports={"a": (supports, masks), "b": (supports[1], (0, 0, 20, 20))}, output_type="numpy",
        return_support_predictions=True,
    )  # fmt: skip
    assert [len(shots) for shots in several["support_predictions"]] == [2, 1]
    assert several["support_predictions"][1][0]["mask"].shape == (40, 52)
    assert "support_predictions" not in crcnet_pipe(query, support_image=supports, support_mask=masks)


def test_a_model_without_support_prediction_returns_none(one_thread):
    torch.manual_seed(0)
    tiny = {"reduce_dim": 16, "background_prototype_dim": 16, "pyramid_bins": (6, 3), "image_size": SIZE}
    model = hf_fss.NTRENetModel(hf_fss.NTRENetConfig(backbone_kwargs=dict(TINY_RESNET), **tiny)).eval()
    ntrenet_pipe = pipeline("few-shot-segmentation", model=model)
    support, mask = _image(40, 40, seed=43), _mask(40, 40, (5, 5, 25, 30))
    result = ntrenet_pipe(
        _image(40, 40, seed=44), support_image=support, support_mask=mask, return_support_predictions=True
    )
    assert result["support_predictions"] is None and "mask" in result


def test_support_prediction_iou_counts_the_given_mask_and_leaves_ignored_pixels_out(pipe):
    """IoU of known canvas logits against a given mask: 40x52 supports are not resized, so the canvas is cropped."""
    given = _mask(40, 52, (0, 0, 20, 20))  # 400 target pixels
    given[30:, :] = 255
    predicted = np.zeros((SIZE, SIZE), dtype=np.float32)
    predicted[0:20, 10:30] = 1  # 200 of them hit, 200 more predicted
    predicted[30:40, :] = 1  # predicted on ignored pixels: not counted
    logits = torch.from_numpy(np.stack([-predicted, predicted]) * 10)[None]  # (K=1, 2, S, S)
    (shots,) = pipe._support_predictions([logits], [[given]], threshold=0.5, output_type="numpy")
    assert shots[0]["iou"] == pytest.approx(200 / 600)
    assert shots[0]["mask"].shape == (40, 52) and int(shots[0]["mask"].sum()) == 400 + 10 * 52


# Issue 22, kind 8: a broken preprocessor_config.json is an error naming it, never replaced by defaults.


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"image_size": 0}, "`image_size` must be a positive int, got 0"),
        ({"image_mean": [0.1, 0.2]}, "`image_mean` and `image_std` need 3 values"),
        ({"image_std": [0, 1, 1]}, "positive std"),
        ({"resample": 99}, "`resample` must be a PILImageResampling value, got 99"),
        ({"image_processor_type": "ViTImageProcessor"}, "names image_processor_type 'ViTImageProcessor'"),
        # issue 22, round two, D: hand edits that were accepted silently or blamed the user's images later
        ({"image_mean": [float("nan"), 0.4, 0.4]}, r"`image_mean` must hold values in \[0, 1\] .* got \[nan, "),
        ({"image_mean": [124, 116, 104]}, r"`image_mean` must hold values in \[0, 1\] .*divide 0-255 values by 255"),
        ({"image_std": [58, 57, 57]}, r"`image_std` must hold values in \[0, 1\]"),
        ({"image_mean": None}, "`image_mean` is null; give its value, or remove the field"),
        ({"image_std": None}, "`image_std` is null"),
        ({"do_normalize": "yes"}, "`do_normalize` must be true or false, got 'yes'"),
        ({"pad_with_mean": "false"}, "`pad_with_mean` must be true or false, got 'false'"),
        ({"image_mea": [0.5, 0.5, 0.5]}, r"unknown setting\(s\) \['image_mea'\]; the settings are"),
    ],
)
def test_a_broken_preprocessor_config_is_refused_by_the_pipeline_and_evaluate_alike(tmp_path, model, changes, message):
    import json

    from hf_fss.evaluation.runner import _load_model_and_processor

    model.save_pretrained(tmp_path)
    FewShotSegmentationImageProcessor(image_size=SIZE).save_pretrained(tmp_path)
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    for load in (
        lambda: pipeline("few-shot-segmentation", model=str(tmp_path)),
        lambda: _load_model_and_processor(str(tmp_path)),
    ):
        with pytest.raises(ValueError, match=message) as error:
            load()
        assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_without_a_preprocessor_config_the_model_image_size_is_used(tmp_path, model):
    model.save_pretrained(tmp_path)
    assert pipeline("few-shot-segmentation", model=str(tmp_path)).image_processor.image_size == SIZE
    with pytest.raises(ValueError, match="image_processor must be a FewShotSegmentationImageProcessor"):
        FewShotSegmentationPipeline(model, image_processor=object())


@pytest.mark.parametrize("dtype", [torch.bfloat16, "float16"])
def test_a_dtype_the_model_instance_does_not_run_in_is_refused(model, dtype):
    # transformers applies `dtype` only when it loads the model: for an instance it would be silently ignored
    with pytest.raises(
        ValueError, match=r"^`dtype` is torch\.(bfloat|float)16 but the model runs in torch\.float32: "
    ):
        pipeline("few-shot-segmentation", model=model, dtype=dtype)
    with pytest.raises(ValueError, match="`dtype` must be 'auto' or a floating-point dtype"):
        pipeline("few-shot-segmentation", model=model, dtype=torch.int8)
    assert model.dtype == torch.float32  # the instance is left as it was
    half = CosinePriorModel(model.config).to(torch.bfloat16).eval()
    assert pipeline("few-shot-segmentation", model=half, dtype=torch.bfloat16).model is half


@pytest.mark.parametrize("argument", ["dtype", "torch_dtype"])
def test_a_misspelt_dtype_name_is_one_line_naming_the_argument(model, tmp_path, argument):
    # transformers falls back to float32 when loading a folder in an unknown dtype; the pipeline then refuses it
    model.save_pretrained(tmp_path)
    for source in (model, str(tmp_path)):
        with pytest.raises(ValueError) as error:
            pipeline("few-shot-segmentation", model=source, **{argument: "bf16"})
        message = str(error.value)
        assert message.startswith("`dtype` must be 'auto' or a floating-point dtype") and "\n" not in message
        assert "its name ('bfloat16', 'float16', 'float32'), got 'bf16'" in message
    assert pipeline("few-shot-segmentation", model=str(tmp_path), dtype="bfloat16").model.dtype == torch.bfloat16


@pytest.fixture(scope="module")
def smcp_folder(tmp_path_factory):
    """A tiny SMCP model saved with its processor: its dilated VGG-16 takes images of at least 8x8."""
    folder = tmp_path_factory.mktemp("smcp")
    torch.manual_seed(0)
    config = hf_fss.SMCPConfig(backbone_kwargs={"base_width": 4}, reduce_dim=8, bottleneck_dim=4, num_base_classes=3)
    hf_fss.SMCPModel(config).save_pretrained(folder)
    FewShotSegmentationImageProcessor(image_size=SIZE).save_pretrained(folder)
    return folder


def test_a_processor_image_size_below_the_model_smallest_input_is_refused_naming_it(tmp_path, smcp_folder):
    import json
    import shutil

    from hf_fss.evaluation.runner import _load_model_and_processor

    folder = tmp_path / "smcp"
    shutil.copytree(smcp_folder, folder)
    path = folder / "preprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "image_size": 4, "size_divisor": 4}))
    for load in (
        lambda: pipeline("few-shot-segmentation", model=str(folder)),
        lambda: _load_model_and_processor(str(folder)),
    ):
        with pytest.raises(
            ValueError, match=r"image_size 4 is below 8, the smallest image side the model takes"
        ) as err:
            load()
        assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
    model = hf_fss.SMCPModel.from_pretrained(smcp_folder)
    tiny = FewShotSegmentationImageProcessor(image_size=4, size_divisor=4)
    with pytest.raises(
        ValueError, match=r"^image_processor has image_size 4 but SMCPModel takes images of at least 8x8"
    ):
        pipeline("few-shot-segmentation", model=model, image_processor=tiny)
    # The smallest size itself segments.
    smallest = pipeline("few-shot-segmentation", model=model, image_processor=tiny.with_options(image_size=8))
    result = smallest(_image(20, 30, 0), support_image=_image(20, 30, 1), support_mask=_mask(20, 30, (5, 5, 15, 15)))
    assert result["mask"].size == (30, 20)


@pytest.mark.parametrize("size", [(1, 1), (3, 3), (5, 1), (2000, 1)])  # PIL sizes are (w, h)
def test_a_tiny_pil_query_and_support_are_segmented_at_their_size(pipe, size):
    # Issue 22, round two, C7: a PIL image of 3x3 was refused as a channels-first array
    result = pipe(Image.new("RGB", size), support_image=Image.new("RGB", size), support_mask=Image.new("L", size, 255))
    assert result["mask"].size == size and result["scores"].shape == (size[1], size[0])


def test_a_bfloat16_tensor_query_and_support_work_like_float32_ones(pipe):
    # Issue 22, round two, C8: numpy has no bfloat16; the decoder reads it as float32
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 40, 50)) / 256).float()
    mask = torch.zeros(40, 50)
    mask[5:30, 10:40] = 1
    reference = pipe(image, support_image=image, support_mask=mask, output_type="numpy")
    half = pipe(image.bfloat16(), support_image=image.bfloat16(), support_mask=mask.bfloat16(), output_type="numpy")
    np.testing.assert_array_equal(half["mask"], reference["mask"])
    np.testing.assert_array_equal(half["scores"], reference["scores"])


def test_a_config_json_dtype_that_is_not_floating_point_is_refused_by_the_pipeline_as_by_auto_model(tmp_path, model):
    # Issue 22, round two, D: AutoModel refused "int8", the pipeline silently ran float32
    import json

    from transformers import AutoModel

    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "dtype": "int8"}))
    for load in (
        lambda: pipeline("few-shot-segmentation", model=str(tmp_path)),
        lambda: AutoModel.from_pretrained(tmp_path),
    ):
        with pytest.raises(ValueError, match=r"dtype must be a floating-point torch dtype .* got 'int8'") as error:
            load()
        assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)
