"""
What the parity tests (`tests/test_*_parity.py`) share: a seeded checkpoint in an official layout, seeded episodes,
the official `.pth` converted with the command line, and the comparison with logits pinned from the official model.

Every generated tensor comes from its own `torch.Generator` seeded with `seed + crc32(key)`, so it depends only on
its key and shape (never on the project's model code or the order of the keys): the pinned numbers of each test
stay reproducible out of tree, where the official model loads the same checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
Shape = tuple[int, ...]
# The PFENet-lineage parity tests' (NTRENet, QGNet) geometry: SIZE x SIZE episodes ((SIZE - 1) % 8 == 0, as the official
# forward asserts), the pinned slice `logits[0, :, ::STRIDE, ::STRIDE]` (2 x 5 x 5 values), and the official PASCAL
# config's REDUCE_DIM and number of pyramid scales.
PFENET_GEOMETRY = (97, 24, 256, 4)


class OfficialLayout(dict):
    """Official state-dict keys -> shapes, written with the building blocks of the official modules."""

    def conv(self, name: str, out_channels: int, in_channels: int, kernel: int, bias: bool = False) -> None:
        self[f"{name}.weight"] = (out_channels, in_channels, kernel, kernel)
        if bias:
            self[f"{name}.bias"] = (out_channels,)

    def batchnorm(self, name: str, channels: int) -> None:
        for param in ("weight", "bias", "running_mean", "running_var"):
            self[f"{name}.{param}"] = (channels,)
        self[f"{name}.num_batches_tracked"] = ()

    def pspnet_stem(self) -> None:
        """PSPNet's deep stem `layer0 = Sequential(conv1, bn1, relu1, conv2, bn2, relu2, conv3, bn3, relu3, pool)`."""
        self.conv("layer0.0", 64, 3, 3)
        self.batchnorm("layer0.1", 64)
        self.conv("layer0.3", 64, 64, 3)
        self.batchnorm("layer0.4", 64)
        self.conv("layer0.6", 128, 64, 3)
        self.batchnorm("layer0.7", 128)

    def resnet50_stages(self, suffix: str, in_channels: int) -> None:
        """The four bottleneck stages of ResNet-50 as `layer{1..4}{suffix}.{block}.*`."""
        for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
            for block in range(blocks):
                prefix = f"layer{stage}{suffix}.{block}"
                self.conv(f"{prefix}.conv1", planes, in_channels, 1)
                self.batchnorm(f"{prefix}.bn1", planes)
                self.conv(f"{prefix}.conv2", planes, planes, 3)
                self.batchnorm(f"{prefix}.bn2", planes)
                self.conv(f"{prefix}.conv3", planes * 4, planes, 1)
                self.batchnorm(f"{prefix}.bn3", planes * 4)
                if block == 0:
                    self.conv(f"{prefix}.downsample.0", planes * 4, in_channels, 1)
                    self.batchnorm(f"{prefix}.downsample.1", planes * 4)
                in_channels = planes * 4


def seeded_state_dict(
    layout: Mapping[str, Shape], seed: int, draw: Callable[[str, Shape, torch.Generator], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`{key: draw(key, shape, generator seeded with seed + crc32(key))}`, floating values in float32."""
    state = {}
    for key, shape in layout.items():
        value = draw(key, shape, torch.Generator().manual_seed(seed + zlib.crc32(key.encode())))
        state[key] = value.float() if value.is_floating_point() else value
    return state


def pfenet_tensor(
    key: str, shape: Shape, g: torch.Generator, classifier_bias: Mapping[str, tuple[float, float]]
) -> torch.Tensor:
    """
    A tensor of a PFENet-lineage checkpoint (NTRENet, QGNet): convolutions He-normal on fan-in; random BN statistics;
    the 2-class classifiers' biases (`*.3.bias`) at `classifier_bias` (class 0, class 1; default 0) plus noise.
    """
    name = key.rsplit(".", 1)[-1]
    if name == "num_batches_tracked":
        return torch.tensor(0, dtype=torch.long)
    if name == "weight" and len(shape) == 4:  # conv: He-normal on fan-in
        fan_in = shape[1] * shape[2] * shape[3]
        return torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    if name == "weight":  # BN scale; the last BN of a residual branch smaller, so depth does not blow up
        low, high = (0.1, 0.3) if key.endswith("bn3.weight") else (0.5, 1.0)
        return torch.empty(shape).uniform_(low, high, generator=g)
    if name == "running_var":
        return torch.empty(shape).uniform_(0.5, 2.0, generator=g)
    if name == "running_mean":
        return torch.randn(shape, generator=g) * 0.1
    if name == "bias" and key.endswith(".3.bias"):  # 2-class classifiers
        return torch.tensor(classifier_bias.get(key, (0.0, 0.0))) + torch.randn(shape, generator=g) * 0.01
    if name == "bias":  # BN shift
        return torch.randn(shape, generator=g) * 0.1
    raise AssertionError(f"no rule for {key}")


def seeded_episode(
    seed: int, shot: int, size: int, corner: Callable[[int], tuple[int, int]], ignored_rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Query `(1, 3, size, size)`, `shot` supports and their masks `(1, shot, size, size)`: support k holds a target
    rectangle of `size // 2` x `size // 3` at `corner(k)` (top, left), and the last `ignored_rows` rows are 255.
    """
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(1, 3, size, size, generator=g)
    support = torch.randn(1, shot, 3, size, size, generator=g)
    masks = torch.zeros(1, shot, size, size, dtype=torch.long)
    for k in range(shot):
        top, left = corner(k)
        masks[0, k, top : top + size // 2, left : left + size // 3] = 1
    masks[..., -ignored_rows:, :] = 255
    return query, support, masks


def convert_with_cli(model_type: str, checkpoint: object, path: Path):
    """
    Save `checkpoint` (what the official code saves) at `path`, convert it with
    `scripts/convert_original_checkpoint.py`, delete it and load the converted folder (`path`'s sibling
    `converted/`) with `AutoModel`, in eval mode.
    """
    from transformers import AutoModel

    import hf_fss  # noqa: F401  (registers the auto classes)

    spec = importlib.util.spec_from_file_location("_convert_cli", ROOT / "scripts" / "convert_original_checkpoint.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    output_dir = path.parent / "converted"
    torch.save(checkpoint, path)
    assert cli.main(["--model-type", model_type, "--checkpoint", str(path), "--output-dir", str(output_dir)]) == 0
    path.unlink()
    return AutoModel.from_pretrained(output_dir).eval()


def logits_of(model, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """`model(*inputs).logits` without autograd."""
    with torch.no_grad():
        return model(*inputs).logits


def names_commit(model_class: type, commit: str) -> bool:
    """Whether the module defining `model_class` names the official `commit` its pinned numbers come from."""
    return f"commit {commit}" in Path(inspect.getfile(model_class)).read_text()


def assert_has_layout(state: Mapping[str, torch.Tensor], layout: Mapping[str, Shape]) -> None:
    """`state` has exactly the keys of `layout`, each with its shape."""
    assert state.keys() == layout.keys()
    assert all(tuple(state[k].shape) == shape for k, shape in layout.items())


def pinned_parts(logits: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the tests pin: `logits[0, :, ::stride, ::stride]` and the per-channel means of `logits[0]`."""
    return logits[0, :, ::stride, ::stride], logits.mean(dim=(2, 3))[0]


def assert_matches_pinned(logits: torch.Tensor, pinned: Mapping, stride: int, atol: float) -> None:
    got_slice, got_means = pinned_parts(logits, stride)
    torch.testing.assert_close(got_slice, torch.tensor(pinned["slice"]), rtol=0, atol=atol)
    torch.testing.assert_close(got_means, torch.tensor(pinned["means"]), rtol=0, atol=atol)


def assert_reproduces_pinned(model, inputs: tuple, pinned: Mapping, size: int, stride: int, atol: float) -> None:
    """The model's logits on `inputs` have the episode's size and match the pinned official ones."""
    logits = logits_of(model, inputs)
    assert logits.shape == (1, 2, size, size)
    assert_matches_pinned(logits, pinned, stride, atol)


def matches_pinned(logits: torch.Tensor, pinned: Mapping, stride: int, atol: float) -> bool:
    got_slice, got_means = pinned_parts(logits, stride)
    return torch.allclose(got_slice, torch.tensor(pinned["slice"]), rtol=0, atol=atol) and torch.allclose(
        got_means, torch.tensor(pinned["means"]), rtol=0, atol=atol
    )


def assert_nudge_is_noticed(model, weight: torch.Tensor, inputs: tuple, pinned: Mapping, stride: int, atol: float):
    """With `weight` nudged (`nudged`) the logits no longer match the pinned ones; restored, they match again."""
    with nudged(weight, 0.05):
        assert not matches_pinned(logits_of(model, inputs), pinned, stride, atol)
    assert matches_pinned(logits_of(model, inputs), pinned, stride, atol)


@contextlib.contextmanager
def nudged(weight: torch.Tensor, delta: float = 0.05) -> Iterator[None]:
    """`weight[0, 0, 1, 1] += delta` for the duration (the weight is restored exactly afterwards)."""
    original = weight.detach().clone()
    try:
        with torch.no_grad():
            weight[0, 0, 1, 1] += delta
        yield
    finally:
        with torch.no_grad():
            weight.copy_(original)
