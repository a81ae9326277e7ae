"""Configuration of NTRENet (Liu et al., "Learning Non-target Knowledge for Few-shot Semantic Segmentation", CVPR 2022)."""

from typing import Literal, get_args

from huggingface_hub.dataclasses import strict

from ...configuration_fss import (
    FewShotSegmentationConfig,
    check_dropout,
    check_non_negative,
    check_positive,
    check_pyramid_bins,
)

DistractorPooling = Literal["global_average", "masked_average"]
NTRENetBackbone = Literal["resnet50", "resnet101", "vgg16_bn"]
SHOT_FUSION_MODES = ("mean",)


@strict(accept_kwargs=True)
class NTRENetConfig(FewShotSegmentationConfig):
    r"""
    Configuration of [`NTRENetModel`], the Non-Target Region Eliminating network.

    The defaults reproduce the official code (github.com/LIUYUANWEI98/NERTNet, `model/ourmodel.py`) so that converted
    official checkpoints give the official numbers; where the paper says something else, the paper's form is an
    option. The full list of paper-vs-code differences is `DIFFERENCES_FROM_OFFICIAL_CODE` in
    `hf_fss.models.ntrenet.modeling_ntrenet`.

    Architecture:

    reduce_dim (`int`, *optional*, defaults to 256):
        Channels of the reduced mid-level features (`down_query` / `down_supp`), of the support and distracting-object
        prototypes and of the whole decoder.
    background_prototype_dim (`int`, *optional*, defaults to 256):
        Channels `D` of the learned background (BG) prototype. The official code uses `reduce_dim * bgpro_num` with
        `bgpro_num=1` (256); the paper's ablation (Fig. 6) picks 640. Inferred from `bg_prototype` when converting.
    background_prototype_init_std (`float`, *optional*, defaults to 0.0):
        The BG prototype starts at zero (official code) when 0; otherwise it is drawn from `N(0, std^2)` (the paper
        says "randomly initialized" without naming a distribution).
    pyramid_bins (`tuple[int | float, ...]`, *optional*, defaults to `(60, 30, 15, 8)`):
        Scales of PFENet's feature enrichment pyramid: a value `> 1` is a fixed adaptive-pool size, `<= 1` a fraction
        of the feature size. BG elimination, feature matching, the initial prediction and DO elimination run at every
        scale, as in the official code.
    distractor_pooling (`str`, *optional*, defaults to `"global_average"`):
        How the distracting-object (DO) prototype is pooled at each scale. `"global_average"` (official code): the
        DO-masked features averaged over the whole map, i.e. divided by the map area; `"masked_average"` (paper,
        Eq. 8): divided by the DO-mask area (masked average pooling).
    feature_dropout (`float`, *optional*, defaults to 0.5):
        `Dropout2d` rate after `down_query`, `down_supp` and `down_bg`.
    classifier_dropout (`float`, *optional*, defaults to 0.1):
        `Dropout2d` rate inside every classifier (`bg_cls`, `initial_inner_cls`, the FEM's `inner_cls` and `cls`).
    shot_fusion (`str`, *optional*, defaults to `"mean"`):
        How K support images are combined: the support prototypes and the per-shot prior masks are averaged.
    shot (`int`, *optional*, defaults to 1):
        K the weights were trained with (recorded for the model card); the model accepts any K.

    Training losses (`total = main + background_loss_weight * background + final_aux_loss_weight * aux_final +
    initial_aux_loss_weight * aux_initial + contrastive_loss_weight * contrastive`):

    final_aux_loss_weight (`float`, *optional*, defaults to 0.4):
        Weight of the mean cross-entropy of the final pyramid's auxiliary classifiers (`inner_cls`).
    initial_aux_loss_weight (`float`, *optional*, defaults to 0.6):
        Weight of the mean cross-entropy of the initial predictions (`initial_inner_cls`).
    background_loss_weight (`float`, *optional*, defaults to 1.0):
        Weight `lambda` of the background mining loss (Eq. 3), averaged over the query and every support.
    background_loss_alpha (`float`, *optional*, defaults to 0.5):
        `alpha` of Eq. 3: weight of the term pushing every pixel towards background.
    contrastive_loss_weight (`float`, *optional*, defaults to 0.01):
        Weight `gamma` of the prototypical contrastive loss (Eq. 10). It needs `class_ids` in the training call.
    contrastive_temperature (`float`, *optional*, defaults to 1.0):
        Temperature dividing the cosine similarities of Eq. 10.
    contrastive_bank_size (`int`, *optional*, defaults to 2000):
        Distracting-object prototypes kept per class in the bank (newest first; the oldest are dropped).
    contrastive_num_negatives (`int`, *optional*, defaults to 1000):
        At most this many bank entries are drawn at random as the negatives of each query.
    contrastive_seed (`int`, *optional*, defaults to 0):
        Seed of the generator that draws the negatives; its state is part of the bank's `state_dict`, so resumed
        runs draw the same negatives.

    Example:
    ```python
    >>> from hf_fss.models.ntrenet import NTRENetConfig, NTRENetModel
    >>> config = NTRENetConfig(backbone="resnet50", backbone_kwargs={"stem": "7x7"}, use_pretrained_backbone=True)
    >>> model = NTRENetModel(config)
    >>> model.load_pretrained_extractors()  # ImageNet weights from microsoft/resnet-50, once, before training
    ```
    """

    model_type = "ntrenet"
    tuple_fields = ("pyramid_bins",)

    builtin_backbones = get_args(NTRENetBackbone)

    backbone: str | None = "resnet50"
    reduce_dim: int = 256
    background_prototype_dim: int = 256
    background_prototype_init_std: float = 0.0
    pyramid_bins: list[int | float] | tuple[int | float, ...] = (60, 30, 15, 8)
    distractor_pooling: DistractorPooling = "global_average"
    feature_dropout: float = 0.5
    classifier_dropout: float = 0.1
    shot_fusion: Literal["mean"] = "mean"
    shot: int = 1

    final_aux_loss_weight: float = 0.4
    initial_aux_loss_weight: float = 0.6
    background_loss_weight: float = 1.0
    background_loss_alpha: float = 0.5
    contrastive_loss_weight: float = 0.01
    contrastive_temperature: float = 1.0
    contrastive_bank_size: int = 2000
    contrastive_num_negatives: int = 1000
    contrastive_seed: int = 0

    def validate_pyramid_bins(self):
        """Part of `@strict` validation."""
        check_pyramid_bins(self.pyramid_bins)

    def validate_ranges(self):
        """Part of `@strict` validation: sizes positive, probabilities in [0, 1), temperatures positive."""
        check_positive(self, "reduce_dim", "background_prototype_dim", "shot", "contrastive_bank_size")
        check_positive(self, "contrastive_num_negatives", "contrastive_temperature")
        check_non_negative(self, "background_prototype_init_std")
        check_dropout(self, "feature_dropout", "classifier_dropout")
