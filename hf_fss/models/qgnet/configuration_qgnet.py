"""Configuration of QGNet (Liu et al., "Few-Shot Segmentation with Global and Local Contrastive Learning", 2021)."""

from typing import Literal, get_args

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ...backbones.weights import MOCO_ENCODERS
from ...configuration_fss import (
    FewShotSegmentationConfig,
    check_dropout,
    check_non_negative,
    check_positive,
    check_pyramid_bins,
    resolve_backbone_fields,
)

QGNetBackbone = Literal["resnet50", "resnet101", "vgg16_bn"]
PriorExtractorBackbone = Literal["resnet50", "resnet101"]
RegionProjection = Literal["learned", "raw"]


@strict(accept_kwargs=True)
class QGNetConfig(FewShotSegmentationConfig):
    r"""
    Configuration of [`QGNetModel`], the Query Guided Network.

    The defaults reproduce the official code (github.com/liuweide01/QGNet-Few-shot-segmentation,
    `model/PFENet_QGNet.py`) so that converted official checkpoints give the official numbers: deep-stem ResNet-50
    backbone, a ResNet-50 prior extractor with the 7x7 stem and the same dilations, the learned 3x3 projections before
    the prior region map. Where the paper says something else, the paper's form is an option; the full list is
    `DIFFERENCES_FROM_OFFICIAL_CODE` in `hf_fss.models.qgnet.modeling_qgnet`.

    Prior extractor (a second, frozen feature extractor pretrained without labels; it sees the query only):

    prior_extractor_backbone (`str`, *optional*, defaults to `"resnet50"`):
        `"resnet50"` or `"resnet101"` (a dilated `DilatedResNet`), or the Hub id / local folder of a transformers
        backbone (`"facebook/dinov2-small"`: a self-supervised extractor, QGNet's idea, in one line), read once into
        `prior_extractor_config` as `backbone` is into `backbone_config`; its weights then default to that id
        (`prior_extractor_weights`). See docs/backbones.md.
    prior_extractor_config (`dict`, *optional*):
        The prior extractor as a transformers backbone config (as `backbone_config`), e.g. random DINOv2 weights.
    prior_extractor_kwargs (`dict`, *optional*, defaults to `{"stem": "7x7"}`):
        Architecture arguments of the prior extractor (`stem`, `base_width`, `depths`, `output_stride`, `conv_init`);
        for a transformers prior extractor, fields of `prior_extractor_config` to override (default none).
        Without `output_stride` it takes the backbone's stage-4 stride when that is 8, 16 or 32 (8 for the dilated
        ResNets, 16 for VGG-16-BN), so both maps have the same resolution as in the official code.
    prior_extractor_weights (`str`, *optional*):
        Where the prior extractor's pretrained weights come from when a training run starts from a config
        (`model.load_pretrained_extractors()`): a Hub repo id or a local folder holding `model.safetensors` (e.g.
        what `scripts/pretrain_prior.py` exports: hf_fss stage names `layer0.conv1.weight`, `layer1.0.conv1.weight`,
        ...), a `.safetensors` file, or a MoCo training checkpoint saved as safetensors (`[module.]encoder_k.*`).
        Convert a pickled MoCo `.pth.tar` first with `scripts/convert_original_checkpoint.py --model-type qgnet`.
        `None`: the prior extractor stays at its random initialisation (`from_pretrained` always reads it from the
        checkpoint).
    prior_extractor_moco_encoder (`str`, *optional*, defaults to `"encoder_k"`):
        The encoder taken from a MoCo checkpoint: `"encoder_k"` (the momentum encoder, as the official loader) or
        `"encoder_q"` (as MoCo's linear evaluation).
    prior_extractor_weights_if_missing (`str`, *optional*, defaults to `"error"`):
        When `prior_extractor_weights` is a local path that does not exist: `"error"` (raise) or `"random"` (keep the
        random prior extractor, log it and record `prior_extractor_weights=None` in the config, so that the saved
        config and the model card say so). The synthetic quickstart uses `"random"`.
    freeze_prior_extractor_batchnorm (`bool`, *optional*, defaults to `True`):
        Keep the prior extractor's batch norms in eval mode during training. The official code trains with them in
        train mode (batch statistics, drifting running statistics); `False` reproduces that. The backbone's own policy
        is `freeze_backbone_batchnorm`.

    Architecture:

    reduce_dim (`int`, *optional*, defaults to 256):
        Channels of the reduced mid-level features, of the support prototype, of the two projections and of the
        decoder.
    region_projection (`str`, *optional*, defaults to `"learned"`):
        `"learned"` (official code): the prior region map compares `bridge_projection(backbone layer 4)` with
        `prior_projection(prior extractor layer 4)`, two trainable `Conv2d(C4 -> reduce_dim, 3x3) + ReLU +
        Dropout2d(projection_dropout)`. `"raw"` (paper, Eq. 8): the raw stage-4 features of both extractors (they
        must have the same channel count).
    projection_dropout (`float`, *optional*, defaults to 0.5):
        `Dropout2d` rate after the two projections.
    pyramid_bins (`tuple[int | float, ...]`, *optional*, defaults to `(60, 30, 15, 8)`):
        Scales of PFENet's feature enrichment module; a value `> 1` is a fixed pool size, `<= 1` a fraction of the
        feature size.
    prior_eps (`float`, *optional*, defaults to 1e-7):
        Epsilon of both region maps (cosine denominator and min-max normalisation), as the official `cosine_eps`.
    feature_dropout (`float`, *optional*, defaults to 0.5):
        `Dropout2d` rate after `down_query` / `down_supp`.
    classifier_dropout (`float`, *optional*, defaults to 0.1):
        `Dropout2d` rate inside the FEM's classifiers.
    shot (`int`, *optional*, defaults to 1):
        K the weights were trained with (recorded for the model card); the model accepts any K.

    Training loss (`total = main + aux_loss_weight * aux`):

    aux_loss_weight (`float`, *optional*, defaults to 1.0):
        Weight of the mean cross-entropy of the FEM's per-scale classifiers (official `aux_weight`).

    Example:
    ```python
    >>> from hf_fss.models.qgnet import QGNetConfig, QGNetModel
    >>> config = QGNetConfig(backbone_kwargs={"stem": "7x7"}, use_pretrained_backbone=True,
    ...                      prior_extractor_weights="outputs/prior-pascal5i")
    >>> model = QGNetModel(config)
    >>> model.load_pretrained_extractors()  # ImageNet backbone + the contrastively pretrained prior extractor
    ```
    """

    model_type = "qgnet"
    tuple_fields = ("pyramid_bins",)

    builtin_backbones = get_args(QGNetBackbone)

    backbone: str | None = "resnet50"
    prior_extractor_backbone: str | None = "resnet50"
    prior_extractor_config: dict | PreTrainedConfig | None = None
    prior_extractor_kwargs: dict | None = None
    prior_extractor_weights: str | None = None
    prior_extractor_moco_encoder: Literal["encoder_k", "encoder_q"] = "encoder_k"
    prior_extractor_weights_if_missing: Literal["error", "random"] = "error"
    freeze_prior_extractor_batchnorm: bool = True
    reduce_dim: int = 256
    region_projection: RegionProjection = "learned"
    projection_dropout: float = 0.5
    pyramid_bins: list[int | float] | tuple[int | float, ...] = (60, 30, 15, 8)
    prior_eps: float = 1e-7
    feature_dropout: float = 0.5
    classifier_dropout: float = 0.1
    shot: int = 1
    aux_loss_weight: float = 1.0

    def __post_init__(self, **kwargs):
        named = self.prior_extractor_config is None and self.prior_extractor_backbone not in get_args(
            PriorExtractorBackbone
        )
        self.prior_extractor_backbone, self.prior_extractor_config = resolve_backbone_fields(
            self, "prior_extractor_backbone", self.prior_extractor_config, get_args(PriorExtractorBackbone)
        )
        if named and self.prior_extractor_weights is None:  # a Hub id / folder names its weights too
            self.prior_extractor_weights = self.prior_extractor_backbone
        if self.prior_extractor_kwargs is None:
            self.prior_extractor_kwargs = {} if self.prior_extractor_config is not None else {"stem": "7x7"}
        super().__post_init__(**kwargs)

    def validate_pyramid_bins(self):
        """Part of `@strict` validation."""
        check_pyramid_bins(self.pyramid_bins)

    def validate_ranges(self):
        """Part of `@strict` validation: sizes positive, dropout rates in [0, 1), eps positive."""
        check_positive(self, "reduce_dim", "shot", "prior_eps")
        check_dropout(self, "feature_dropout", "classifier_dropout", "projection_dropout")
        check_non_negative(self, "aux_loss_weight")
        if self.prior_extractor_moco_encoder not in MOCO_ENCODERS:
            raise ValueError(
                f"prior_extractor_moco_encoder must be one of {list(MOCO_ENCODERS)}, got "
                f"{self.prior_extractor_moco_encoder!r}"
            )

    def validate_prior_extractor_kwargs(self):
        """Part of `@strict` validation: the prior extractor is a ResNet with the arguments `DilatedResNet` takes."""
        allowed = {"stem", "base_width", "depths", "output_stride", "conv_init"}
        if self.prior_extractor_config is not None:  # overrides of a transformers config, checked when it is built
            return
        unknown = sorted(set(self.prior_extractor_kwargs or {}) - allowed)
        if unknown:
            raise ValueError(
                f"prior_extractor_kwargs got unknown argument(s) {unknown}; the prior extractor is a DilatedResNet "
                f"taking {sorted(allowed)}"
            )
