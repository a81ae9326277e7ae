"""
Any transformers backbone (`AutoBackbone`: DINOv2, DINOv3 ViT / ConvNeXt, ConvNeXt, ResNet) as a five-stage hf_fss
feature extractor behind the `StagedBackbone` policy.

Levels and strides, one way for every family (docs/backbones.md, "Transformers backbones"):

- `layer0` is the backbone's embeddings (ViT: patch tokens after the patch / position embedding; ConvNeXt / ResNet:
  the stem), `layer1 .. layer4` are the four stages that end at the config's `out_indices` (ViT: groups of blocks, by
  default the quarters of the depth, e.g. blocks 3, 6, 9, 12 of DINOv2-small; ConvNeXt / ResNet: the four stages);
- every stage output is its transformers feature map (the backbone's own `apply_layernorm` / final norm /
  `hidden_states_norms` and `reshape_hidden_states` handling: `forward_stages(x, 0, end)` equals
  `AutoBackbone(x).feature_maps` resized) resized bilinearly (`hf_fss.modules.ops.resize`, `align_corners=True`) to
  the methods' grid of stride 8, `(ceil(H / 8), ceil(W / 8))`, so PFENet's `layer2 ⊕ layer3`, the decoders and the
  methods' 1/8 assumption hold unchanged whatever the patch size (14, 16) or stride (32);
- `forward_stages(x, start > 0, end)` (PFENet's `layer4` on masked `layer3`) takes a map on that grid, resizes it to
  the stage's native grid (`round(8 h / native stride)`), runs the stages and resizes their outputs back to the
  map's grid. A ViT's prefix tokens (class and register tokens) are then restarted from their embeddings (they do not
  depend on the image), so every block sees the token layout it was trained with (DINOv3's RoPE skips exactly them).
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import nn

from ..modules.ops import resize
from .staged import StagedBackbone

# model_type -> family: "vit" runs groups of blocks, "conv" runs the backbone's four stages.
FAMILIES = {
    "dinov2": "vit",
    "dinov2_with_registers": "vit",
    "dinov3_vit": "vit",
    "convnext": "conv",
    "convnextv2": "conv",
    "dinov3_convnext": "conv",
    "resnet": "conv",
}
METHOD_STRIDE = 8
# Norms the conv families create for their output stages, not part of a classification checkpoint (e.g.
# facebook/convnext-tiny-224): transformers initialises them (ones / zeros) when it loads such a checkpoint.
_OPTIONAL_KEYS = ("hidden_states_norms.",)


def _auto_config(model_type: str, values: dict, source: str = "backbone_config"):
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type, **values)
    except (StrictDataclassError, TypeError, ValueError) as error:
        # transformers names its private field ('_out_indices') and not where the value came from
        detail = " ".join(str(error).split()).replace("'_out_indices'", "'out_indices'").replace("_out_", "out_")
        raise ValueError(
            f"{source} ({model_type}): {detail}; out_indices must be four increasing stage / block indices after the "
            "stem (a conv net: [1, 2, 3, 4])"
        ) from None


def _unreadable(source: str, field: str, error: BaseException) -> ValueError:
    """One line for a backbone Hub id / folder that cannot be read, naming the field, the cause and the fix."""
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        reason = "the folder has no config.json (write it with the backbone's save_pretrained)"
    elif os.path.isdir(source):
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        reason = f"its config.json cannot be read ({first})"
    else:
        reason = (
            "no such local folder, and the Hub cannot be reached (offline, HF_HUB_OFFLINE=1) or has no such repo; "
            "give a local folder written by save_pretrained, or run with Hub access"
        )
    return ValueError(f"{field}={source!r}: {reason}")


def default_out_indices(config) -> list[int]:
    """
    `layer1 .. layer4` of a family when the config does not choose: a ViT's quarters of its depth (DINOv2-small /
    -base: blocks 3, 6, 9, 12; ViT-L: 6, 12, 18, 24), so PFENet's mid-level pair is blocks 6 and 9 and the high-level
    map (the prior's) the last block, DINOv2's most semantic one; a conv net's four stages.
    """
    if FAMILIES[config.model_type] == "vit":
        depth = config.num_hidden_layers
        return [max(1, round(depth * q / 4)) for q in (1, 2, 3)] + [depth]
    return [1, 2, 3, 4]


def backbone_config_dict(backbone_config, source: str = "backbone_config", keep_out_indices: bool = True) -> dict:
    """
    A transformers backbone config (dict or `PreTrainedConfig`) checked and turned into the JSON dict kept in
    `FewShotSegmentationConfig.backbone_config`, with four `out_indices` (the family's defaults when it gives none or
    `keep_out_indices=False`).

    Raises:
        `ValueError`: one line naming `source` when the architecture is not a supported backbone or when
            `out_indices` / `out_features` do not name four increasing stages.
    """
    # A config object keeps its non-default fields only (as transformers' config.json); through JSON, so that the dict
    # equals what a saved config.json gives back (JSON has no int keys, no tuples).
    values = backbone_config.to_diff_dict() if hasattr(backbone_config, "to_diff_dict") else dict(backbone_config)
    values = json.loads(json.dumps(values))
    model_type = values.pop("model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"{source} has model_type {model_type!r}, which is no supported backbone; supported: "
            f"{', '.join(sorted(FAMILIES))} (transformers' AutoBackbone architectures hf_fss adapts)"
        )
    chosen = keep_out_indices and ("out_indices" in values or "out_features" in values)
    for key in ("transformers_version", "_name_or_path", "architectures", "stage_names"):
        values.pop(key, None)
    if not chosen:
        values.pop("out_features", None)
        values["out_indices"] = default_out_indices(_auto_config(model_type, dict(values), source))
    config = _auto_config(model_type, values, source)
    check_out_indices(config, source)
    values.update(model_type=model_type, out_indices=list(config.out_indices))
    values.pop("out_features", None)
    return json.loads(json.dumps(values))


def check_out_indices(config, source: str = "backbone_config") -> None:
    """
    Raises:
        `ValueError`: unless `out_indices` names four increasing stages after the stem (a conv net's: exactly 1..4).
    """
    indices = list(config.out_indices)
    family = FAMILIES[config.model_type]
    last = config.num_hidden_layers if family == "vit" else len(config.stage_names) - 1
    wrong = len(indices) != 4 or indices != sorted(set(indices)) or indices[0] < 1 or indices[-1] > last
    if wrong or (family == "conv" and indices != [1, 2, 3, 4]):
        expected = f"four increasing block indices in 1..{last}" if family == "vit" else "[1, 2, 3, 4]"
        raise ValueError(
            f"{source} out_indices {indices} must be {expected}: they end hf_fss's stages layer1..layer4 "
            "(out_features: the same stages by name)"
        )


def resolve_backbone_config(name_or_path: str, source: str = "backbone") -> dict:
    """
    The backbone config of a Hub id or local folder (its config.json, read once with `AutoConfig`; a Hub id needs
    the network or the local cache), as `backbone_config_dict` keeps it, with the family's default `out_indices`.

    Raises:
        `ValueError`: one line when the folder / repo has no config.json or its architecture is no supported backbone.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as error:
        raise _unreadable(name_or_path, source, error) from None
    return backbone_config_dict(config, f"{source}={name_or_path!r}", keep_out_indices=False)


def build_transformers_config(
    backbone_config: dict, overrides: dict | None = None, source: str = "backbone_config with backbone_kwargs"
):
    """The `PreTrainedConfig` of `backbone_config` with `overrides` (`backbone_kwargs`) applied and checked."""
    values = dict(backbone_config)
    model_type = values.pop("model_type")
    config = _auto_config(model_type, values, source)
    for key in overrides or {}:
        if not hasattr(config, key):
            # Usually the recipe's or a saved config's kwargs of hf_fss's own ResNet / VGG, kept when only the
            # backbone was overridden: the user never wrote them, so the fix is named.
            raise ValueError(
                f"{key!r} in backbone_kwargs / prior_extractor_kwargs (possibly from the recipe or a saved config) is "
                f"no field of {type(config).__name__}: such kwargs (base_width, depths, stem, ...) are for hf_fss's own "
                'ResNet / VGG; with a transformers backbone set "backbone_kwargs": null (or '
                '"prior_extractor_kwargs": null), or give fields of its config; a trained model\'s backbone cannot be '
                "swapped"
            )
    if overrides:
        config = _auto_config(model_type, {**values, **overrides}, source)
    check_out_indices(config, source)
    return config


class TransformersBackbone(StagedBackbone):
    """
    A transformers `AutoBackbone` (built with `AutoBackbone.from_config`, random weights; pretrained ones only through
    `load_weights`) as five stages on the methods' stride-8 grid; see the module docstring for the levels.

    Parameters live under `model.` (`backbone.model.embeddings...` in a few-shot checkpoint), so a saved model holds
    them in its safetensors and `from_pretrained` never reaches the network.

    Args:
        config (`PreTrainedConfig`): a backbone config of a supported family (`FAMILIES`) with four `out_indices`.

    Attributes:
        channels (`tuple[int, ...]`): output channels of `layer0 .. layer4` (a ViT: `hidden_size` five times).
        strides (`tuple[int, ...]`): `(8,) * 5`, the grid every output is resized to.
        native_strides (`tuple[int, ...]`): the strides the backbone computes at (ViT: the patch size).

    Example shapes for DINOv2-small and a `(1, 3, 473, 473)` input: five `(1, 384, 60, 60)` maps (native grid 33 x 33).
    """

    outputs_feed_next_stage = False

    def __init__(self, config):
        super().__init__()
        from transformers import AutoBackbone

        check_out_indices(config)
        self.family = FAMILIES[config.model_type]
        self.model = AutoBackbone.from_config(config)
        self.out_indices = tuple(config.out_indices)
        self.model.requires_grad_(True)
        if self.family == "vit":
            patch = config.patch_size
            self.patch_size = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
            self.num_prefix_tokens = 1 + getattr(config, "num_register_tokens", 0)
            self.channels = (config.hidden_size,) * 5
            self.native_strides = (self.patch_size[0],) * 5
            # The mask token serves masked-image pretraining only: out of the optimizer even when the backbone trains.
            mask_token = getattr(self._embeddings(), "mask_token", None)
            if mask_token is not None:
                mask_token.requires_grad_(False)
        else:
            self.channels = tuple(self.model.num_features)
            self.native_strides = self._conv_strides(config)
            # ConvNeXt's per-stage output norms stay fixed even when the backbone trains: a method that uses some
            # stages' outputs only (SMCP: layer4) would leave the others without a gradient.
            norms = getattr(self.model, "hidden_states_norms", None)
            if norms is not None:
                norms.requires_grad_(False)
        self.strides = (METHOD_STRIDE,) * 5
        self.stem_expansion = 4

    @staticmethod
    def _conv_strides(config) -> tuple[int, ...]:
        if config.model_type == "dinov3_convnext":  # no stem module: its stem stage is the input itself
            return (1, 4, 8, 16, 32)
        first = 2 if getattr(config, "downsample_in_first_stage", False) else 1
        return (4, 4 * first, 8 * first, 16 * first, 32 * first)

    # --- the pieces of each family -----------------------------------------------------------------------------
    def _embeddings(self) -> nn.Module:
        return self.model.embeddings

    def _blocks(self) -> nn.ModuleList:
        return self.model.model.layer if self.model.config.model_type == "dinov3_vit" else self.model.encoder.layer

    def _conv_stages(self) -> nn.ModuleList:
        return (
            self.model.model.stages if self.model.config.model_type == "dinov3_convnext" else self.model.encoder.stages
        )

    def _stem_module(self) -> nn.Module | None:
        """`layer0`'s module: the embeddings / stem (None for DINOv3 ConvNeXt, whose stem stage is the input)."""
        model_type = self.model.config.model_type
        if model_type == "dinov3_convnext":
            return None
        return self.model.embedder if model_type == "resnet" else self.model.embeddings

    def _conv_stem(self, pixel_values: torch.Tensor) -> torch.Tensor:
        stem = self._stem_module()
        return pixel_values if stem is None else stem(pixel_values)

    def _conv_output(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Stage `index`'s feature map as the transformers backbone returns it (ConvNeXt: its stage norm)."""
        norms = getattr(self.model, "hidden_states_norms", None)
        name = self.model.stage_names[index]
        return norms[name](hidden) if norms is not None and name in norms else hidden

    def _vit_output(self, index: int, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Block output `index` (0 = embeddings) as the transformers backbone returns it: normed, patch tokens only."""
        config = self.model.config
        if config.model_type == "dinov3_vit":
            if index == config.num_hidden_layers or config.apply_layernorm:
                tokens = self.model.norm(tokens)
        elif config.apply_layernorm:
            tokens = self.model.layernorm(tokens)
        patches = tokens[:, self.num_prefix_tokens :]
        return patches.reshape(patches.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()

    def _prefix_tokens(self, like: torch.Tensor) -> torch.Tensor:
        """The class / register tokens as the embeddings make them: independent of the image (one patch of zeros)."""
        pixels = like.new_zeros(1, self.model.config.num_channels, *self.patch_size)
        return self._embeddings()(pixels)[:, : self.num_prefix_tokens]

    def _rope(self, grid: tuple[int, int], like: torch.Tensor):
        if self.model.config.model_type != "dinov3_vit":
            return None
        pixels = like.new_zeros(1, 1, grid[0] * self.patch_size[0], grid[1] * self.patch_size[1])
        return self.model.rope_embeddings(pixels)

    def _run_block(self, block: nn.Module, tokens: torch.Tensor, rope) -> torch.Tensor:
        return block(tokens) if rope is None else block(tokens, position_embeddings=rope)

    # --- stages ------------------------------------------------------------------------------------------------
    def _stage_bounds(self, index: int) -> tuple[int, int]:
        """Blocks `[a, b)` of ViT stage `index` (1..4)."""
        return (0 if index == 1 else self.out_indices[index - 2]), self.out_indices[index - 1]

    def _native_grid(self, grid: tuple[int, int], stage: int) -> tuple[int, int]:
        scale = METHOD_STRIDE / self.native_strides[stage]
        return max(1, round(grid[0] * scale)), max(1, round(grid[1] * scale))

    def _run_stages(self, x: torch.Tensor, start: int, end: int) -> list[torch.Tensor]:
        if start == 0:
            grid = method_grid(*x.shape[-2:])
        else:
            grid = tuple(x.shape[-2:])
            x = resize(x, self._native_grid(grid, start - 1))
        run = self._run_vit if self.family == "vit" else self._run_conv
        return [resize(out, grid) for out in run(x, start, end)]

    def _run_conv(self, x: torch.Tensor, start: int, end: int) -> list[torch.Tensor]:
        outputs, stages = [], self._conv_stages()
        for index in range(start, end):
            x = self._conv_stem(x) if index == 0 else stages[index - 1](x)
            outputs.append(self._conv_output(index, x))
        return outputs

    def _run_vit(self, x: torch.Tensor, start: int, end: int) -> list[torch.Tensor]:
        if start == 0:
            grid = (x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1])
            rope = self._rope(grid, x) if end > 1 else None
            if self.model.config.model_type == "dinov3_vit":  # as DINOv3ViTBackbone.forward
                x = x.to(self._embeddings().patch_embeddings.weight.dtype)
            tokens = self._embeddings()(x)
            outputs = [self._vit_output(0, tokens, grid)]
            first = 1
        else:
            grid = tuple(x.shape[-2:])
            rope = self._rope(grid, x)
            patches = x.flatten(2).transpose(1, 2)
            tokens = torch.cat([self._prefix_tokens(patches).expand(len(x), -1, -1).to(patches.dtype), patches], 1)
            outputs, first = [], start
        blocks = self._blocks()
        for index in range(first, end):
            lower, upper = self._stage_bounds(index)
            for block in blocks[lower:upper]:
                tokens = self._run_block(block, tokens, rope)
            outputs.append(self._vit_output(upper, tokens, grid))
        return outputs

    def stage_modules(self, index: int) -> list[nn.Module]:
        """The blocks of ViT stage `index` (the norms are shared by the stages), or conv stage `index` and its norm."""
        if index == 0:
            return [] if self._stem_module() is None else [self._stem_module()]
        if self.family == "vit":
            lower, upper = self._stage_bounds(index)
            return list(self._blocks()[lower:upper])
        norms = getattr(self.model, "hidden_states_norms", None)
        name = self.model.stage_names[index]
        return [self._conv_stages()[index - 1]] + ([norms[name]] if norms is not None and name in norms else [])

    def restore_computed_buffers(self) -> None:
        """
        Recompute the non-persistent buffers (DINOv3's RoPE frequencies) that `from_pretrained` of a few-shot model
        leaves uninitialised (they are in no checkpoint), with transformers' own `_init_weights` of the backbone,
        on the parameter-free modules that hold them only.
        """
        for module in self.model.modules():
            if module._non_persistent_buffers_set and not any(True for _ in module.parameters(recurse=False)):
                self.model._init_weights(module)

    # --- policy hooks ------------------------------------------------------------------------------------------
    def activation_bytes(self, x: torch.Tensor, start: int, end: int) -> int:
        """
        Bytes of the largest activation for one image of `x`: the outputs on the stride-8 grid, and inside the
        stages (a ViT's MLP hidden layer and attention scores over its tokens; a conv net's stages at 4x their
        width, ConvNeXt's inverted bottleneck).
        """
        height, width = x.shape[-2:]
        if start > 0:
            height, width = height * METHOD_STRIDE, width * METHOD_STRIDE
        grid = math.prod(method_grid(height, width))
        largest = max(self.channels[i] for i in range(start, end)) * grid
        config = self.model.config
        if self.family == "vit":
            tokens = (height // self.patch_size[0]) * (width // self.patch_size[1]) + self.num_prefix_tokens
            inner = getattr(config, "intermediate_size", None) or config.hidden_size * getattr(config, "mlp_ratio", 4)
            largest = max(largest, tokens * inner, config.num_attention_heads * tokens * tokens)
        else:
            for index in range(max(start, 1), end):
                side = self.native_strides[index]
                largest = max(largest, 4 * self.channels[index] * -(-height // side) * -(-width // side))
        return largest * x.element_size()

    def load_weights(self, name_or_path: str, revision: str | None = None, moco_encoder: str = "encoder_k") -> None:
        """
        Load pretrained weights in place from a Hub id or a local folder of a transformers checkpoint of the same
        architecture (the backbone class's `from_pretrained`, safetensors only; a base model's or classification model's
        checkpoint works: transformers strips its prefix). Every weight of the backbone must be found, except the
        stage norms a ConvNeXt classification checkpoint lacks (initialised as transformers does).

        Raises:
            `ValueError`: one line when the folder / repo is of another architecture, lacks weights or holds weights
                of other shapes.
        """
        source = str(name_or_path)
        config = self.model.config
        found = _source_model_type(source, revision)
        if found != config.model_type:
            raise ValueError(
                f"{source} holds a {found!r} model, but this backbone is {config.model_type!r}: give a checkpoint of "
                "the architecture in backbone_config (or change backbone to that checkpoint)"
            )
        try:
            # The backbone's own class: transformers 5's AutoBackbone.from_pretrained asks the Hub whether a repo exists
            # even for a local folder (and takes a folder for a timm name when offline).
            loaded, info = type(self.model).from_pretrained(
                source, config=config, revision=revision, use_safetensors=True, output_loading_info=True
            )
        except (OSError, ValueError, RuntimeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"{source}: cannot load its weights into the {config.model_type} backbone ({first})"
            ) from None
        missing = [k for k in info["missing_keys"] if not k.startswith(_OPTIONAL_KEYS)]
        problems = missing + [k for k, *_ in info.get("mismatched_keys", [])]
        if problems:
            raise ValueError(
                f"{source} lacks or mis-shapes {len(problems)} weight(s) of the {config.model_type} backbone "
                f"(e.g. {sorted(problems)[:3]}); its config.json differs from backbone_config (sizes, depth)"
            )
        self.model.load_state_dict(loaded.state_dict(), strict=True)
        self.weights_source = source

    def extra_repr(self) -> str:
        return f"model_type={self.model.config.model_type!r}, out_indices={self.out_indices}"


def _source_model_type(source: str, revision: str | None) -> str | None:
    """The `model_type` in the config.json of a folder or Hub repo (None when it has none)."""
    path = os.path.join(source, "config.json")
    try:
        if not os.path.isdir(source):
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(source, "config.json", revision=revision)
        elif not os.path.isfile(path):
            raise FileNotFoundError(path)
    except OSError as error:  # huggingface_hub's offline / missing-repo errors are OSErrors
        raise _unreadable(
            source, "pretrained backbone weights (pretrained_backbone_name_or_path, else backbone)", error
        ) from None
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle).get("model_type")
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error})") from None


def method_grid(height: int, width: int) -> tuple[int, int]:
    """The methods' stride-8 grid of an image: `(ceil(height / 8), ceil(width / 8))`."""
    return math.ceil(height / METHOD_STRIDE), math.ceil(width / METHOD_STRIDE)
