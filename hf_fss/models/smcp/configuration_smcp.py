"""Configuration of SMCP (Chen et al., "Semantically Meaningful Class Prototype Learning for One-Shot Image
Segmentation", IEEE TMM 2021)."""

from typing import Literal

from huggingface_hub.dataclasses import strict

from ...configuration_fss import FewShotSegmentationConfig, check_non_negative, check_positive

SelfPrototypeBranch = Literal["paper", "official"]
PrototypePooling = Literal["adjoint", "upsample"]


@strict(accept_kwargs=True)
class SMCPConfig(FewShotSegmentationConfig):
    r"""
    Configuration of [`SMCPModel`].

    The architecture defaults reproduce the official code (github.com/NUST-Machine-Intelligence-Laboratory/SMCP,
    `models/vgg.py` and `models/vgg_test.py`), so converted official checkpoints give the official logits; where the
    paper says something else the paper's form is the default only for the self-prototype branch (the official
    routing is a bug, see `self_prototype_branch`). Every difference is listed in
    `hf_fss.models.smcp.modeling_smcp.DIFFERENCES_FROM_OFFICIAL_CODE`.

    Architecture:

    backbone (`str`, *optional*, defaults to `"vgg16_dilated"`):
        SMCP's dilated VGG-16 (DeepLab-LargeFOV style, output stride 8); the only backbone SMCP defines.
    freeze_backbone (`bool`, *optional*, defaults to `False`):
        SMCP trains the whole encoder (paper section IV-B, official `train.py`); `True` keeps it fixed (the paper's
        "Frozen Encoder" row of Table VII).
    num_base_classes (`int`, *optional*, defaults to 15):
        Number of base (training) classes `|C_train|` of the fold: 15 for PASCAL-5i and the synthetic benchmark, 60
        for COCO-20i. The multi-class (MCL) head predicts `num_base_classes + 1` scores (background at index 0, base
        class `i` at index `i`, as the episodic dataset's `semantic_labels`). The trainer sets it from the fold when
        it builds a model from a config. A converted official checkpoint has 20 (its head has 21 outputs indexed by
        the VOC class id).
    reduce_dim (`int`, *optional*, defaults to 512):
        Channels of `feat_rd` (the 3x3 conv that fuses the query features with the tiled prototype) and of the
        whole pyramid module.
    bottleneck_dim (`int`, *optional*, defaults to 64):
        Inner channels of the pyramid module's two residual bottlenecks (1x1, 3x3, 1x1; paper: "64, 64, 512").
    aspp_rates (`tuple[int, ...]`, *optional*, defaults to `(6, 12, 18, 24)`):
        Dilation (= padding) of the branches of both ASPP classifiers (MCL head and `classifier_2`).
    aspp_init_std (`float`, *optional*, defaults to 0.01):
        Standard deviation of the normal initialisation of the ASPP weights (official `Classifier_Module`).
    prototype_pooling (`str`, *optional*, defaults to `"adjoint"`):
        Both modes give the paper's Eq. 1 at image resolution: features bilinearly upsampled (align_corners=False)
        to the mask size, `sum(F * M) / (sum(M) + 1e-5)`. `"upsample"` does it literally, as the official code, and
        holds a `channels x H x W` float tensor per support (356 MB for 512 channels at 417 x 417); `"adjoint"`
        (default) applies the transpose of the (linear, separable) upsampling to the mask instead, the same sum to
        float rounding, at feature resolution.
    self_prototype_branch (`str`, *optional*, defaults to `"paper"`):
        How the support is segmented with its own prototype in training (SPT, paper section III-E). `"paper"`: the
        same head as the query (`feat_rd`, pyramid module, `classifier_2`). `"official"`: `feat_rd` then
        `classifier_2`, skipping the pyramid module, as the released checkpoint was trained (models/vgg.py: the
        pyramid is applied a second time to the query and the result discarded).
    pseudo_prototype_fusion (`bool`, *optional*, defaults to `True`):
        At test time (not in training) segment the query twice: the first prediction's argmax at image resolution is
        a pseudo-mask, the query's prototype under it (the pseudo-prototype) is averaged with the K support
        prototypes (weight `1 / (K + 1)`, paper Fig. 9) and the fused prototype segments the query again (paper
        section III-G). `False` returns the first prediction (Table VI "support prototype" row).
    shot (`int`, *optional*, defaults to 1):
        K the weights were trained with (recorded for the model card); the model accepts any K.

    Training loss (official `train.py`, paper Eq. 4): `query + support + mcl_loss_weight * (mcl_query +
    mcl_support)`, each a cross-entropy (ignore 255) on logits bilinearly upsampled to the label size.

    mcl_loss_weight (`float`, *optional*, defaults to 0.1):
        `lambda_mcl`, weight of the multi-class label guidance losses.

    Example:
    ```python
    >>> from hf_fss.models.smcp import SMCPConfig, SMCPModel
    >>> config = SMCPConfig(num_base_classes=15, use_pretrained_backbone=True, image_size=417)
    >>> model = SMCPModel(config)
    >>> model.load_pretrained_extractors()  # ImageNet VGG-16 from timm/vgg16.tv_in1k, once, before training
    ```
    """

    model_type = "smcp"
    tuple_fields = ("aspp_rates",)

    builtin_backbones = ("vgg16_dilated",)

    backbone: str | None = "vgg16_dilated"
    freeze_backbone: bool = False
    image_size: int = 417
    num_base_classes: int = 15
    reduce_dim: int = 512
    bottleneck_dim: int = 64
    aspp_rates: list[int] | tuple[int, ...] = (6, 12, 18, 24)
    aspp_init_std: float = 0.01
    prototype_pooling: PrototypePooling = "adjoint"
    self_prototype_branch: SelfPrototypeBranch = "paper"
    pseudo_prototype_fusion: bool = True
    shot: int = 1
    mcl_loss_weight: float = 0.1

    def validate_sizes(self):
        """Part of `@strict` validation: sizes and counts positive, ASPP rates positive whole numbers."""
        check_positive(
            self, "num_base_classes", "reduce_dim", "bottleneck_dim", "shot", hint="; see SMCPConfig's docstring"
        )
        if not self.aspp_rates or any(int(r) != r or r < 1 for r in self.aspp_rates):
            raise ValueError(
                f"aspp_rates must be a non-empty sequence of positive integers (dilations), got {self.aspp_rates}"
            )
        check_positive(self, "aspp_init_std")
        check_non_negative(self, "mcl_loss_weight", hint=" (0 disables MCL)")
