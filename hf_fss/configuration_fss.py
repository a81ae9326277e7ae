"""Configuration shared by every few-shot segmentation model of hf_fss."""

import dataclasses
import difflib
from typing import Literal, get_args

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

# ImageNet weights each backbone starts from when `use_pretrained_backbone=True` and no path is given, keyed by
# (backbone, ResNet stem). Hub repos in safetensors: transformers' ResNet layout (7x7 stem only) for ResNets,
# torchvision's layout (as kept by timm) for VGG. PSPNet's deep-stem ImageNet ResNets have no Hub release, so the
# deep stem needs an explicit `pretrained_backbone_name_or_path`.
DEFAULT_BACKBONE_WEIGHTS = {
    ("resnet50", "7x7"): "microsoft/resnet-50",
    ("resnet101", "7x7"): "microsoft/resnet-101",
    ("resnet50", "deep"): None,
    ("resnet101", "deep"): None,
    ("vgg16_bn", None): "timm/vgg16_bn.tv_in1k",
    ("vgg16_dilated", None): "timm/vgg16.tv_in1k",
}
# Keyword arguments PreTrainedConfig consumes in `__post_init__` without being attributes of the class (the Hub's
# bookkeeping, attention settings, custom pipelines / remote-code maps). Anything else that is neither a field nor a
# PreTrainedConfig attribute is a misspelt field.
_PRETRAINED_CONFIG_KWARGS = frozenset(
    {
        "_name_or_path",
        "_commit_hash",
        "attn_implementation",
        "experts_implementation",
        "_attn_implementation_internal",
        "_experts_implementation_internal",
        "custom_pipelines",
        "auto_map",
    }
)
_PRETRAINED_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(PreTrainedConfig))
Backbone = Literal["resnet50", "resnet101", "vgg16_bn", "vgg16_dilated"]
BACKBONES = get_args(Backbone)


@strict(accept_kwargs=True)
class FewShotSegmentationConfig(PreTrainedConfig):
    r"""
    Fields every hf_fss method shares. Method configs subclass it and add their own.

    backbone (`str`, *optional*, defaults to `"resnet50"`):
        Feature extractor: `"resnet50"`, `"resnet101"` (dilated, output stride 8), `"vgg16_bn"` (PFENet's five
        stages) or `"vgg16_dilated"` (SMCP's DeepLab-LargeFOV encoder).
    backbone_kwargs (`dict`, *optional*):
        Architecture overrides passed to the backbone constructor, e.g. `{"stem": "7x7"}` for the torchvision-style
        ResNet stem instead of PSPNet's deep 3x3 stem, or `{"base_width": 8, "depths": [1, 1, 1, 1]}` for a tiny
        test model.
    use_pretrained_backbone (`bool`, *optional*, defaults to `False`):
        The backbone starts from ImageNet weights: `model.load_pretrained_extractors()` loads them (the trainer calls
        it once when it builds a model from a config). Building a model never loads them and `from_pretrained` never
        does (its checkpoint holds the backbone); the flag stays in a saved config as the record of where the
        backbone came from.
    pretrained_backbone_name_or_path (`str`, *optional*):
        Hub repo id or local folder / safetensors file of those ImageNet weights; defaults per backbone
        (`microsoft/resnet-50`, `microsoft/resnet-101`, ...).
    freeze_backbone (`bool`, *optional*, defaults to `True`):
        Keep backbone weights fixed (no gradients), as all four papers do.
    freeze_backbone_batchnorm (`bool`, *optional*, defaults to `True`):
        Keep the backbone's batch-norm layers in eval mode during training so their running statistics stay fixed.
    chunk_extractors_on_cpu (`bool`, *optional*, defaults to `True`):
        On CPU, run frozen extractors over a stack of images (supports of a K-shot episode, a batch in evaluation)
        in chunks whose activations stay under glibc's mmap threshold (bit-identical results, no page-fault storm;
        see `hf_fss.backbones.StagedBackbone.max_chunk`). No effect on GPU or with gradients.
    image_size (`int`, *optional*, defaults to 473):
        Side of the square inputs the model is trained and evaluated on.
    ignore_index (`int`, *optional*, defaults to 255):
        Label value excluded from losses and metrics.
    """

    model_type = "few_shot_segmentation"

    backbone: Backbone = "resnet50"
    backbone_kwargs: dict | None = None
    use_pretrained_backbone: bool = False
    pretrained_backbone_name_or_path: str | None = None
    freeze_backbone: bool = True
    freeze_backbone_batchnorm: bool = True
    chunk_extractors_on_cpu: bool = True
    image_size: int = 473
    ignore_index: int = 255

    def __post_init__(self, **kwargs):
        check_unknown_config_fields(type(self), kwargs)
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """
        `PreTrainedConfig.from_dict`, where a keyword argument that is no field (`from_pretrained(path, image_sise=97)`)
        is a `ValueError` naming it, as in the constructor, instead of being dropped. A caller that asks for the
        unused ones (`return_unused_kwargs=True`: a model's `from_pretrained` handing them to the model) gets them.
        """
        if kwargs.get("return_unused_kwargs", False):
            return super().from_dict(config_dict, **kwargs)
        config, unused = super().from_dict(config_dict, return_unused_kwargs=True, **kwargs)
        check_unknown_config_fields(cls, unused)
        return config

    def validate_image_size(self):
        """Part of `@strict` validation."""
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {self.image_size}")

    @property
    def backbone_weights(self) -> str:
        """Where ImageNet weights for the backbone come from."""
        if self.pretrained_backbone_name_or_path:
            return self.pretrained_backbone_name_or_path
        stem = (self.backbone_kwargs or {}).get("stem", "deep") if self.backbone.startswith("resnet") else None
        default = DEFAULT_BACKBONE_WEIGHTS.get((self.backbone, stem))
        if default is None:
            raise ValueError(
                f"no Hub ImageNet weights are known for backbone={self.backbone!r} with stem={stem!r}: set "
                "pretrained_backbone_name_or_path to a folder or safetensors file of PSPNet's deep-stem ResNet "
                'weights, or use backbone_kwargs={"stem": "7x7"} to start from microsoft/resnet-50 / -101'
            )
        return default


def _is_pretrained_config_attribute(name: str) -> bool:
    value = getattr(PreTrainedConfig, name, None)
    return name in _PRETRAINED_CONFIG_KWARGS or (value is not None and not callable(value))


def check_unknown_config_fields(config_class: type, kwargs: dict) -> None:
    """
    Refuse keyword arguments that are neither a field of `config_class` nor one PreTrainedConfig understands itself
    (`architectures`, `dtype`, `return_dict`, `transformers_version`, ...): a misspelt field (`image_sise`) must not
    load silently with the default.

    Raises:
        `ValueError`: naming every unknown field, with the closest field name when there is one.
    """
    field_names = sorted(f.name for f in dataclasses.fields(config_class))
    unknown = sorted(name for name in kwargs if name not in field_names and not _is_pretrained_config_attribute(name))
    if not unknown:
        return
    own = [name for name in field_names if name not in _PRETRAINED_CONFIG_FIELDS]
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, own, n=1) or difflib.get_close_matches(name, field_names, n=1)
        hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    raise ValueError(
        f"{config_class.__name__} got unknown field(s) {', '.join(hints)}; its own fields are: {', '.join(own)} "
        "(besides PreTrainedConfig's)"
    )
