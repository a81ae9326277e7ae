"""
NTRENet parity with the official code: logits pinned from the official model.

The official code cannot run here (it is not in the repository) and a ResNet-50 checkpoint is too large to ship, so
the test regenerates a seeded checkpoint in the official layout (`official_state_dict`, below: every tensor drawn from
its own `torch.Generator` seeded with `SEED + crc32(key)`, so the values depend on neither the project's model code
nor the order of the keys), writes it as the official `.pth` (`{"state_dict": {"module." + key: tensor}}`), converts
it with `scripts/convert_original_checkpoint.py`, runs the converted model on seeded inputs (`episode`) and compares a
slice of the logits with numbers computed once from the official model on exactly that checkpoint and those inputs.

How the pinned numbers were produced (out of tree, never in the repository):

1. Official code: github.com/LIUYUANWEI98/NERTNet at commit 1fe13ad (the commit named in
   `hf_fss/models/ntrenet/modeling_ntrenet.py`), its `model/` folder (`ourmodel.py`, `base/resnet.py`,
   `base/vgg.py`, `prototypical_contrast.py`) with only the changes needed to run on CPU: the full-width comma in the
   `NTRENet.__init__` signature (a syntax error) replaced by `,`; every `.cuda()` dropped; `aux_bg_loss = 0` before
   its first use. None of them touches the evaluation path.
2. A script built `NTRENet(layers=50, classes=2, zoom_factor=8, pretrained=False, shot=K, ppm_scales=[60, 30, 15, 8],
   vgg=False)` (the official config's ResNet-50 layers, random initial weights, no download), loaded
   `official_state_dict()` from this file with `strict=True` (so the generated layout is exactly the official one),
   put it in eval mode and ran `model(s_x, s_y, x, y, classes)` on `episode(K)` for K = 1 and K = 5 (the official
   argument order: support images, support masks, query), with torch 2.13.0+cpu, fp32, `torch.set_num_threads(2)`,
   on an x86-64 CPU. The script (`run_parity.py pin`) imports `official_state_dict` and `episode` from this file.
3. It printed `logits[0, :, ::STRIDE, ::STRIDE]` (rounded to 6 decimals) and the per-channel means of the logits
   (7 decimals), pasted below as `PINNED`.
4. The same script saved the checkpoint as above, converted it with `python scripts/convert_original_checkpoint.py
   --model-type ntrenet --checkpoint X.pth --output-dir Y`, loaded `AutoModel.from_pretrained(Y)` and measured the
   max |official - converted| over all 2 x 97 x 97 logits: 2.6e-5 (K = 1) and 2.2e-5 (K = 5), logits up to ~9 in
   magnitude. That gap is float32 rounding, not a difference in the computation: in float64 the two models differ by
   3.3e-8 (K = 1), and the official model alone differs from its own float64 run by 2.5e-5. Hence `ATOL = 1e-4`.
   (Here the converted model's slice is 1.4e-5 from the pinned one; one weight moved by 0.05, as in
   `test_pinned_logits_can_fail`, moves it by 5.5e-3.) At full size, 473 x 473 on the same checkpoint, the gap is
   4.2e-5 (K = 1) and 2.8e-5 (K = 5).
5. `EPISODE_SEED` was picked by the same script from seeds 20240..20279: the one whose smallest logit margin among
   the argmax decisions that would change the DO mask if they flipped is largest (1.5e-4, both K, every scale).

The generated weights are not a trained model but they exercise every path of the official forward: the BN running
statistics are random, the classifier biases are set so that the BG map, the initial target map and hence the
distractor (DO) mask are all mixed at every pyramid scale, and the BG prototype is random (it is zero at the
official initialisation). `test_pinned_logits_can_fail` perturbs one weight and checks the comparison notices.
"""

import zlib

import parity_common as parity
import pytest
import torch

OFFICIAL_COMMIT = "1fe13ad"
SEED = 20240  # weights
# Inputs. NTRENet takes argmaxes (BG and initial maps) inside the network; a pixel whose two logits nearly tie could flip
# with float rounding and change the DO prototype. Among episode seeds 20240..20279 this one has the widest smallest
# margin, 1.5e-4, over the ties that would change the DO mask (both K, every scale), against ~1e-6 of rounding noise.
EPISODE_SEED = 20251
SIZE, STRIDE, REDUCE_DIM, NUM_BINS = parity.PFENET_GEOMETRY  # 97 x 97 episodes, logits[0, :, ::24, ::24], 256, 4
# The official classifiers end with a 2-class 1x1 conv with bias; these biases (class 0, class 1) keep their argmax
# maps mixed on the generated weights.
CLASSIFIER_BIAS = {
    "bg_cls.3.bias": (0.0, -0.92),
    "inital_inner_cls.0.3.bias": (0.0, 0.84),
    "inital_inner_cls.1.3.bias": (0.0, -0.27),
    "inital_inner_cls.2.3.bias": (0.0, -0.87),
    "inital_inner_cls.3.3.bias": (0.0, 1.91),
    "cls.3.bias": (0.0, -6.28),
}


def official_layout() -> dict[str, tuple[int, ...]]:
    """Every key of the official `NTRENet(layers=50)` state dict with its shape (ResNet-50 deep stem + NTRENet head)."""
    shapes = parity.OfficialLayout()
    shapes.pspnet_stem()
    shapes.resnet50_stages("", 128)
    r = REDUCE_DIM
    for head in ("cls", "bg_cls"):
        shapes.conv(f"{head}.0", r, r, 3)
        shapes.conv(f"{head}.3", 2, r, 1, bias=True)
    shapes.conv("down_query.0", r, 1024 + 512, 1)
    shapes.conv("down_supp.0", r, 1024 + 512, 1)
    shapes.conv("down_bg.0", r, 2 * r, 1)
    for i in range(NUM_BINS):
        shapes.conv(f"init_merge1.{i}.0", r, 2 * r, 1)
        shapes.conv(f"init_merge2.{i}.0", r, 2 * r + 1, 1)
        shapes.conv(f"init_merge3.{i}.0", r, 2 * r, 1)
        for pair in ("inital_beta_conv", "beta_conv"):
            shapes.conv(f"{pair}.{i}.0", r, r, 3)
            shapes.conv(f"{pair}.{i}.2", r, r, 3)
        for head in ("inital_inner_cls", "inner_cls"):
            shapes.conv(f"{head}.{i}.0", r, r, 3)
            shapes.conv(f"{head}.{i}.3", 2, r, 1, bias=True)
    shapes.conv("res1.0", r, NUM_BINS * r, 1)
    for pair in ("res2", "bg_res1"):
        shapes.conv(f"{pair}.0", r, r, 3)
        shapes.conv(f"{pair}.2", r, r, 3)
    for i in range(NUM_BINS - 1):
        shapes.conv(f"alpha_conv.{i}.0", 256, 512, 1)
    shapes["bg_prototype"] = (1, r, 1, 1)
    return shapes


def _draw(key: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if key == "bg_prototype":
        return torch.randn(shape, generator=g)
    return parity.pfenet_tensor(key, shape, g, CLASSIFIER_BIAS)


def official_state_dict(seed: int = SEED) -> dict[str, torch.Tensor]:
    """
    The seeded checkpoint in the official layout (bare keys). Each tensor comes from its own generator seeded with
    `seed + crc32(key)`, so it depends only on its key and shape.
    """
    return parity.seeded_state_dict(official_layout(), seed, _draw)


def episode(shot: int, size: int = SIZE, seed: int = EPISODE_SEED):
    """Seeded query image and `shot` supports with a target rectangle each (and a strip of ignored 255 pixels)."""
    return parity.seeded_episode(seed + shot, shot, size, lambda k: (8 + 6 * k, 12 + 5 * k), ignored_rows=4)


# The official model's logits on `episode(K)` with `official_state_dict()`: `logits[0, :, ::STRIDE, ::STRIDE]` (2 x 5
# x 5) and the per-channel means over all 97 x 97 pixels; see the module docstring.
PINNED = {
    1: {
        "means": [-0.7863976, -0.6722531],
        "slice": [
            [
                [3.755942, 2.316398, 2.37256, 2.19667, -3.459736],
                [0.900052, -1.004191, -1.028067, -1.431067, -3.617493],
                [0.843635, -1.047374, -1.203778, -2.021975, -4.152924],
                [0.576678, -0.192907, -0.776739, -1.345646, -3.572529],
                [-4.575049, -4.989592, -5.543654, -6.167932, -0.278991],
            ],
            [
                [-6.504308, -3.229233, -2.690316, -3.068711, -2.240322],
                [-3.600528, 0.954795, 0.036076, 0.640649, -1.435168],
                [-3.230359, 1.68674, 0.216767, -0.035405, -0.714296],
                [-3.379536, 1.122021, -0.410289, -0.683096, -1.033913],
                [-7.40992, -7.482648, -8.712196, -8.955467, -6.45656],
            ],
        ],
    },
    5: {
        "means": [-0.7289385, -0.6528541],
        "slice": [
            [
                [3.753555, 2.421781, 2.334698, 2.403145, -3.504047],
                [1.026598, -0.978275, -1.160496, -1.338663, -3.583409],
                [0.837351, -1.052858, -1.29546, -1.750227, -4.235914],
                [0.665851, 0.134336, -0.56932, -1.48269, -3.636183],
                [-4.465804, -4.888744, -5.476619, -6.097845, -0.206883],
            ],
            [
                [-6.261405, -3.000422, -2.929461, -2.816316, -2.140161],
                [-3.412139, 1.474251, 0.269459, 0.878978, -1.257267],
                [-3.237202, 1.894669, -0.036328, 0.091197, -0.521286],
                [-3.192823, 0.870377, -0.421986, -0.682796, -1.176165],
                [-7.287297, -7.610957, -8.815903, -8.906507, -6.580829],
            ],
        ],
    },
}
# The pinned slice holds 6-decimal roundings (<= 5e-7 off); the measured float32 gap is ~2.6e-5 (see docstring).
ATOL = 1e-4


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    checkpoint = {"state_dict": {"module." + k: v for k, v in official_state_dict().items()}}
    return parity.convert_with_cli(
        "ntrenet", checkpoint, tmp_path_factory.mktemp("ntrenet_parity") / "train_epoch_200.pth"
    )


def test_pins_belong_to_the_official_commit_the_model_names():
    from hf_fss import NTRENetModel

    assert parity.names_commit(NTRENetModel, OFFICIAL_COMMIT)


def test_generated_checkpoint_has_the_official_layout_and_depends_only_on_each_key():
    layout = official_layout()
    # 400 entries, as the official NTRENet(layers=50).state_dict(), which loaded it with strict=True
    assert len(layout) == 400 and layout["layer0.6.weight"] == (128, 64, 3, 3)
    state = official_state_dict()
    parity.assert_has_layout(state, layout)
    g = torch.Generator().manual_seed(SEED + zlib.crc32(b"bg_prototype"))
    assert torch.equal(state["bg_prototype"], torch.randn(1, REDUCE_DIM, 1, 1, generator=g))
    g = torch.Generator().manual_seed(SEED + zlib.crc32(b"layer4.2.conv3.weight"))
    assert torch.equal(state["layer4.2.conv3.weight"], torch.randn(2048, 512, 1, 1, generator=g) * (2.0 / 512) ** 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("shot", [1, 5])
def test_converted_model_reproduces_pinned_official_logits(converted, shot):
    parity.assert_reproduces_pinned(converted, episode(shot), PINNED[shot], SIZE, STRIDE, ATOL)


@pytest.mark.slow
def test_pinned_logits_can_fail(converted):
    """One backbone weight (of 44.5 million) moved by 0.05 moves the slice by ~5e-3, far outside the tolerance."""
    weight = converted.get_parameter(_ours("layer3.2.conv2.weight"))
    parity.assert_nudge_is_noticed(converted, weight, episode(1), PINNED[1], STRIDE, ATOL)


def _ours(official_key: str) -> str:
    from hf_fss.models.ntrenet.convert_ntrenet import original_key_to_ours

    return original_key_to_ours(official_key, vgg=False)
