import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from hf_fss.image_processing_fss import FewShotSegmentationImageProcessor

S = 473


@pytest.fixture
def processor():
    return FewShotSegmentationImageProcessor()


def _rng():
    return np.random.default_rng(0)


def _ellipse(height, width, cy, cx, ry, rx):
    yy, xx = np.mgrid[:height, :width]
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)


def _logits_from_mask(mask):
    """Two-channel logits whose argmax is the target (1) wherever mask == 1, background elsewhere (ignore too)."""
    target = (mask == 1).float()
    return torch.stack([1 - target, target], dim=-3)


# ------------------------------------------------------------------------------------------------------- geometry


def test_resized_size_follows_pfenet(processor):
    # 500 -> 473 (ratio 0.946), 375 * 0.946 = 354.75 -> 354 -> floored to 352; 473 -> 472.
    assert processor.resized_size(375, 500) == (352, 472)
    assert processor.resized_size(500, 375) == (472, 352)
    assert processor.resized_size(300, 500) == (280, 472)
    # Not larger than the canvas: kept as is, no flooring.
    assert processor.resized_size(100, 120) == (100, 120)
    assert processor.resized_size(473, 301) == (473, 301)
    upscaling = FewShotSegmentationImageProcessor(upscale_small_images=True)
    assert upscaling.resized_size(100, 120) == (392, 472)
    assert upscaling.resized_size(473, 301) == (473, 301)


def test_rgba_query_and_grayscale_support(processor):
    rng = _rng()
    query = rng.integers(0, 256, (300, 500, 4), dtype=np.uint8)
    support = rng.integers(0, 256, (200, 320), dtype=np.uint8)
    mask = np.zeros((200, 320), dtype=np.uint8)
    mask[40:120, 60:250] = 255  # white = target
    inputs = processor(
        images=Image.fromarray(query, mode="RGBA"),
        support_images=[Image.fromarray(support, mode="L")],
        support_masks=[mask],
        return_tensors="pt",
    )
    assert inputs["pixel_values"].shape == (1, 3, S, S)
    assert inputs["support_pixel_values"].shape == (1, 1, 3, S, S)
    assert inputs["support_masks"].shape == (1, 1, S, S)
    assert inputs["pixel_values"].dtype == torch.float32
    assert inputs["support_masks"].dtype == torch.int64
    assert "labels" not in inputs

    # Query 300x500 is resized to 280x472; the grayscale support keeps its 200x320 size. The padding is black
    # before normalisation, as in PFENet's test_Resize.
    black = (-torch.tensor([0.485, 0.456, 0.406]) / torch.tensor([0.229, 0.224, 0.225])).view(3, 1, 1)
    pixels = inputs["pixel_values"][0]
    assert torch.allclose(pixels[:, 280:, :], black.expand(3, S - 280, S))
    assert torch.allclose(pixels[:, :, 472:], black.expand(3, S, S - 472))
    assert pixels[:, :280, :472].abs().sum() > 0
    support_pixels = inputs["support_pixel_values"][0, 0]
    assert torch.allclose(support_pixels[:, 200:, :], black.expand(3, S - 200, S))
    # Grayscale becomes three equal channels before normalisation.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    raw = (support_pixels[:, :200, :320] * std + mean) * 255
    assert torch.allclose(raw, torch.from_numpy(support).float().expand(3, -1, -1), atol=1e-3)

    support_masks = inputs["support_masks"][0, 0]
    assert set(support_masks.unique().tolist()) == {0, 1, 255}
    assert (support_masks[200:, :] == 255).all() and (support_masks[:, 320:] == 255).all()
    assert torch.equal(support_masks[:200, :320], torch.from_numpy(mask // 255).long())

    # RGBA: transparent pixels are composited onto white (policy shared with the pipeline and the Space), for a
    # PIL image and an array alike; a fully opaque RGBA image equals its RGB channels.
    alpha = query[..., 3:].astype(np.float32) / 255
    composited = query[..., :3].astype(np.float32) * alpha + 255 * (1 - alpha)
    expected = processor(images=composited, return_tensors="pt")["pixel_values"]
    assert torch.allclose(expected, inputs["pixel_values"], atol=1e-5)
    assert torch.equal(processor(images=query, return_tensors="pt")["pixel_values"], inputs["pixel_values"])
    opaque = query.copy()
    opaque[..., 3] = 255
    rgb_only = processor(images=query[..., :3], return_tensors="pt")["pixel_values"]
    assert torch.equal(
        processor(images=Image.fromarray(opaque, mode="RGBA"), return_tensors="pt")["pixel_values"], rgb_only
    )


def test_pixels_match_reference_normalisation(processor):
    rng = _rng()
    image = rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)
    pixels = processor(images=image, return_tensors="np")["pixel_values"][0]
    expected = (image.astype(np.float32) / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(pixels[:, :100, :120], expected.transpose(2, 0, 1), atol=1e-5)
    # Float input in [0, 1] gives the same result as uint8.
    as_float = processor(images=image.astype(np.float32) / 255, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(as_float, pixels, atol=1e-4)
    # PFENet pads with black before normalisation (the default); `pad_with_mean=True` makes the padding 0.
    np.testing.assert_allclose(pixels[0, 200, 200], -0.485 / 0.229, rtol=1e-5)
    mean_padded = FewShotSegmentationImageProcessor(pad_with_mean=True)(images=image, return_tensors="np")
    np.testing.assert_allclose(mean_padded["pixel_values"][0, :, 200, 200], 0, atol=1e-6)


# -------------------------------------------------------------------------------------------------- annotations


def test_box_annotation(processor):
    image = np.zeros((100, 120, 3), dtype=np.uint8)
    box = (10, 20, 50, 60)  # x0, y0, x1, y1
    expected = np.zeros((100, 120), dtype=np.uint8)
    expected[20:60, 10:50] = 1
    np.testing.assert_array_equal(processor.annotation_to_mask(box, (100, 120)), expected)

    inputs = processor(images=image, support_images=[image], support_masks=[box], return_tensors="pt")
    support_masks = inputs["support_masks"][0, 0]
    assert torch.equal(support_masks[:100, :120], torch.from_numpy(expected).long())
    assert (support_masks[100:] == 255).all() and (support_masks[:, 120:] == 255).all()


def test_palette_label_map_with_class_ids(processor, tmp_path):
    rng = _rng()
    label = rng.integers(0, 4, (90, 110), dtype=np.uint8)
    label[:5] = 255
    # Index 1 is white and index 2 almost black: luminance order differs from index order.
    colours = {0: (0, 0, 0), 1: (255, 255, 255), 2: (10, 0, 0), 3: (0, 128, 0), 255: (224, 224, 192)}
    palette = [0] * 768
    for index, colour in colours.items():
        palette[3 * index : 3 * index + 3] = colour
    image = Image.fromarray(label, mode="P")
    image.putpalette(palette)
    path = tmp_path / "label.png"
    image.save(path)
    assert not np.array_equal(np.array(Image.open(path).convert("L")), label)

    support = rng.integers(0, 256, (90, 110, 3), dtype=np.uint8)
    inputs = processor(
        images=support, support_images=[support], support_masks=[path], support_class_ids=[2], return_tensors="pt"
    )
    expected = np.where(label == 255, 255, (label == 2).astype(np.int64))
    assert torch.equal(inputs["support_masks"][0, 0, :90, :110], torch.from_numpy(expected))

    # Query labels from the same label map, as a string path, with `class_ids`.
    labelled = processor(images=support, segmentation_maps=str(path), class_ids=3, return_tensors="pt")
    expected = np.where(label == 255, 255, (label == 3).astype(np.int64))
    assert torch.equal(labelled["labels"][0, :90, :110], torch.from_numpy(expected))
    assert (labelled["labels"][0, 90:] == 255).all()


def test_other_mask_formats(processor):
    target = _ellipse(40, 50, 20, 25, 10, 15)
    with_ignore = target.copy()
    with_ignore[:3] = 255
    rgb_drawing = np.zeros((40, 50, 3), dtype=np.uint8)
    rgb_drawing[target == 1] = (200, 30, 0)
    rgba_drawing = np.full((40, 50, 4), 255, dtype=np.uint8)
    rgba_drawing[..., 3] = target * 128
    annotations = [target.astype(bool), target, Image.fromarray(target * 255), with_ignore, rgb_drawing, rgba_drawing]
    expected = [target, target, target, with_ignore, target, target]
    masks = [processor.annotation_to_mask(a, (40, 50)) for a in annotations]
    for mask, wanted in zip(masks, expected):
        np.testing.assert_array_equal(mask, wanted)


def test_grayscale_masks_are_thresholded_and_label_maps_need_a_class_id(processor, tmp_path):
    target = _ellipse(40, 50, 20, 25, 10, 15)
    # An anti-aliased grayscale mask (values between 0 and 255): white = target, thresholded at 128.
    soft = (target * 200 + 20).astype(np.uint8)
    soft[0, :5] = (100, 127, 128, 129, 250)
    expected = target.copy()
    expected[0, :5] = (0, 0, 1, 1, 1)
    np.testing.assert_array_equal(processor.annotation_to_mask(soft, (40, 50)), expected)
    path = tmp_path / "soft.jpg"
    Image.fromarray((target * 255).astype(np.uint8)).save(path, quality=60)  # JPEG noise around 0 and 255
    assert len(np.unique(np.asarray(Image.open(path)))) > 3
    from_jpeg = processor.annotation_to_mask(path, (40, 50))
    assert (from_jpeg == target).mean() > 0.97 and set(np.unique(from_jpeg)) <= {0, 1}
    # RGB and grayscale + alpha (constant alpha) versions of the same mask, and a soft float mask.
    rgb = np.repeat(soft[..., None], 3, axis=-1)
    np.testing.assert_array_equal(processor.annotation_to_mask(Image.fromarray(rgb), (40, 50)), expected)
    la = Image.fromarray(np.dstack([soft, np.full_like(soft, 255)]), mode="LA")
    np.testing.assert_array_equal(processor.annotation_to_mask(la, (40, 50)), expected)
    np.testing.assert_array_equal(processor.annotation_to_mask(soft / 255.0, (40, 50)), expected)
    # Small integer values (and 255) are a label map: an error asking for the class id, not a threshold.
    label_map = target * 7
    label_map[:2] = 255
    with pytest.raises(ValueError, match=r"label map.*support_class_ids"):
        processor.annotation_to_mask(label_map, (40, 50))


def test_16_bit_images_are_scaled_by_their_range_in_every_form(processor, tmp_path):
    # Issue 10, kind 3a: a 16-bit PNG (mode "I;16") was clipped to white as a PIL image and refused as a path /
    # uint16 array. One rule now: unsigned integers are scaled by their type's range (65535 = white).
    deep = (np.arange(20 * 30, dtype=np.uint32).reshape(20, 30) * 109).astype(np.uint16)  # 0 .. 65291
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    expected = processor(images=(deep / 65535.0).astype(np.float32), return_tensors="np")["pixel_values"]
    forms = {
        "path": tmp_path / "deep.png",
        "PIL": Image.open(tmp_path / "deep.png"),
        "uint16 array": deep,
        "uint16 RGB array": np.repeat(deep[..., None], 3, axis=-1),
        "uint16 tensor": torch.from_numpy(deep.astype(np.int32)).to(torch.uint16),
    }
    for form, image in forms.items():
        pixels = processor(images=image, return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(pixels, expected, atol=1e-4, err_msg=form)
    # Not clipped: the 8-bit view of the same image (the high byte) is what the 16-bit one looks like.
    rgb = processor.to_rgb_array(tmp_path / "deep.png", "images")
    assert (rgb >= 254.5).mean() < 0.01
    np.testing.assert_allclose(rgb[..., 0], deep / 257.0, atol=1e-3)
    # A 16-bit support with a 16-bit mask {0, 65535} (and a grayscale one, thresholded at half its range).
    mask16 = np.zeros((20, 30), dtype=np.uint16)
    mask16[5:15, 10:20] = 65535
    Image.fromarray(mask16).save(tmp_path / "mask16.png")
    batch = processor(images=deep, support_images=[tmp_path / "deep.png"], support_masks=[tmp_path / "mask16.png"])
    assert (batch["support_masks"][0, 0, :20, :30] == (mask16 > 0)).all()
    soft16 = mask16 // 2 + (mask16 > 0) * 10000  # 0 outside, 42767 inside: target at >= 32768
    np.testing.assert_array_equal(processor.annotation_to_mask(soft16, (20, 30)), (mask16 > 0).astype(np.uint8))
    # Signed integers have no range to scale by: refused clearly, saying how to pass a 16-bit image.
    with pytest.raises(
        ValueError,
        match=r"`images`: a signed integer \(int32\) image must lie in \[0, 255\], got \[0, 65291\]; pass a 16-bit image as uint16",
    ):
        processor(images=deep.astype(np.int32))
    with pytest.raises(ValueError, match=r"`images`: a signed integer \(int32\) image"):
        processor(images=Image.open(tmp_path / "deep.png").convert("I"))


def _exif_jpeg(path, pixels, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, quality=95, exif=exif)


def test_exif_orientation_is_applied_to_paths_and_pil_images_alike(processor, tmp_path):
    # Issue 10, kind 3b: a square EXIF-rotated JPEG and its mask (drawn on the photo as displayed). Opened with
    # Image.open, the photo used to stay sideways: 0% of the mask's target on the object.
    size = 64
    upright = np.full((size, size, 3), 20, dtype=np.uint8)
    upright[4:20, 36:60] = (230, 40, 40)  # the object, top right as displayed
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[4:20, 36:60] = 255
    # Orientation 6 = "rotate 90 degrees clockwise to display": the file stores the picture turned back.
    _exif_jpeg(tmp_path / "photo.jpg", np.rot90(upright, k=1).copy(), orientation=6)
    Image.fromarray(mask).save(tmp_path / "mask.png")
    raw = np.asarray(Image.open(tmp_path / "photo.jpg"))
    assert (raw[4:20, 36:60, 0] > 150).mean() < 0.05  # as stored, the object is elsewhere
    for form in ("path", "PIL"):
        photo = tmp_path / "photo.jpg" if form == "path" else Image.open(tmp_path / "photo.jpg")
        mask_input = tmp_path / "mask.png" if form == "path" else Image.open(tmp_path / "mask.png")
        batch = processor(images=photo, support_images=[photo], support_masks=[mask_input], do_normalize=False)
        pixels = batch["support_pixel_values"][0, 0, :, :size, :size] * 255
        target = batch["support_masks"][0, 0, :size, :size] == 1
        on_object = pixels[0][target] > 150
        assert on_object.mean() > 0.95, form
        query = batch["pixel_values"][0, :, :size, :size] * 255
        assert np.abs(query - upright.transpose(2, 0, 1)).mean() < 4, form  # upright, up to JPEG noise
    # An EXIF-rotated mask (a JPEG mask saved by a phone app) is turned upright too, as a path and as a PIL image.
    _exif_jpeg(tmp_path / "mask.jpg", np.repeat(np.rot90(mask, k=1)[..., None], 3, axis=-1).copy(), orientation=6)
    for mask_input in (tmp_path / "mask.jpg", Image.open(tmp_path / "mask.jpg")):
        np.testing.assert_array_equal(
            processor.annotation_to_mask(mask_input, (size, size)), (mask > 0).astype(np.uint8)
        )
    # Arrays carry no EXIF: taken as they are.
    np.testing.assert_array_equal(processor.to_rgb_array(raw, "images"), raw.astype(np.float32))


def test_per_call_options(processor):
    image = _rng().integers(0, 256, (100, 120, 3), dtype=np.uint8)
    small = processor(images=image, image_size=64, return_tensors="pt")
    assert small["pixel_values"].shape == (1, 3, 64, 64)
    assert torch.equal(
        small["pixel_values"],
        FewShotSegmentationImageProcessor(image_size=64)(images=image, return_tensors="pt")["pixel_values"],
    )
    padded = processor(images=image, pad_with_mean=True, do_normalize=True, size_divisor=None, return_tensors="np")
    np.testing.assert_allclose(padded["pixel_values"][0, :, 200, 200], 0, atol=1e-6)
    upscaled = processor(
        images=image, support_images=[image], support_masks=[(0, 0, 10, 10)], upscale_small_images=True
    )
    assert (upscaled["support_masks"][0, 0, :392, :472] != 255).all()
    assert processor.image_size == S and not processor.pad_with_mean  # the processor itself is unchanged
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        processor(images=image, colour="blue")
    with pytest.raises(ValueError, match="image_size"):
        processor(images=image, image_size=0)


def test_one_imagenet_normalisation():
    from hf_fss.data import augmentation
    from hf_fss.image_processing_fss import IMAGENET_MEAN, IMAGENET_STD

    assert augmentation.IMAGENET_MEAN is IMAGENET_MEAN and augmentation.IMAGENET_STD is IMAGENET_STD
    processor = FewShotSegmentationImageProcessor()
    assert tuple(processor.image_mean) == IMAGENET_MEAN and tuple(processor.image_std) == IMAGENET_STD


def test_k_shot_batch(processor, tmp_path):
    rng = _rng()
    path = tmp_path / "support.jpg"
    Image.fromarray(rng.integers(0, 256, (500, 375, 3), dtype=np.uint8)).save(path)
    queries = [rng.integers(0, 256, (64, 80, 3), dtype=np.uint8) for _ in range(2)]
    supports = [[rng.integers(0, 256, (60 + k, 70, 3), dtype=np.uint8) for k in range(5)] for _ in range(2)]
    supports[1][4] = path
    masks = [[(5, 5, 30, 30)] * 5 for _ in range(2)]
    masks[1][4] = (100, 100, 200, 300)
    class_ids = [[None] * 5, [None] * 5]
    inputs = processor(
        images=queries, support_images=supports, support_masks=masks, support_class_ids=class_ids, return_tensors="pt"
    )
    assert inputs["pixel_values"].shape == (2, 3, S, S)
    assert inputs["support_pixel_values"].shape == (2, 5, 3, S, S)
    assert inputs["support_masks"].shape == (2, 5, S, S)
    # The 500x375 support file is resized to 472x352.
    assert (inputs["support_masks"][1, 4, 472:] == 255).all() and (
        inputs["support_masks"][1, 4, :472, 352:] == 255
    ).all()
    assert (inputs["support_masks"][1, 4, :472, :352] != 255).all()

    only_images = processor(images=queries, return_tensors="np")
    assert set(only_images) == {"pixel_values"} and only_images["pixel_values"].shape == (2, 3, S, S)


# ---------------------------------------------------------------------------------------------- post-processing


def test_post_process_round_trips(processor):
    rng = _rng()
    query = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    label = _ellipse(300, 500, 150, 260, 90, 170)
    support = rng.integers(0, 256, (200, 320), dtype=np.uint8)
    support_mask = _ellipse(200, 320, 100, 150, 60, 90)
    inputs = processor(
        images=query,
        segmentation_maps=label,
        support_images=support,
        support_masks=support_mask,
        return_tensors="pt",
    )
    assert inputs["labels"].shape == (1, S, S) and inputs["labels"].dtype == torch.int64

    # Query: resized 300x500 -> 280x472 and back with PFENet's L x L protocol: nearest/bilinear round trip,
    # so we require >= 99% pixel agreement rather than exactness.
    logits = _logits_from_mask(inputs["labels"])
    (query_mask,) = processor.post_process_semantic_segmentation(logits, target_sizes=[(300, 500)])
    assert query_mask.shape == (300, 500) and query_mask.dtype == torch.long
    assert set(query_mask.unique().tolist()) <= {0, 1}
    agreement = (query_mask.numpy() == label).mean()
    assert agreement >= 0.99, agreement

    # The same through a model-output-like object and a probability threshold.
    class Output:
        pass

    output = Output()
    output.logits = logits * 10
    (thresholded,) = processor.post_process_semantic_segmentation(output, target_sizes=[(300, 500)], threshold=0.5)
    assert torch.equal(thresholded, query_mask)

    # Support: 200x320 is not resized, so cropping gives the original mask exactly.
    support_logits = _logits_from_mask(inputs["support_masks"])  # (1, 1, 2, S, S)
    (row,) = processor.post_process_semantic_segmentation(support_logits, target_sizes=[[(200, 320)]])
    assert len(row) == 1 and row[0].shape == (200, 320)
    np.testing.assert_array_equal(row[0].numpy(), support_mask)

    # No target sizes: canvas-sized maps.
    (canvas,) = processor.post_process_semantic_segmentation(logits)
    assert canvas.shape == (S, S)

    with pytest.raises(ValueError, match="target_sizes"):
        processor.post_process_semantic_segmentation(logits, target_sizes=[(300, 500), (10, 10)])
    with pytest.raises(ValueError, match="target_sizes"):
        processor.post_process_semantic_segmentation(support_logits, target_sizes=[[(200, 320), (200, 320)]])


def test_post_processing_takes_torchs_argmax_on_ties_nan_and_infinity(processor):
    # The masks come from one comparison rather than torch's slow argmax over the channel dimension (issue 25);
    # they must equal it everywhere: ties go to the background, a NaN counts as the maximum (the first one wins).
    generator = torch.Generator().manual_seed(0)
    logits = torch.randint(-2, 3, (4, 2, S, S), generator=generator).float()
    special = torch.rand(logits.shape, generator=generator)
    logits[special < 0.15] = float("nan")
    logits[special > 0.9] = float("inf")
    logits[0] = logits[0].nan_to_num(0.0, 5.0)  # one map without NaN
    logits[1, 0] = logits[1, 0].nan_to_num(0.0, 5.0)  # NaN targets over finite backgrounds only
    masks = processor.post_process_semantic_segmentation(logits)
    for mask, item in zip(masks, logits):
        assert mask.dtype == torch.long and torch.equal(mask, item.argmax(dim=0))
    three = torch.cat([logits, logits[:, :1] + 1], dim=1)  # more than two channels: torch's argmax itself
    assert all(
        torch.equal(m, i.argmax(dim=0)) for m, i in zip(processor.post_process_semantic_segmentation(three), three)
    )


# ------------------------------------------------------------------------------------------------------- errors


def test_errors_name_the_argument(processor, tmp_path):
    rng = _rng()
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    mask = _ellipse(40, 50, 20, 25, 10, 15)

    with pytest.raises(ValueError, match=r"support_masks.*2 masks.*support_images.*3 images"):
        processor(images=image, support_images=[image] * 3, support_masks=[mask] * 2)
    with pytest.raises(ValueError, match=r"support_masks\[0\]\[1\].*shot 1.*no target"):
        processor(images=image, support_images=[image] * 2, support_masks=[mask, np.zeros_like(mask)])
    with pytest.raises(ValueError, match=r"support_masks.*30x50.*40x50"):
        processor(images=image, support_images=[image], support_masks=[mask[:30]])
    missing = tmp_path / "missing.png"
    with pytest.raises(ValueError, match=r"support_images.*could not read.*missing\.png"):
        processor(images=image, support_images=[missing], support_masks=[mask])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    with pytest.raises(ValueError, match=r"images.*could not read.*notes\.png"):
        processor(images=str(not_an_image))
    with pytest.raises(ValueError, match=r"support_images.*same number.*\[2, 1\]"):
        processor(
            images=[image, image], support_images=[[image, image], [image]], support_masks=[[mask, mask], [mask]]
        )
    label_map = mask * 7
    label_map[:2] = 3
    with pytest.raises(ValueError, match=r"support_masks.*support_class_ids"):
        processor(images=image, support_images=[image], support_masks=[label_map])
    with pytest.raises(ValueError, match=r"support_class_ids"):
        processor(images=image, support_images=[image], support_masks=[label_map], support_class_ids=[1, 2, 3])
    with pytest.raises(ValueError, match=r"support_images.*2 query images"):
        processor(images=[image, image], support_images=[image], support_masks=[mask])
    with pytest.raises(ValueError, match=r"support_masks"):
        processor(images=image, support_images=[image])
    with pytest.raises(ValueError, match=r"images"):
        processor(images=np.zeros((4, 5, 6, 7, 8)))
    with pytest.raises(ValueError, match=r"segmentation_maps.*class_ids"):
        processor(images=image, segmentation_maps=label_map)


# -------------------------------------------------------------------------------------------------- persistence


def test_save_and_load_round_trip(tmp_path):
    processor = FewShotSegmentationImageProcessor(
        image_size=321, size_divisor=16, upscale_small_images=True, do_normalize=False, pad_with_mean=False
    )
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "FewShotSegmentationImageProcessor"
    assert saved["image_size"] == 321 and saved["size_divisor"] == 16

    loaded = FewShotSegmentationImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    for key in ("image_size", "size_divisor", "upscale_small_images", "do_normalize", "pad_with_mean", "resample"):
        assert getattr(loaded, key) == getattr(processor, key), key
    assert loaded.image_mean == processor.image_mean and loaded.image_std == processor.image_std
    assert loaded.resized_size(100, 120) == (256, 320)
    assert FewShotSegmentationImageProcessor.from_pretrained(tmp_path, image_size=473).image_size == 473


# ------------------------------------------------------------------------------- small targets (issue 10, kind 4)


def _nearest(processor, mask):
    """PFENet's nearest-neighbour mask resize (the old behaviour), for comparison."""
    new_height, new_width = processor.resized_size(*mask.shape)
    return cv2.resize(mask.astype(np.float32), (new_width, new_height), interpolation=cv2.INTER_NEAREST)


def test_small_targets_survive_the_mask_downscale():
    quickstart = FewShotSegmentationImageProcessor(image_size=97)  # the quickstart model's canvas
    default = FewShotSegmentationImageProcessor()
    # A 100x40 (w x h) target in a 12000x300 strip; on the quickstart canvas (2 x 96) nearest neighbour reads
    # rows 0 and 150 and every 125th column: the target between them vanished.
    strip = np.zeros((300, 12000), dtype=np.uint8)
    strip[20:60, 6010:6110] = 1
    # A 3x3 object and a 2-px stroke (horizontal, and diagonal) in a 2000x1500 image (w x h) -> 472 x 352.
    dot = np.zeros((1500, 2000), dtype=np.uint8)
    dot[701:704, 1001:1004] = 1
    stroke = np.zeros((1500, 2000), dtype=np.uint8)
    stroke[701:703, 200:1800] = 1
    cases = [(quickstart, strip), (default, dot), (default, stroke)]
    for processor, mask in cases:
        assert not (_nearest(processor, mask) == 1).any()  # what nearest neighbour alone did
        resized = processor.resize_and_pad_mask(mask)
        new_height, new_width = processor.resized_size(*mask.shape)
        height, width = mask.shape
        ys, xs = np.nonzero(mask == 1)
        expected = np.zeros((new_height, new_width), dtype=bool)
        expected[ys * new_height // height, xs * new_width // width] = True  # the output pixels covering it
        np.testing.assert_array_equal(resized[:new_height, :new_width] == 1, expected)
        assert (resized[new_height:] == 255).all() and (resized[:, new_width:] == 255).all()
    # A diagonal 2-px stroke: nearest neighbour keeps it as dashes; they stay as they are (present, PFENet's pixels).
    diagonal = np.zeros((1500, 2000), dtype=np.uint8)
    for i in range(1000):
        diagonal[300 + i, 501 + i : 503 + i] = 1
    np.testing.assert_array_equal(default.resize_and_pad_mask(diagonal)[:352, :472], _nearest(default, diagonal))
    assert (_nearest(default, diagonal) == 1).any()
    # The strip's support is accepted end to end (the model used to raise "no target pixel").
    batch = quickstart(images=np.zeros((300, 12000, 3), np.uint8), support_images=[strip * 200], support_masks=[strip])
    assert (batch["support_masks"][0, 0] == 1).sum() == 1 * 1  # 40 rows -> 1 of 2 rows, 100 columns -> 1 of 96
    # With the default canvas (8 x 472) nearest neighbour keeps it, exactly as before.
    np.testing.assert_array_equal(default.resize_and_pad_mask(strip)[:8, :472], _nearest(default, strip))


def test_ordinary_masks_are_downscaled_exactly_as_pfenet(processor):
    """Every target piece nearest neighbour keeps stays as it was, and ignore pixels too: PFENet's numbers hold."""
    rng = _rng()
    for height, width in [(375, 500), (500, 333), (1200, 1600), (481, 640)]:
        mask = np.zeros((height, width), dtype=np.uint8)
        for _ in range(3):
            cy, cx = rng.integers(50, min(height, width) - 50, 2)
            mask |= _ellipse(height, width, cy, cx, rng.integers(20, 50), rng.integers(20, 50))
        mask[:5] = 255
        new_height, new_width = processor.resized_size(height, width)
        np.testing.assert_array_equal(
            processor.resize_and_pad_mask(mask)[:new_height, :new_width], _nearest(processor, mask)
        )
    # A big object and a speck: the object exactly as nearest neighbour gives it, the speck kept at its place.
    mask = _ellipse(1500, 2000, 600, 800, 300, 400)
    mask[1400, 1900] = 1
    resized = processor.resize_and_pad_mask(mask)[:352, :472]
    near = _nearest(processor, mask)
    assert near[1400 * 352 // 1500, 1900 * 472 // 2000] == 0 and resized[1400 * 352 // 1500, 1900 * 472 // 2000] == 1
    near[1400 * 352 // 1500, 1900 * 472 // 2000] = 1
    np.testing.assert_array_equal(resized, near)


# ----------------------------------------------------------------------- post-processing memory (issue 10, kind 5)


class _LargestTensor(TorchDispatchMode):
    """Records the number of elements of the largest tensor any torch operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in torch.utils._pytree.tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def _old_resize_logits(logits, height, width):
    """PFENet's `ori_resize` path: logits to L x L, then crop (the pre-issue-10 implementation)."""
    longer = max(height, width)
    return F.interpolate(logits, size=(longer, longer), mode="bilinear", align_corners=True)[..., :height, :width]


def test_post_processing_memory_grows_with_the_image_not_the_square(processor):
    torch.manual_seed(0)
    logits = torch.randn(1, 2, S, S) * 5
    for height, width in [(40000, 100), (100, 40000), (12000, 300)]:
        with _LargestTensor() as spy:
            masks = processor.post_process_semantic_segmentation(logits, target_sizes=[(height, width)])
        assert masks[0].shape == (height, width)
        # Never the L x L square (1.6e9 values for 40000 x 100): at most the output's 2 channels.
        assert spy.largest <= 2 * height * width, (height, width, spy.largest)
    # 40000 x 100 by hand: the corner equals the square's, sampled at 472/39999 per pixel along both axes.
    tall = processor.resize_logits(logits[0], (40000, 100))
    scale = np.float32(472) / np.float32(39999)
    for y, x in [(0, 0), (39998, 98), (12345, 50), (20000, 7)]:
        sy, sx = y * scale, x * scale
        y0, x0 = int(sy), int(sx)
        wy, wx = sy - y0, sx - x0
        grid = logits[0, :, y0 : y0 + 2, x0 : x0 + 2].double()
        value = (1 - wy) * ((1 - wx) * grid[:, 0, 0] + wx * grid[:, 0, 1]) + wy * (
            (1 - wx) * grid[:, 1, 0] + wx * grid[:, 1, 1]
        )
        torch.testing.assert_close(tall[:, y, x].double(), value, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "size",
    [(375, 500), (500, 375), (481, 640), (1000, 1000), (1200, 300), (300, 1201), (2000, 120), (60, 3000), (474, 10)],
)
def test_post_processing_matches_the_l_by_l_path(processor, size):
    """Aspect ratios up to 4:1 take PFENet's own L x L path (bit-exact); longer strips the corner-only path, equal
    up to float32 rounding, with the same masks."""
    height, width = size
    torch.manual_seed(height * 7 + width)
    logits = torch.randn(3, 2, S, S) * 5
    new = processor.resize_logits(logits, size)
    old = _old_resize_logits(logits, height, width)
    if max(size) ** 2 <= 4 * height * width:
        assert torch.equal(new, old)
    else:
        assert (new - old).abs().max() < 1e-5  # measured: at most 3.9e-6 on logits of magnitude ~20
    masks = processor.post_process_semantic_segmentation(logits, target_sizes=[size] * 3)
    for mask, reference in zip(masks, old.argmax(dim=1)):
        assert torch.equal(mask, reference)


# Issue 22, kind 6: inputs misread or refused deep inside.


@pytest.mark.parametrize("shape", [(3, 40, 3), (3, 40, 4), (1, 40, 2), (4, 30, 1)])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_a_shape_that_reads_as_chw_and_hwc_alike_is_refused_saying_how_to_pass_it(processor, shape, kind):
    image = np.zeros(shape, dtype=np.uint8) if kind == "numpy" else torch.zeros(shape)
    with pytest.raises(ValueError, match=r"`images` has shape .*channels-first .* alike; pass it as a PIL image"):
        processor(images=image)
    # The unambiguous forms of the same pixels are read as such.
    rgb = np.random.default_rng(0).integers(0, 256, (40, 5, 3), dtype=np.uint8)
    channels_first = processor(images=np.ascontiguousarray(rgb.transpose(2, 0, 1)))["pixel_values"]
    np.testing.assert_array_equal(channels_first, processor(images=Image.fromarray(rgb))["pixel_values"])


def test_stacked_masks_for_one_support_are_refused_not_read_as_a_colour_mask(processor):
    image = np.zeros((40, 50, 3), dtype=np.uint8)
    masks = np.stack([_ellipse(40, 50, 20, 25, r, r) for r in (5, 10, 15)])
    for stacked in (masks, torch.from_numpy(masks)):
        with pytest.raises(
            ValueError, match=r"has shape \(3, 40, 50\): one annotation per support image .* list of 3"
        ):
            processor(images=image, support_images=[image], support_masks=[stacked])
    batch = processor(images=image, support_images=[image] * 3, support_masks=list(masks))
    np.testing.assert_array_equal(batch["support_masks"][0, :, :40, :50], masks)


def test_minus_one_marks_ignore_like_255(processor, tmp_path):
    target = _ellipse(40, 50, 20, 25, 10, 15).astype(np.int64)
    target[:4] = -1
    expected = np.where(target == -1, 255, target)
    for annotation in (target, torch.from_numpy(target), target.astype(np.int8)):
        np.testing.assert_array_equal(processor.annotation_to_mask(annotation, (40, 50)), expected)
    label_map = np.where(target == 1, 7, target)
    np.testing.assert_array_equal(processor.annotation_to_mask(label_map, (40, 50), class_id=7), expected)
    with pytest.raises(ValueError, match=r"negative values \[-100\] .*255 or -1 \(ignore\)"):
        processor.annotation_to_mask(np.where(target == -1, -100, target), (40, 50))


def test_a_faint_antialiased_mask_is_thresholded_at_half_its_maximum_not_called_a_label_map(processor, tmp_path):
    # A one-pixel stroke drawn at 8x and downscaled with bilinear: values 0 .. ~31, all on edges.
    big = np.zeros((320, 400), dtype=np.uint8)
    big[np.arange(300) + 10, np.arange(300) + 40] = 255
    faint = Image.fromarray(big).resize((50, 40), Image.BILINEAR)
    faint.save(tmp_path / "faint.png")
    values = np.asarray(faint)
    assert 8 < values.max() < 128 and len(np.unique(values)) > 3
    image = np.zeros((40, 50, 3), dtype=np.uint8)
    batch = processor(images=image, support_images=[image], support_masks=[tmp_path / "faint.png"])
    np.testing.assert_array_equal(batch["support_masks"][0, 0, :40, :50], values >= values.max() / 2)
    # A label map whose classes are regions stays a label map needing a class id.
    label_map = _ellipse(40, 50, 20, 25, 10, 15) * 3 + _ellipse(40, 50, 5, 5, 4, 4) * 7
    with pytest.raises(ValueError, match=r"label map.*support_class_ids"):
        processor(images=image, support_images=[image], support_masks=[label_map])


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "P", "LA", "CMYK", "1", "RGBA"])
def test_pil_images_of_every_mode_are_read_as_their_rgb_view(processor, tmp_path, mode):
    rgb = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    gray = Image.fromarray(rgb).convert("L")
    image = {
        "I;16": Image.fromarray(np.asarray(gray).astype(np.uint16) * 257),
        "I": gray.convert("I"),
        "F": gray.convert("F"),
        "1": gray.convert("1"),
    }.get(mode) or Image.fromarray(rgb).convert(mode)
    expected = {"I;16": gray, "I": gray, "F": gray, "1": gray.convert("1").convert("L"), "LA": gray}.get(mode)
    expected = expected or image.convert("RGB")
    got = processor.to_rgb_array(image, "images")
    np.testing.assert_allclose(got, np.asarray(expected.convert("RGB"), dtype=np.float32), atol=1e-3)


def test_lists_of_mixed_kinds_read_each_item_alike(processor, tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    mask = _ellipse(40, 50, 20, 25, 10, 15)
    Image.fromarray(rgb).save(tmp_path / "image.png")
    Image.fromarray(mask * 255).save(tmp_path / "mask.png")
    images = [rgb, Image.fromarray(rgb), torch.from_numpy(rgb), tmp_path / "image.png", rgb / 255.0]
    annotations = [
        mask,
        Image.fromarray(mask * 255),
        torch.from_numpy(mask).bool(),
        tmp_path / "mask.png",
        mask * 255.0,
    ]
    batch = processor(images=images, support_images=[[i] for i in images], support_masks=[[a] for a in annotations])
    for key in ("pixel_values", "support_pixel_values", "support_masks"):
        for item in batch[key][1:]:
            np.testing.assert_allclose(item, batch[key][0], atol=1e-5, err_msg=key)


@pytest.mark.parametrize("shape", [(0, 50, 3), (40, 0), (3, 0, 50)])
def test_an_image_with_a_zero_size_side_is_refused_naming_it(processor, shape):
    with pytest.raises(ValueError, match=r"`images` is empty: shape"):
        processor(images=np.zeros(shape, dtype=np.uint8))


def test_the_decoders_name_the_argument_they_are_given_and_the_old_import_path_still_serves():
    """Issue 23: decoding lives in hf_fss.annotations, the geometry on arrays in hf_fss.image_geometry; the caller
    names the argument (the pipeline passes `support_mask[1]`), and image_processing_fss re-exports what it held."""
    from hf_fss import annotations, image_geometry
    from hf_fss.image_processing_fss import IGNORE_INDEX, MASK_THRESHOLD, SQUARE_TO_OUTPUT_LIMIT

    assert (IGNORE_INDEX, MASK_THRESHOLD, SQUARE_TO_OUTPUT_LIMIT) == (255, 128, 4)
    assert FewShotSegmentationImageProcessor.to_rgb_array is annotations.decode_image
    with pytest.raises(ValueError, match=r"^`support_mask\[1\]` has no target pixel"):
        annotations.decode_annotation(np.zeros((4, 4), np.uint8), (4, 4), name="support_mask[1]")
    with pytest.raises(ValueError, match=r"pass `support_class_id` with the class to segment"):
        label_map = np.kron(np.array([[0, 3], [7, 3]]), np.ones((4, 4), dtype=np.int64))  # regions, not a faint edge
        annotations.decode_annotation(label_map, (8, 8), class_ids_name="support_class_id")
    with pytest.raises(ValueError, match=r"^`query`: could not read image file"):
        annotations.decode_image("/no/such/file.png", "query")
    assert image_geometry.resized_size(375, 500, 473, 8, False) == (352, 472)


# Issue 22, round two, C7-C9: a tiny PIL image is an image, a bf16 / fp16 tensor is read like a float32 one, a meta
# tensor (no values) is refused naming the argument.


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (3, 3), (4, 4), (5, 1), (2000, 1)])  # PIL sizes are (w, h)
def test_a_tiny_pil_image_is_an_image_not_a_channels_first_array(processor, tmp_path, size):
    rgb = _rng().integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path = tmp_path / "tiny.png"
    Image.fromarray(rgb).save(path)
    mask = np.ones(rgb.shape[:2], dtype=np.uint8)
    expected = processor.resize_and_pad_rgb(rgb.astype(np.float32))
    for image in (Image.fromarray(rgb), str(path)):  # a PIL image and a file on disk
        out = processor(images=image, support_images=[image], support_masks=[mask])
        np.testing.assert_array_equal(out["pixel_values"][0], expected)
        np.testing.assert_array_equal(out["support_pixel_values"][0, 0], expected)
        assert (out["support_masks"][0, 0] == 1).sum() == np.prod(processor.resized_size(*rgb.shape[:2]))
    # Upscaled like any small image when asked.
    upscaled = processor(images=Image.fromarray(rgb), upscale_small_images=True)["pixel_values"][0]
    height, width = processor.with_options(upscale_small_images=True).resized_size(*rgb.shape[:2])
    assert max(height, width) == S - 1 and np.isfinite(upscaled).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_tensor_image_and_mask_work_like_float32_ones(processor, dtype):
    # values exact in both half formats (multiples of 1/256), so the float32 reference sees the same pixels
    image = torch.from_numpy(_rng().integers(0, 256, (3, 30, 40)) / 256).float()
    mask = torch.zeros(30, 40)
    mask[5:20, 10:30] = 1
    reference = processor(images=image, support_images=image, support_masks=mask)
    half = processor(images=image.to(dtype), support_images=image.to(dtype), support_masks=mask.to(dtype))
    for key in ("pixel_values", "support_pixel_values", "support_masks"):
        np.testing.assert_array_equal(half[key], reference[key])


def test_a_meta_tensor_is_refused_naming_the_argument(processor):
    image = torch.zeros(3, 30, 40)
    with pytest.raises(ValueError, match=r"^`images` is a tensor on the meta device, which holds no values; pass"):
        processor(images=torch.empty(3, 30, 40, device="meta"))
    with pytest.raises(ValueError, match=r"^`support_masks\[0\]\[0\] \(query 0, shot 0\)` is a tensor on the meta"):
        processor(images=image, support_images=image, support_masks=torch.empty(30, 40, device="meta"))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"image_mean": [float("nan"), 0.4, 0.4]}, r"^`image_mean` must hold values in \[0, 1\]"),
        ({"image_mean": [124, 116, 104]}, r"^`image_mean` must hold values in \[0, 1\] .*divide 0-255 values by 255"),
        ({"image_mean": None}, r"^`image_mean` is null"),
        ({"image_std": None}, r"^`image_std` is null"),
        ({"image_std": "0.2"}, r"^`image_std` must be a list of 3 numbers"),
        ({"do_normalize": "yes"}, r"^`do_normalize` must be true or false, got 'yes'"),
        ({"upscale_small_images": 1}, r"^`upscale_small_images` must be true or false, got 1"),
        ({"image_mea": [0.5, 0.5, 0.5]}, r"^unknown setting\(s\) \['image_mea'\]"),
    ],
)
def test_hand_edited_settings_are_refused_by_auto_image_processor_and_the_loader(tmp_path, changes, message):
    from transformers import AutoImageProcessor

    from hf_fss.image_processing_fss import load_image_processor

    FewShotSegmentationImageProcessor().save_pretrained(tmp_path)
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    with pytest.raises((ValueError, TypeError), match=message) as error:
        AutoImageProcessor.from_pretrained(tmp_path)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=message[1:]) as error:
        load_image_processor(tmp_path, 473)
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)
    # The same values given in code, or per call, are refused alike (`None` there means the default).
    settings = {k: v for k, v in changes.items() if v is not None}
    if settings:
        with pytest.raises((ValueError, TypeError), match=message):
            FewShotSegmentationImageProcessor(**settings)
    assert FewShotSegmentationImageProcessor(image_mean=None).image_mean == [0.485, 0.456, 0.406]
