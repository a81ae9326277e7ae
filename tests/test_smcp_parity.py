"""
SMCP parity with the official code: first-pass and final logits pinned from the official model.

The official code is not in the repository and its checkpoint is not downloadable here, so the test regenerates a
seeded checkpoint in the official layout (`official_state_dict`, below: every tensor drawn from its own
`torch.Generator` seeded with `SEED + crc32(key)`, so the values depend on neither the project's model code nor the
order of the keys), writes it as the official `.pth` (`torch.save` of a bare `{"module." + key: tensor}` dict, as
DataParallel's `state_dict()` in train.py), converts it with `scripts/convert_original_checkpoint.py`, runs the
converted model on a seeded 417 x 417 episode (`episode`) and compares slices of the logits with numbers computed once
from the official model on exactly that checkpoint and those inputs.

How the pinned numbers were produced (out of tree, never in the repository):

1. Official code: github.com/NUST-Machine-Intelligence-Laboratory/SMCP at commit 191fbff, its `models/vgg.py`
   (training `Encoder`, whose first output is the first-pass prediction with the support prototype) and
   `models/vgg_test.py` (test `Encoder`, two passes with the fused prototype), with only the changes needed to run
   on CPU: every `.cuda()` dropped (one, in vgg_test.py's forward). torchvision is not installed here (and the
   CPU wheel for this torch has mismatched C ops), so the harness put a stand-in `torchvision.models.vgg16()` in
   `sys.modules`: torchvision's VGG-16 layer list (`features`: 13 x [Conv2d 3x3 padding 1, ReLU(inplace)] with
   MaxPool2d(2, 2) after blocks 1-5; `classifier`: Linear/ReLU/Dropout), which is all the official code reads of it.
   vgg.py's constructor loads an ImageNet file; the harness gave it a state dict of that stand-in.
2. Both official encoders loaded `official_state_dict()` from this file with `strict=True` (so the generated layout
   is exactly the official one), in eval mode, and ran on `episode()` the way test.py calls them: `model(support
   images (1, 3, 417, 417), query image, support fg mask (1, 417, 417))`, the fg mask being `mask == 1` (test.py's
   `fg_mask`); the outputs (52 x 52) were upsampled to 417 x 417 bilinearly (align_corners=False), as test.py does.
   torch 2.13.0+cpu, fp32, `torch.set_num_threads(2)`, x86-64 CPU.
3. It printed `logits[0, :, ::STRIDE, ::STRIDE]` (6 decimals) and the per-channel means (7 decimals) of the first
   pass and of the final (fused) pass, pasted below as `PINNED`.
4. The same script converted the checkpoint with `python scripts/convert_original_checkpoint.py --model-type smcp`,
   loaded `AutoModel.from_pretrained` and measured the max |official - converted| over all 2 x 417 x 417 logits: see
   `MEASURED_MAX_ABS_DIFF`. `CLASSIFIER_2_BIAS` was chosen by the same script (minus the median first-pass
   target-minus-background margin) so that the pseudo-mask covers about half of the query and the fusion matters.

The generated weights are not a trained model; the official vgg_test.py never computes the MCL head, which the
converter still checks (every key matched). `test_pinned_logits_can_fail` perturbs one weight and checks that the
comparison notices.
"""

import zlib
from pathlib import Path

import parity_common as parity
import pytest
import torch

OFFICIAL_COMMIT = "191fbff"
SEED = 4170
EPISODE_SEED = 417
SIZE = 417
STRIDE = 104  # logits[0, :, ::STRIDE, ::STRIDE]: 2 x 5 x 5 values
CLASSIFIER_2_BIAS = 4.41  # added to class 1 of classifier_2's first branch; see the module docstring
# Official vgg16 features indices of the convolutions (pool4 removed, fc6 = 29, fc7 = 31) and their channels.
_FEATURE_CONVS = {
    0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256), 14: (256, 256),
    17: (512, 256), 19: (512, 512), 21: (512, 512), 23: (512, 512), 25: (512, 512), 27: (512, 512),
    29: (512, 512), 31: (512, 512),
}  # fmt: skip


def official_layout() -> dict[str, tuple[int, ...]]:
    """Every key of the official `Encoder().state_dict()` (models/vgg.py) with its shape."""
    shapes = parity.OfficialLayout()
    for index, (out_channels, in_channels) in _FEATURE_CONVS.items():
        shapes.conv(f"features.{index}", out_channels, in_channels, 3, bias=True)
    for branch in range(4):
        shapes.conv(f"classifier.conv2d_list.{branch}", 21, 512, 3, bias=True)
    shapes.conv("feat_rd.0", 512, 1024, 3, bias=True)
    for name in ("p1.0", "p2.0", "p3.0", "feat_fuse.0", "feat_fuse.2"):
        shapes.conv(f"pyramid_m.{name}", 512, 512, 3, bias=True)
    for residual in ("residule1", "residule2"):
        shapes.conv(f"pyramid_m.{residual}.0", 64, 512, 1, bias=True)
        shapes.conv(f"pyramid_m.{residual}.2", 64, 64, 3, bias=True)
        shapes.conv(f"pyramid_m.{residual}.4", 512, 64, 1, bias=True)
    for branch in range(4):
        shapes.conv(f"classifier_2.conv2d_list.{branch}", 2, 512, 3, bias=True)
    return shapes


def official_state_dict(seed: int = SEED, classifier_2_bias: float = CLASSIFIER_2_BIAS) -> dict[str, torch.Tensor]:
    """
    The seeded checkpoint in the official layout (bare keys): conv weights He-normal on fan-in (the ASPP ones a tenth
    of it rather than the official N(0, 0.01^2), so that the logits are a few units), biases N(0, 0.1^2). Each tensor depends
    only on its key and shape (and `classifier_2_bias`).
    """

    def draw(key: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
        if key.endswith(".weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            # The four ASPP branches are summed: a tenth of He's scale keeps the logits at a few units.
            scale = 0.1 if "conv2d_list" in key else 1.0
            value = torch.randn(shape, generator=g) * scale * (2.0 / fan_in) ** 0.5
        else:
            value = torch.randn(shape, generator=g) * 0.1
        if key == "classifier_2.conv2d_list.0.bias":
            value[1] += classifier_2_bias
        return value

    return parity.seeded_state_dict(official_layout(), seed, draw)


def episode(size: int = SIZE, seed: int = EPISODE_SEED):
    """Seeded query image and one support with a target rectangle (and a strip of ignored 255 pixels)."""
    return parity.seeded_episode(seed, 1, size, lambda k: (60, 90), ignored_rows=8)


# The official model's logits on `episode()` with `official_state_dict()`: `logits[0, :, ::STRIDE, ::STRIDE]` (2 x 5 x
# 5) and the per-channel means over all 417 x 417 pixels, of the first pass (vgg.py) and the final pass (vgg_test.py).
PINNED = {
    "first": {
        "means": [1.2249517, 2.0370564],
        "slice": [
            [
                [2.288409, 3.797416, 3.220944, 3.21512, 1.36019],
                [1.89321, 3.819581, 2.411783, 2.5856, -0.198022],
                [1.159251, 3.095467, 1.306648, 2.00846, -1.295715],
                [0.609129, 1.487635, 0.229936, 0.725912, -2.0987],
                [-0.16618, -1.14027, -1.58943, -1.392949, -1.549347],
            ],
            [
                [1.872168, 1.136579, 0.907916, 1.313924, 2.691062],
                [2.438312, 1.459857, 0.808829, 1.333825, 2.013869],
                [1.860275, 0.109638, 0.4904, 1.084226, 2.451695],
                [4.427321, 3.454465, 3.331677, 2.410421, 2.693519],
                [3.347455, 2.355492, 3.082144, 2.305864, 3.965],
            ],
        ],
    },
    "final": {
        "means": [1.1439278, 2.0548558],
        "slice": [
            [
                [2.127862, 3.553317, 2.910715, 2.925162, 1.160429],
                [1.785171, 3.714639, 2.419547, 2.464894, -0.103069],
                [0.994408, 2.887569, 1.230091, 1.867298, -1.200337],
                [0.466974, 1.293802, 0.162287, 0.685386, -1.850911],
                [-0.206858, -1.19019, -1.653785, -1.361989, -1.492486],
            ],
            [
                [1.962751, 1.233147, 1.063476, 1.623515, 2.826461],
                [2.441982, 1.527648, 1.038488, 1.592255, 2.156519],
                [1.846682, 0.105507, 0.535594, 1.304852, 2.535423],
                [4.270304, 3.261253, 3.21725, 2.359292, 2.733397],
                [3.258424, 2.357689, 3.001554, 2.366654, 3.877818],
            ],
        ],
    },
}
# Max |official - converted| over all 2 x 417 x 417 logits (logits up to 6.4 in magnitude), measured by the harness:
# float32 rounding (the adjoint prototype pooling and torch's upsampling sum in different orders).
MEASURED_MAX_ABS_DIFF = {"first": 1.16e-5, "final": 1.09e-5}
# The pinned slice holds 6-decimal roundings (<= 5e-7 off).
ATOL = 1e-4


def convert_official(folder: Path, state: dict[str, torch.Tensor]):
    """Write `state` as the official .pth, convert it with the CLI and load the result."""
    return parity.convert_with_cli("smcp", {"module." + k: v for k, v in state.items()}, folder / "25000.pth")


def first_and_final_logits(model) -> dict[str, torch.Tensor]:
    """The first-pass logits (`pseudo_prototype_fusion=False`) and the final ones, `(1, 2, 417, 417)` each."""
    query, support, masks = episode()
    with torch.no_grad():
        final = model(query, support, masks)
        model.config.pseudo_prototype_fusion = False
        try:
            first = model(query, support, masks).logits
        finally:
            model.config.pseudo_prototype_fusion = True
    return {"first": first, "final": final.logits, "pseudo_mask": final.maps["pseudo_mask"]}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_official(tmp_path_factory.mktemp("smcp_parity"), official_state_dict())


def test_pins_belong_to_the_official_commit_and_the_layout_has_the_official_size():
    layout = official_layout()
    # 36,582,556 parameters, as the official Encoder, which loaded the generated state dict with strict=True.
    assert sum(torch.Size(shape).numel() for shape in layout.values()) == 36_582_556
    state = official_state_dict()
    assert state.keys() == layout.keys()
    g = torch.Generator().manual_seed(SEED + zlib.crc32(b"feat_rd.0.bias"))
    assert torch.equal(state["feat_rd.0.bias"], torch.randn(512, generator=g) * 0.1)


@pytest.mark.slow
def test_converted_model_reproduces_pinned_official_logits(converted):
    outputs = first_and_final_logits(converted)
    assert 0.2 < outputs["pseudo_mask"].mean() < 0.8  # the second pass really fuses a pseudo-prototype
    for name in ("first", "final"):
        logits = outputs[name]
        assert logits.shape == (1, 2, SIZE, SIZE)
        parity.assert_matches_pinned(logits, PINNED[name], STRIDE, ATOL)
    assert not torch.allclose(outputs["first"], outputs["final"], atol=ATOL)


@pytest.mark.slow
def test_pinned_logits_can_fail(converted):
    """One weight of feat_rd moved by 0.05 moves the final logits far outside the tolerance."""
    with parity.nudged(converted.feat_rd[0].weight, 0.05):
        assert not parity.matches_pinned(first_and_final_logits(converted)["final"], PINNED["final"], STRIDE, ATOL)
