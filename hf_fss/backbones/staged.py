"""
The base class of every hf_fss feature extractor: five stages, and the whole frozen-extractor policy in one place.

A model may hold several extractors (the backbone; QGNet's prior extractor). Each one owns, instead of the model:

- **no autograd** when frozen (`freeze()`): its parameters have `requires_grad=False`, so they never enter an
  optimizer built from trainable parameters, and its forward runs under `torch.no_grad()`;
- **its batch-norm policy**: with `batchnorm_eval=True` its BN layers stay in eval mode (running statistics fixed)
  whatever `model.train()` says, and `FewShotSegmentationPreTrainedModel.convert_sync_batchnorm` skips it;
- **its own initialisation**: the model's `_init_weights` never re-initialises it (`post_init` marks its modules
  initialised), so a bare backbone and the same backbone inside a model draw identical weights from one seed;
- **its weight source**: `load_weights(name_or_path)` (Hub id, folder or safetensors file, in any layout of
  `hf_fss.backbones.weights`, MoCo included), called explicitly by the trainer / converter, never by
  `from_pretrained`;
- **bounded activations on CPU** (`chunk_on_cpu`), see `max_chunk`;
- **its features served from a cache** during evaluation when one is attached (`feature_cache`, see
  `hf_fss.backbones.feature_cache`).
"""

from __future__ import annotations

import torch
from torch import nn

# glibc's malloc serves blocks above its mmap threshold (at most 32 MiB) with fresh mmap calls: every such
# activation is page-faulted in 4 KiB at a time and unmapped when freed. Keeping each activation of a chunk below
# this bound lets the allocator reuse its heap (issue 16: 2.35 M faults / 5.2 s of system time per 5-shot episode
# at 473 px when the shots run as one batch, 0.38 M when they run one by one).
CPU_CHUNK_BYTES = 32 * 1024 * 1024


class StagedBackbone(nn.Module):
    """
    Base class of every hf_fss backbone: five child stages `layer0` ... `layer4` run one after the other.

    Subclasses set `channels` (output channels of each stage) and `strides` (output stride of each stage with
    respect to the input image), and `stem_expansion`, the size of the largest activation inside `layer0` relative
    to its output (4 for stems that end in a stride-2 pool).

    Attributes:
        frozen (`bool`): set by `freeze()`; no gradients, forward under `torch.no_grad()`.
        batchnorm_eval (`bool`): BN layers stay in eval mode in `train()`.
        chunk_on_cpu (`bool`, defaults to `True`): see `max_chunk`.
        weights_source (`str` or `None`): where `load_weights` last loaded from, for records and model cards.
    """

    num_stages = 5
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    stem_expansion = 4
    frozen = False
    batchnorm_eval = False
    chunk_on_cpu = True
    weights_source: str | None = None
    # The checkpoint layouts `load_weights` maps from: "resnet", "vgg16_bn" or "vgg16_dilated" (see
    # `hf_fss.backbones.weights`); None: the class loads no pretrained weights.
    weight_family: str | None = None
    # Set by `FeatureCache.attach(model)` for the duration of an evaluation; None otherwise.
    feature_cache = None
    feature_cache_name: str | None = None
    # Whether stage `i + 1` runs on exactly the output of stage `i` (the cache then extends an entry from its last
    # stage). An adapter whose outputs are resized copies of its inner states (`TransformersBackbone`) says False:
    # the cache computes all its stages from the image at once, so a served feature equals the uncached one.
    outputs_feed_next_stage = True

    # --- policy ------------------------------------------------------------------------------------------------
    def freeze(self, batchnorm_eval: bool = True) -> StagedBackbone:
        """Stop gradients into this extractor; keep its BN in eval mode unless `batchnorm_eval=False`."""
        self.requires_grad_(False)
        self.frozen = True
        self.batchnorm_eval = bool(batchnorm_eval)
        return self.train(self.training)

    def train(self, mode: bool = True) -> StagedBackbone:
        # An extractor has no dropout: keeping BN in eval means keeping the whole extractor in eval.
        return super().train(mode and not self.batchnorm_eval)

    def restore_computed_buffers(self) -> None:
        """Recompute buffers that no checkpoint holds (called after `from_pretrained`); none here."""

    def stage_modules(self, index: int) -> list[nn.Module]:
        """The modules that run stage `index` only (e.g. to keep an unused `layer4` out of the optimizer)."""
        return [getattr(self, f"layer{index}")]

    def load_weights(self, name_or_path: str, revision: str | None = None, moco_encoder: str = "encoder_k") -> None:
        """
        Load pretrained weights in place; see `hf_fss.backbones.load_backbone_weights` (every expected key must be
        matched, or a `ValueError` names the missing ones).
        """
        from .weights import load_backbone_weights  # looked up at call time: tests patch it in its module

        load_backbone_weights(self, name_or_path, revision=revision, moco_encoder=moco_encoder)
        self.weights_source = str(name_or_path)

    # --- forward -----------------------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """
        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, 3, height, width)`):
                Normalised images.

        Returns:
            `tuple[torch.Tensor, ...]`: the five stage outputs; stage `i` has shape
            `(batch_size, channels[i], ~height / strides[i], ~width / strides[i])`.
        """
        return tuple(self.forward_stages(pixel_values, 0, self.num_stages))

    def forward_stages(self, x: torch.Tensor, start: int, end: int) -> list[torch.Tensor]:
        """
        Run stages `start .. end - 1` only (PFENet-style methods run `layer4` on masked `layer3` support features),
        without autograd when frozen and in chunks of `max_chunk` images when that applies.

        Args:
            x (`torch.Tensor` of shape `(batch_size, channels, height, width)`):
                Input of stage `start`: the image for `start=0`, else the output of stage `start - 1`.
            start (`int`): first stage to run, `0 <= start <= end`.
            end (`int`): one past the last stage to run, `end <= 5`.

        Returns:
            `list[torch.Tensor]`: the outputs of stages `start .. end - 1` (empty when `start == end`).

        Raises:
            `ValueError`: when `start` / `end` are out of range.
        """
        if not 0 <= start <= end <= self.num_stages:
            raise ValueError(f"Need 0 <= start <= end <= {self.num_stages}, got start={start}, end={end}.")
        cache = self.feature_cache
        if cache is not None and start == 0 and end > 0 and cache.serves(self):
            keys = cache.keys_of(x)
            if keys is not None:
                stages = end if self.outputs_feed_next_stage else self.num_stages
                return cache.forward(self, x, stages, keys, self._forward_stages)[:end]
        return self._forward_stages(x, start, end)

    def _forward_stages(self, x: torch.Tensor, start: int, end: int) -> list[torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            chunk = self.max_chunk(x, start, end)
            if chunk >= x.shape[0]:
                return self._run_stages(x, start, end)
            pieces = [self._run_stages(part, start, end) for part in x.split(chunk)]
            return [torch.cat(outputs) for outputs in zip(*pieces)]

    def _run_stages(self, x: torch.Tensor, start: int, end: int) -> list[torch.Tensor]:
        outputs = []
        for index in range(start, end):
            x = getattr(self, f"layer{index}")(x)
            outputs.append(x)
        return outputs

    def max_chunk(self, x: torch.Tensor, start: int, end: int) -> int:
        """
        How many images of `x` one call runs at once.

        The chunking rule: on CPU, when the call builds no autograd graph and no BN layer uses batch statistics
        (so images are independent and the result is bit-identical), split the batch so that the largest
        activation of a chunk stays under `CPU_CHUNK_BYTES` (32 MiB, glibc's largest mmap threshold), at least one
        image per chunk. Everywhere else (GPU, whose caching allocator makes large batches free; training with
        gradients; BN in train mode; `chunk_on_cpu=False`) the whole batch runs in one call.
        """
        batch_size = x.shape[0]
        if (
            not self.chunk_on_cpu
            or batch_size <= 1
            or x.device.type != "cpu"
            or torch.is_grad_enabled()
            or any(m.training for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
        ):
            return batch_size
        return min(batch_size, max(1, CPU_CHUNK_BYTES // max(1, self.activation_bytes(x, start, end))))

    def min_input_size(self) -> tuple[int, int]:
        """
        The smallest `(height, width)` of an image that every convolution and pooling of the stages maps to at
        least one pixel (torch's output-size rules, `ceil_mode` included), found by walking them back from a
        one-pixel output. Derived from the modules, so it follows the configuration: `(1, 1)` for the padded
        ResNets and VGG16BN's ceil-mode pools, `(8, 8)` for SMCP's dilated VGG-16 (three floor-mode 2x2 pools).
        The layers are taken as one chain, exact for these backbones (a ResNet's parallel shortcut maps one pixel
        to one like its main path).
        """
        layers = [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))]
        sides = [1, 1]
        for layer in reversed(layers):
            sides = [_input_side(layer, axis, side) for axis, side in enumerate(sides)]
        return sides[0], sides[1]

    def activation_bytes(self, x: torch.Tensor, start: int, end: int) -> int:
        """Bytes of the largest stage activation for one image of `x` (stages `start .. end - 1`)."""
        height, width = x.shape[-2:]
        input_stride = self.strides[start - 1] if start > 0 else 1
        largest = 0
        for index in range(start, end):
            scale = self.strides[index] // input_stride
            size = self.channels[index] * -(-height // scale) * -(-width // scale)
            largest = max(largest, size * (self.stem_expansion if index == 0 else 1))
        return largest * x.element_size()


def _pair(value, axis: int) -> int:
    return value[axis] if isinstance(value, (tuple, list)) else value


def _output_side(layer: nn.Module, axis: int, side: int) -> int:
    """Output side of a `Conv2d`, `MaxPool2d` or `AvgPool2d` along `axis` for an input side `side` (torch's rule)."""
    if getattr(layer, "padding", 0) == "same":
        return side
    padding = 0 if layer.padding == "valid" else _pair(layer.padding, axis)
    kernel, stride = _pair(layer.kernel_size, axis), _pair(layer.stride, axis)
    dilation = _pair(getattr(layer, "dilation", 1), axis)
    span = side + 2 * padding - dilation * (kernel - 1) - 1
    if not getattr(layer, "ceil_mode", False):
        return span // stride + 1
    out = -(-span // stride) + 1
    # torch drops a last window that would start in the right padding only.
    return out - 1 if (out - 1) * stride >= side + padding else out


def _input_side(layer: nn.Module, axis: int, wanted: int) -> int:
    """The smallest input side along `axis` whose output side through `layer` is at least `wanted`."""
    side = 1
    while _output_side(layer, axis, side) < wanted:
        side += 1
    return side
