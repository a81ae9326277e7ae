"""Configuration shared by every few-shot segmentation model of hf_fss."""

import dataclasses
import difflib
import math
import numbers
import os
from typing import ClassVar, Literal, get_args

import torch
from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
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


class ConfigFieldError(ValueError):
    """A config that cannot load, in one line naming its source (`folder/config.json`) and the field at fault."""

    def __init__(self, detail: str, source=None):
        self.detail = detail
        super().__init__(f"{_config_source(source)}: {detail}; fix config.json or the keyword argument")


@strict(accept_kwargs=True)
class FewShotSegmentationConfig(PreTrainedConfig):
    r"""
    Fields every hf_fss method shares. Method configs subclass it and add their own.

    backbone (`str`, *optional*, defaults to `"resnet50"`):
        Feature extractor: `"resnet50"`, `"resnet101"` (dilated, output stride 8), `"vgg16_bn"` (PFENet's five
        stages) or `"vgg16_dilated"` (SMCP's DeepLab-LargeFOV encoder); or the Hub id / local folder of a
        transformers backbone (`"facebook/dinov2-small"`), whose config.json is read once (`AutoConfig`, no weights)
        into `backbone_config`; None when `backbone_config` alone gives the architecture. See docs/backbones.md.
    backbone_config (`dict`, *optional*):
        transformers' convention: the config of a transformers backbone (DINOv2, DINOv3 ViT / ConvNeXt, ConvNeXt,
        ResNet; a dict with `model_type`, or a `PreTrainedConfig`), built with `AutoBackbone.from_config`. Its
        `out_indices` / `out_features` (four) end the stages `layer1..layer4`; without them a ViT's quarters of its
        depth, a conv net's four stages. Kept as a dict, so a saved config.json is self-contained.
    backbone_kwargs (`dict`, *optional*):
        Architecture overrides passed to the backbone constructor, e.g. `{"stem": "7x7"}` for the torchvision-style
        ResNet stem instead of PSPNet's deep 3x3 stem, or `{"base_width": 8, "depths": [1, 1, 1, 1]}` for a tiny
        test model; for a transformers backbone, fields of `backbone_config` to override.
    use_pretrained_backbone (`bool`, *optional*, defaults to `False`):
        The backbone starts from ImageNet weights: `model.load_pretrained_extractors()` loads them (the trainer calls
        it once when it builds a model from a config). Building a model never loads them and `from_pretrained` never
        does (its checkpoint holds the backbone); the flag stays in a saved config as the record of where the
        backbone came from.
    pretrained_backbone_name_or_path (`str`, *optional*):
        Hub repo id or local folder / safetensors file of those ImageNet weights; defaults per backbone
        (`microsoft/resnet-50`, `microsoft/resnet-101`, ...; a transformers backbone's: the Hub id / folder in
        `backbone`).
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
    loaded_pretrained_weights (`dict`, *optional*):
        Written by the model, not by a user: extractor name -> the Hub id / folder whose weights
        `model.load_pretrained_extractors()` loaded into it (`{}`: none, random initialisation). A freshly built
        model resets it to `{}`; `save_pretrained` writes it and `from_pretrained` keeps the saved one, so the model
        card states where the saved weights came from. `None` (a config on its own, or a folder saved before the
        record existed): the card states what the config asks for.
    """

    model_type = "few_shot_segmentation"
    # Sequence fields a method keeps as tuples: config.json gives lists (JSON has no tuple), and a loaded config must
    # equal the saved one.
    tuple_fields = ()
    # The hf_fss backbone names this method takes (any transformers backbone besides).
    builtin_backbones: ClassVar[tuple[str, ...]] = BACKBONES

    backbone: str | None = "resnet50"
    backbone_config: dict | PreTrainedConfig | None = None
    backbone_kwargs: dict | None = None
    use_pretrained_backbone: bool = False
    pretrained_backbone_name_or_path: str | None = None
    freeze_backbone: bool = True
    freeze_backbone_batchnorm: bool = True
    chunk_extractors_on_cpu: bool = True
    image_size: int = 473
    ignore_index: int = 255
    loaded_pretrained_weights: dict | None = None

    def __post_init__(self, **kwargs):
        for name in self.tuple_fields:
            setattr(self, name, tuple(getattr(self, name)))
        check_unknown_config_fields(type(self), kwargs)
        self.backbone, self.backbone_config = resolve_backbone_fields(self, "backbone", self.backbone_config)
        check_dtype_name(self.dtype)  # PreTrainedConfig looks it up in torch and fails with an AttributeError
        super().__post_init__(**kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`PreTrainedConfig.from_pretrained`, whose errors name the config.json (see `from_dict`)."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except ConfigFieldError as err:  # `from_dict` is not told the source here: name it now
            raise ConfigFieldError(err.detail, pretrained_model_name_or_path) from None

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """
        `PreTrainedConfig.get_config_dict`, refusing a config.json written for another method (transformers only
        logs a warning and the fields then fail one by one).

        Raises:
            `ValueError`: one line naming the config.json, its `model_type` and the class that loads it.
        """
        config_dict, unused = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        found = config_dict.get("model_type")
        if found is not None and found != cls.model_type and cls is not FewShotSegmentationConfig:
            raise ValueError(
                f"{_config_source(pretrained_model_name_or_path)} has model_type {found!r}, not {cls.model_type!r}: "
                f"{_loader_hint(found)}"
            )
        return config_dict, unused

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """
        `PreTrainedConfig.from_dict`, where a keyword argument that is no field (`from_pretrained(path, image_sise=97)`)
        is a `ValueError` naming it, as in the constructor, instead of being dropped. A caller that asks for the
        unused ones (`return_unused_kwargs=True`: a model's `from_pretrained` handing them to the model) gets them.

        Raises:
            `ValueError`: one line naming the config's source (the `config.json` loaded) and the field that is
                unknown, null where a value is needed, of the wrong type or out of range (including NaN).
        """
        source = kwargs.get("name_or_path") or config_dict.get("_name_or_path") or config_dict.get("name_or_path")
        try:
            if kwargs.get("return_unused_kwargs", False):
                return super().from_dict(config_dict, **kwargs)
            config, unused = super().from_dict(config_dict, return_unused_kwargs=True, **kwargs)
            check_unknown_config_fields(cls, unused)
        except (StrictDataclassError, ValueError) as err:
            raise ConfigFieldError(
                " ".join(line.strip() for line in str(err).splitlines() if line.strip()), source
            ) from None
        return config

    def validate_image_size(self):
        """Part of `@strict` validation."""
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {self.image_size}")

    def validate_finite(self):
        """Part of `@strict` validation: no field (of any method) holds NaN or infinity, alone or in a sequence."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name, None)
            items = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, numbers.Real) and not math.isfinite(v) for v in items):
                raise ValueError(f"{field.name} must hold finite numbers, got {value!r}")

    @property
    def uses_transformers_backbone(self) -> bool:
        """Whether the backbone is a transformers `AutoBackbone` (`backbone_config`), not an hf_fss name."""
        return self.backbone_config is not None

    @property
    def backbone_weights(self) -> str:
        """Where pretrained weights for the backbone come from."""
        if self.pretrained_backbone_name_or_path:
            return self.pretrained_backbone_name_or_path
        if self.uses_transformers_backbone:
            if self.backbone is None:
                raise ValueError(
                    "backbone_config gives the architecture but no weights are named: set "
                    "pretrained_backbone_name_or_path (or backbone) to the Hub id or folder of its checkpoint"
                )
            return self.backbone
        stem = (self.backbone_kwargs or {}).get("stem", "deep") if self.backbone.startswith("resnet") else None
        default = DEFAULT_BACKBONE_WEIGHTS.get((self.backbone, stem))
        if default is None:
            raise ValueError(
                f"no Hub ImageNet weights are known for backbone={self.backbone!r} with stem={stem!r}: set "
                "pretrained_backbone_name_or_path to a folder or safetensors file of PSPNet's deep-stem ResNet "
                'weights, or use backbone_kwargs={"stem": "7x7"} to start from microsoft/resnet-50 / -101'
            )
        return default


class BackboneFieldError(StrictDataclassError, ValueError):
    """A backbone field that cannot be resolved, in one line; a `StrictDataclassError` like every other field check."""


def resolve_backbone_fields(
    config, field: str, backbone_config, builtin: tuple[str, ...] | None = None
) -> tuple[str | None, dict | None]:
    """
    Part of a config's `__post_init__`: the backbone field `field` (`backbone`, QGNet's `prior_extractor_backbone`)
    and its transformers config. A built-in name stays as it is; a Hub id or local folder has its config.json read
    once (`AutoConfig`) into the returned dict; a given config is checked and kept as a dict (its `model_type`, four
    `out_indices`), with a built-in default name replaced by None (the architecture comes from the config).

    Raises:
        `BackboneFieldError` (a `ValueError`): one line: an unknown name that is neither a folder nor a Hub id, a
            folder that does not exist or is no backbone, a built-in name besides a config, `out_indices` of the
            wrong count. `builtin` (the names the field takes) defaults to the config's `builtin_backbones`.
    """
    try:
        return _resolve_backbone_fields(config, field, backbone_config, builtin)
    except BackboneFieldError:
        raise
    except ValueError as error:
        raise BackboneFieldError(str(error)) from None


def _resolve_backbone_fields(config, field, backbone_config, builtin) -> tuple[str | None, dict | None]:
    from .backbones.transformers_backbone import backbone_config_dict, resolve_backbone_config

    name = getattr(config, field)
    builtin = config.builtin_backbones if builtin is None else builtin
    config_field = "backbone_config" if field == "backbone" else field.replace("_backbone", "_config")
    if backbone_config is not None:
        if name in builtin:
            default = next(f.default for f in dataclasses.fields(config) if f.name == field)
            if name != default:
                raise ValueError(
                    f"{field}={name!r} and {config_field} both name an architecture; keep one (with {config_field}, "
                    f"{field} may be its Hub id / folder, the weights' source)"
                )
            name = None
        return name, backbone_config_dict(backbone_config, config_field)
    if name in builtin:
        return name, None
    if name is None:
        names = ", ".join(builtin)
        raise ValueError(f"{field} is None: give a backbone name ({names}), a Hub id / folder or {config_field}")
    looks_local = name.startswith((".", "/", "~")) or os.sep in name.replace("/", "") or os.path.isabs(name)
    if not os.path.isdir(name) and (looks_local or name.count("/") != 1):
        kind = "folder not found" if looks_local else "unknown backbone"
        raise ValueError(
            f"{field}: {kind}; expected one of {', '.join(builtin)}, a transformers backbone's Hub id (org/name, e.g. "
            f"facebook/dinov2-small) or an existing local folder with its config.json; got {name}"
        )
    return name, resolve_backbone_config(name, field)


def check_positive(config: FewShotSegmentationConfig, *names: str, hint: str = "") -> None:
    """
    Part of a method's `@strict` validation: each named field (a size, a count, a rate or a temperature) is above 0.

    Raises:
        `ValueError`: naming the first field that is not, its value and `hint` (appended as it is).
    """
    for name in names:
        if getattr(config, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}{hint}")


def check_non_negative(config: FewShotSegmentationConfig, *names: str, hint: str = "") -> None:
    """
    Part of a method's `@strict` validation: each named field (a loss weight, a momentum, a depth) is 0 or more.

    Raises:
        `ValueError`: naming the first field that is not, its value and `hint` (appended as it is).
    """
    for name in names:
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be non-negative, got {getattr(config, name)}{hint}")


def check_dropout(config: FewShotSegmentationConfig, *names: str) -> None:
    """
    Part of a method's `@strict` validation: each named field is a dropout rate in [0, 1).

    Raises:
        `ValueError`: naming the first field that is not and its value.
    """
    for name in names:
        if not 0.0 <= getattr(config, name) < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {getattr(config, name)}")


def check_pyramid_bins(pyramid_bins: tuple[int | float, ...]) -> None:
    """
    Part of `@strict` validation of the methods built on PFENet's feature enrichment module (`pyramid_bins`): a
    non-empty sequence of positive scales, those above 1 whole pool sizes (the fractions <= 1 scale the feature size).

    Raises:
        `ValueError`: naming `pyramid_bins` and its value.
    """
    if not pyramid_bins or any(b <= 0 for b in pyramid_bins):
        raise ValueError(f"pyramid_bins must be a non-empty sequence of positive values, got {pyramid_bins}")
    if any(b > 1 and b != int(b) for b in pyramid_bins):
        raise ValueError(f"pyramid_bins above 1 are pool sizes and must be whole numbers, got {pyramid_bins}")


def check_dtype_name(dtype) -> None:
    """
    Raises:
        `ValueError`: `dtype` is neither None, "auto", a `torch.dtype` nor the name of one (`"bfloat16"`), or names
            one that is not floating point (`"int8"`: the pipeline would silently fall back to float32).
    """
    if dtype is None or dtype == "auto":
        return
    wanted = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(wanted, torch.dtype):
        raise ValueError(f"dtype must name a torch dtype such as 'float32' or 'bfloat16', got {dtype!r}")
    if not wanted.is_floating_point:
        raise ValueError(
            f"dtype must be a floating-point torch dtype such as 'float32' or 'bfloat16' (the model's weights), "
            f"got {dtype!r}"
        )


def _method_config_classes() -> dict[str, type[FewShotSegmentationConfig]]:
    """
    The config class of every hf_fss method by `model_type`: the subclasses defined in `hf_fss.models`, all imported
    by the package top, which any `import hf_fss...` runs first. Found through the class hierarchy rather than the
    registry `hf_fss.models.MODEL_CLASSES`, whose import would close a circle (every method imports this module); a
    user's or a test's own subclasses are no hf_fss model.
    """
    found, pending = {}, [FewShotSegmentationConfig]
    while pending:
        for subclass in pending.pop().__subclasses__():
            pending.append(subclass)
            if subclass.__module__.startswith(f"{__package__}.models."):
                found[subclass.model_type] = subclass
    return found


def _loader_hint(model_type: str) -> str:
    """How to load a config.json of `model_type`: its hf_fss classes, or the list of hf_fss model types."""
    # modeling_auto imported here: this module is imported when AutoConfig first is (hf_fss/__init__.py).
    from transformers import MODEL_MAPPING

    config_classes = _method_config_classes()
    if model_type in config_classes:
        config_class = config_classes[model_type]
        model_class = MODEL_MAPPING[config_class]  # AutoModel's registry, which `import hf_fss` fills
        return (
            f"load it with {model_class.__name__} / {config_class.__name__}, or with AutoModel / AutoConfig, which "
            "pick the class from model_type"
        )
    return f"it is no hf_fss model (their model types: {', '.join(sorted(config_classes))})"


def _config_source(name_or_path) -> str:
    """What a config was loaded from, for error messages: `folder/config.json`, else the repo id or "config"."""
    if not name_or_path:
        return "config"
    if os.path.isdir(str(name_or_path)):
        return os.path.join(str(name_or_path), "config.json")
    return f"config.json of {name_or_path}"


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
