"""
QGNet parity with the official code: logits pinned from the official model.

The official code is not in the repository and a checkpoint of two ResNet-50s is too large to ship, so the test
regenerates a seeded checkpoint in the official layout (`official_state_dict`, below: every tensor drawn from its own
`torch.Generator` seeded with `SEED + crc32(key)`, so the values depend on neither the project's model code nor the
order of the keys), writes it as the official `.pth` (`{"epoch", "state_dict": {"module." + key: tensor}}`), converts it
with `scripts/convert_original_checkpoint.py --model-type qgnet`, runs the converted model on seeded inputs
(`episode`) and compares a slice of the logits with numbers computed once from the official model on exactly that
checkpoint and those inputs.

How the pinned numbers were produced (out of tree, never in the repository):

1. Official code: github.com/liuweide01/QGNet-Few-shot-segmentation at commit 1e77b35 (the commit named in
   `hf_fss/models/qgnet/modeling_qgnet.py`), its `model/` folder (`PFENet_QGNet.py`, `resnet.py`) with only the
   changes needed to build and run it on CPU without weight files: the `.cuda()` tensors in the default arguments
   of `PFENet.forward` (evaluated at import) replaced by `None`; `.cuda()` dropped from `aux_loss` (training only);
   in `resnet.py`, `resnet50`'s `else` branch (which loads `initmodel/resnet50_v2.pth` even with `pretrained=False`)
   made `elif pretrained`. None of them touches the evaluation path.
2. A script (`/work/official/qgnet/run_parity.py pin`) built `PFENet(layers=50, classes=2, zoom_factor=8,
   pretrained=False, shot=K, ppm_scales=[60, 30, 15, 8])` (the class of `model/PFENet_QGNet.py`, the official
   PASCAL config's values), loaded `official_state_dict()` from this file with `strict=True` (so the generated layout
   is exactly the official one: 685 tensors), put it in eval mode and ran `model(x, s_x, s_y)` on `episode(K)` for
   K = 1 and K = 5, with torch 2.13.0+cpu, fp32, `torch.set_num_threads(2)`, on an x86-64 CPU.
3. It printed `logits[0, :, ::STRIDE, ::STRIDE]` (6 decimals) and the per-channel means of the logits (7 decimals),
   pasted below as `PINNED`.
4. The same script converted the checkpoint with the command line below and measured the max |official - converted|
   over all logits; see `MEASURED` (at SIZE and at the official 473 x 473).

The generated weights are not a trained model but they exercise every path of the official forward: the BN running
statistics of both extractors are random, the weights of `init_merge` on the two map channels (512: guided region
map, 513: prior region map) are large enough that removing either map changes the logits by far more than the
tolerance (`MAP_WEIGHT_STD`), and the classifier biases are shifted so that the prediction holds both classes.
`test_pinned_logits_can_fail` perturbs one prior-extractor weight and checks the comparison notices.
"""

import zlib
from pathlib import Path

import parity_common as parity
import pytest
import torch

OFFICIAL_COMMIT = "1e77b35"
SEED = 20250  # weights
EPISODE_SEED = 20260
SIZE, STRIDE, REDUCE_DIM, NUM_BINS = parity.PFENET_GEOMETRY  # 97 x 97 episodes, logits[0, :, ::24, ::24], 256, 4
# Standard deviation of the init_merge weights on the guided (512) and prior (513) map channels; the other 512 input
# channels get He-normal weights (std ~0.06), with which the two maps would hardly matter.
MAP_WEIGHT_STD = 1.0
# (class 0, class 1) biases of the 2-class classifiers, so that the prediction is not one class everywhere.
CLASSIFIER_BIAS = {"cls.3.bias": (0.0, 7.8)}


def official_layout() -> dict[str, tuple[int, ...]]:
    """Every key of the official `PFENet_QGNet.PFENet(layers=50)` state dict with its shape."""
    shapes = parity.OfficialLayout()
    # prior extractor: torchvision stem Sequential(conv1 7x7, bn1, relu, maxpool) + ResNet-50 stages
    shapes.conv("layer0_unsuper.0", 64, 3, 7)
    shapes.batchnorm("layer0_unsuper.1", 64)
    shapes.resnet50_stages("_unsuper", 64)
    # backbone: PSPNet deep stem + ResNet-50 stages
    shapes.pspnet_stem()
    shapes.resnet50_stages("", 128)

    r = REDUCE_DIM
    shapes.conv("cls.0", r, r, 3)
    shapes.conv("cls.3", 2, r, 1, bias=True)
    shapes.conv("down_query.0", r, 1024 + 512, 1)
    shapes.conv("down_supp.0", r, 1024 + 512, 1)
    for i in range(NUM_BINS):
        shapes.conv(f"init_merge.{i}.0", r, 2 * r + 2, 1)
        shapes.conv(f"beta_conv.{i}.0", r, r, 3)
        shapes.conv(f"beta_conv.{i}.2", r, r, 3)
        shapes.conv(f"inner_cls.{i}.0", r, r, 3)
        shapes.conv(f"inner_cls.{i}.3", 2, r, 1, bias=True)
    shapes.conv("res1.0", r, NUM_BINS * r, 1)
    shapes.conv("res2.0", r, r, 3)
    shapes.conv("res2.2", r, r, 3)
    for i in range(NUM_BINS - 1):
        shapes.conv(f"alpha_conv.{i}.0", 256, 512, 1)
    shapes.conv("down_learn_super.0", r, 2048, 3)
    shapes.conv("down_learn_unsuper.0", r, 2048, 3)
    return shapes


def _draw(key: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    value = parity.pfenet_tensor(key, shape, g, CLASSIFIER_BIAS)
    if key.startswith("init_merge.") and key.endswith(".weight"):  # the guided and prior map channels, same stream
        value[:, 2 * REDUCE_DIM :] = torch.randn(shape[0], 2, 1, 1, generator=g) * MAP_WEIGHT_STD
    return value


def official_state_dict(seed: int = SEED) -> dict[str, torch.Tensor]:
    """
    The seeded checkpoint in the official layout (bare keys). Each tensor comes from its own generator seeded with
    `seed + crc32(key)`, so it depends only on its key and shape.
    """
    return parity.seeded_state_dict(official_layout(), seed, _draw)


def episode(shot: int, size: int = SIZE, seed: int = EPISODE_SEED):
    """Seeded query image and `shot` supports with a target rectangle each (and a strip of ignored 255 pixels)."""

    def corner(k):
        return size // 12 + size // 16 * k, size // 8 + size // 19 * k

    return parity.seeded_episode(seed + shot, shot, size, corner, ignored_rows=4)


# The official model's logits on `episode(K)` with `official_state_dict()`: `logits[0, :, ::STRIDE, ::STRIDE]` (2 x 5
# x 5) and the per-channel means over all 97 x 97 pixels; see the module docstring.
PINNED = {
    1: {
        "means": [5.5917177, 5.4454246],
        "slice": [
            [
                [-0.352401, 5.378479, 5.704621, 5.452392, 2.036767],
                [5.596582, 6.711106, 6.769092, 6.025362, 1.060896],
                [5.702975, 6.526769, 5.852966, 5.876907, 1.348283],
                [5.466048, 6.667385, 6.266618, 5.726404, 1.248767],
                [2.364557, 0.604121, 0.588331, 0.426214, -3.522393],
            ],
            [
                [7.217993, 3.854307, 3.586121, 3.738072, 4.942134],
                [10.318007, 4.55347, 3.255365, 3.325044, -4.164228],
                [10.296267, 7.132804, 5.890414, 5.6789, -2.55216],
                [10.042081, 7.440925, 7.030619, 6.324496, -2.46648],
                [8.508604, 6.4816, 5.940932, 5.268041, 2.465623],
            ],
        ],
    },
    5: {
        "means": [5.6007328, 5.1179361],
        "slice": [
            [
                [-0.295144, 5.444877, 5.567642, 5.779742, 2.414387],
                [5.768361, 6.934651, 6.54158, 6.607272, 1.468388],
                [4.921694, 6.131, 4.826623, 5.91567, 1.119439],
                [5.760127, 5.826488, 5.817675, 6.280132, 1.440073],
                [2.381446, 0.664477, 0.874665, 0.892569, -3.782226],
            ],
            [
                [7.131039, 3.826943, 3.655413, 3.829754, 5.462823],
                [10.738595, 4.365671, 3.538208, 2.819776, -4.698809],
                [10.984935, 6.935394, 5.528, 4.046284, -3.527455],
                [10.376316, 7.316223, 6.133385, 5.52845, -3.514297],
                [7.964304, 5.738949, 5.620669, 4.062051, 1.590263],
            ],
        ],
    },
}
# max |official - converted| over all logits, measured by run_parity.py (pin: at SIZE; full: at 473 x 473) on this
# checkpoint and these episodes; logits up to ~11 in magnitude. Float32 rounding (the two models order the same sums
# differently), hence ATOL = 1e-4.
MEASURED = {(1, SIZE): 2.67e-5, (5, SIZE): 2.15e-5, (1, 473): 3.15e-5, (5, 473): 3.43e-5}
ATOL = 1e-4


def convert_official_state_dict(state_dict: dict, folder: Path):
    """Save `state_dict` as train.py does, convert it with the CLI and load the result."""
    checkpoint = {"epoch": 200, "state_dict": {"module." + k: v for k, v in state_dict.items()}}
    return parity.convert_with_cli("qgnet", checkpoint, folder / "train_epoch_200.pth")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_official_state_dict(official_state_dict(), tmp_path_factory.mktemp("qgnet_parity"))


def test_pins_belong_to_the_official_commit_the_model_names():
    from hf_fss import QGNetModel

    assert parity.names_commit(QGNetModel, OFFICIAL_COMMIT)


def test_generated_checkpoint_has_the_official_layout_and_depends_only_on_each_key():
    layout = official_layout()
    # 685 entries, as the official PFENet_QGNet.PFENet(layers=50).state_dict(), which loaded it with strict=True
    assert len(layout) == 685 and layout["init_merge.0.0.weight"] == (256, 514, 1, 1)
    assert layout["layer0_unsuper.0.weight"] == (64, 3, 7, 7) and layout["layer0.6.weight"] == (128, 64, 3, 3)
    state = official_state_dict()
    parity.assert_has_layout(state, layout)
    g = torch.Generator().manual_seed(SEED + zlib.crc32(b"layer4_unsuper.2.conv3.weight"))
    expected = torch.randn(2048, 512, 1, 1, generator=g) * (2.0 / 512) ** 0.5
    assert torch.equal(state["layer4_unsuper.2.conv3.weight"], expected)


@pytest.mark.slow
def test_pinned_logits_can_fail(converted):
    """One weight of the prior extractor moved by 0.05 moves the logits far outside the tolerance."""
    weight = converted.get_parameter("prior_extractor.layer3.2.conv2.weight")
    parity.assert_nudge_is_noticed(converted, weight, episode(1), PINNED[1], STRIDE, ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("shot", [1, 5])
def test_converted_model_reproduces_pinned_official_logits(converted, shot):
    parity.assert_reproduces_pinned(converted, episode(shot), PINNED[shot], SIZE, STRIDE, ATOL)
