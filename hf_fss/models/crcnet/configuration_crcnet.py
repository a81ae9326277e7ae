"""Configuration of CRCNet (Liu et al., "CRCNet: Few-shot Segmentation with Cross-Reference and Region-Global
Conditional Networks", IJCV 2022)."""

import math
from typing import Literal, get_args

from huggingface_hub.dataclasses import strict

from ...configuration_fss import FewShotSegmentationConfig, check_dropout, check_non_negative, check_positive

CRCNetBackbone = Literal["resnet50", "resnet101"]
FeatureLevels = Literal["layer3+layer4", "layer2+layer3", "layer4"]
CrossReferenceActivation = Literal["sigmoid", "relu", "softmax"]
Conditioning = Literal["global+local", "global", "local", "unconditioned"]
ConditionalInput = Literal["encoder", "cross_reference"]
LocalAttentionMask = Literal["multiply", "neg_inf", "unmasked"]
CombinedBlock = Literal["encoder_decoder", "concat"]
CacheFormat = Literal["probabilities", "foreground"]
RefinementTraining = Literal["unrolled", "random_history"]
ShotFusion = Literal["average", "finetune", "finetune+average"]
FinetunePairs = Literal["distinct", "all"]
FinetuneOptimizer = Literal["sgd", "adam"]
ModuleInit = Literal["kaiming_normal", "torch_default"]

SHOT_FUSION_MODES = get_args(ShotFusion)


@strict(accept_kwargs=True)
class CRCNetConfig(FewShotSegmentationConfig):
    r"""
    Configuration of [`CRCNetModel`]. CRCNet has no official code: every field the paper leaves open is a switch
    whose default is the resolution recommended in the project's method notes (section D, "D.3 ambiguity checklist",
    numbered (1)-(14) below); `DIFFERENCES_FROM_PAPER` in `modeling_crcnet` lists them for the model card.

    Encoder (Siamese, shared by support and query):

    feature_levels (`str`, *optional*, defaults to `"layer3+layer4"`):
        (1) Backbone stages concatenated before the 3x3 projection to `reduce_dim`: `"layer3+layer4"` (the paper's
        "layer3 and layer4 at 1/8", torchvision indexing), `"layer2+layer3"` (CANet's choice) or `"layer4"` (the
        last layer only: Table 2's "w/o multi-level" ablation).
    freeze_backbone (`bool`, *optional*, defaults to `False`):
        (2) The paper trains "end-to-end": the ResNet trains (its batch norm in eval mode,
        `freeze_backbone_batchnorm`); `True` freezes it as CANet does.
    reduce_dim (`int`, *optional*, defaults to 256):
        Channels of every 3x3 conv of the modules ("kernel 3x3 and 256 channels, followed by ReLU", section 5.1).
    encoder_dropout (`float`, *optional*, defaults to 0.5):
        `Dropout2d` after the encoder projection (CANet's `layer5`).
    module_init (`str`, *optional*, defaults to `"kaiming_normal"`):
        (15) Initialisation of every conv outside the backbone (the encoder projection and the head), which the
        paper does not give. The modules have no normalisation layer and the deepest path is 12 convs + ReLU from
        the encoder to a classifier: `"kaiming_normal"` (He et al. 2015: normal, fan-in, ReLU gain, zero bias) keeps
        the activations' scale along it; `"torch_default"` (PyTorch's uniform with `a=sqrt(5)`, what every other
        hf_fss model keeps) shrinks it about 6x in variance per layer, and a model trained from random weights learns
        more slowly (the synthetic quickstart: 59.05 novel-class mIoU after 120 steps instead of 73.86). The
        backbone keeps its own initialisation.

    Cross-reference module (section 4.3, Fig. 3):

    use_cross_reference (`bool`, *optional*, defaults to `True`):
        Table 1 ablation: `False` feeds the unweighted encoder features on and drops the co-occurrence heads and
        their losses.
    cross_reference_activation (`str`, *optional*, defaults to `"sigmoid"`):
        Table 6: `"sigmoid"` (56.4), `"relu"` (54.6) or `"softmax"` over channels (55.7).
    cross_reference_shared (`bool`, *optional*, defaults to `True`):
        (3) One GAP -> FC -> FC for both branches (the module is symmetric); `False`: one per branch.
    cross_reference_reduction (`int`, *optional*, defaults to 16):
        (3) Hidden size of the FC pair is `reduce_dim // cross_reference_reduction` (SE's default; 1 = no bottleneck).
    co_occurrence_decoder_depth (`int`, *optional*, defaults to 2):
        (4) 3x3 conv + ReLU layers of the co-occurrence heads before their ASPP and 1x1 classifier.
    co_occurrence_aspp (`bool`, *optional*, defaults to `True`):
        (4) The co-occurrence heads end with CANet's ASPP (global pool, 1x1, 3x3 at dilation 6/12/18 -> 1x1).

    Conditional module (section 4.4, Eq. 1-3):

    conditioning (`str`, *optional*, defaults to `"global+local"`):
        Tables 1 and 3: `"global+local"` (56.4), `"global"` (54.7), `"local"` (55.3) or `"unconditioned"` (52.0; with
        `use_cross_reference=False` nothing would compare query and support, which is refused).
    conditional_input (`str`, *optional*, defaults to `"encoder"`):
        (5) Features the conditional module reads: the encoder features F (in parallel with cross-reference) or the
        cross-referenced G.
    local_attention_mask (`str`, *optional*, defaults to `"multiply"`):
        (6) and Table 7. `"multiply"`: Eq. 2 literally, `softmax(M_sim * mask)` (background similarities become 0);
        `"neg_inf"`: background positions get no weight; `"unmasked"`: no support mask (Table 7 "w/o mask", 55.8).
    local_key_dim (`int`, *optional*):
        (6) Channels of the 1x1 embeddings theta / delta; defaults to `reduce_dim`.
    local_scaled (`bool`, *optional*, defaults to `False`):
        (6) Divide the similarities by sqrt(local_key_dim) (the paper states no scaling).

    Mask refinement module (section 4.5, Fig. 7):

    use_refinement_cache (`bool`, *optional*, defaults to `True`):
        Table 2 ablation: `False` removes the cache branch and runs the module once.
    refinement_steps (`int`, *optional*, defaults to 10):
        Recurrent steps at inference (section 5.1: 10).
    training_refinement_steps (`int`, *optional*, defaults to 2):
        (8) Steps unrolled in training (zeros -> p1 -> p2), the cache detached between steps.
    refinement_training (`str`, *optional*, defaults to `"unrolled"`):
        (8) `"unrolled"`: always unroll `training_refinement_steps`; `"random_history"`: CANet-like, with
        probability `refinement_history_probability` one step starts from the model's own detached prediction,
        otherwise from the zero cache (CANet keeps the previous epoch's prediction instead, which needs a store
        shared by data workers; here it is recomputed with the current weights).
    refinement_history_probability (`float`, *optional*, defaults to 0.3):
        Probability of the history cache with `refinement_training="random_history"` (CANet's 0.3).
    refinement_cache_format (`str`, *optional*, defaults to `"probabilities"`):
        (7) `"probabilities"`: the 2-channel softmax (CANet); `"foreground"`: its target channel only.
    refinement_combined_block (`str`, *optional*, defaults to `"encoder_decoder"`):
        (7) `"encoder_decoder"`: a stride-2 encoder-decoder with skip, the cache concatenated at both resolutions
        (section 2.3's "multiple feature levels and field-of-views"); `"concat"`: CANet's single concat + residual.
    intermediate_loss (`bool`, *optional*, defaults to `False`):
        (9) Average the losses of every unrolled step instead of taking the last step's.
    prior_mask (`bool`, *optional*, defaults to `False`):
        The paper's "PFENet + CRC" variant (Tables 8 and 12: CRCNet's modules built on PFENet): PFENet's
        training-free prior mask (cosine similarity of the frozen backbone's layer4 features of target and reference,
        max over the reference's foreground positions, min-max normalised per image; `cosine_prior_mask`) joins the
        mask refinement module's input as one more channel, for every (target, reference) pair: query from support,
        support from query, training, K-shot finetuning. The layer4 features are never trained through (computed
        without autograd for `feature_levels` without layer4, detached otherwise, as PFENet). `False` is CRCNet as
        in the paper's main model.

    Loss (Eq. 5, `(L_QM + L_SM) + co_occurrence_loss_weight (L_QMsub + L_SMsub)`):

    support_loss_weight (`float`, *optional*, defaults to 1.0):
        Weight of L_SM (the symmetric support prediction); 0 trains the query head only.
    co_occurrence_loss_weight (`float`, *optional*, defaults to 0.1):
        lambda of Eq. 5.

    Inference:

    inference_scales (`tuple[float, ...]`, *optional*, defaults to `(0.75, 1.0, 1.25)`):
        (10) Scales of the support and query images; target probabilities are resized to the input size and
        averaged (section 5.3; Table 2: +0.8). `(1.0,)` is single-scale. Training always uses scale 1.
    predict_support (`bool`, *optional*, defaults to `True`):
        Fill `support_logits` at inference too (each support conditioned on the predicted query probability; at
        scale 1 only). Training always predicts the supports (from the query labels).

    K-shot (section 4.6, Table 4):

    shot_fusion (`str`, *optional*, defaults to `"finetune+average"`):
        (11) `"average"`: predict the query with each support and average the probabilities ("Fusion");
        `"finetune"`: finetune everything but the Siamese encoder on ordered support pairs, then predict with the
        first support; `"finetune+average"`: finetune, then average over the supports. With one support there is
        nothing to finetune on (the paper: "needs at least two images") and every mode is the 1-shot prediction.
    finetune_steps (`int`, *optional*, defaults to 50):
        (11) Optimiser steps per support set (one ordered pair per step).
    finetune_learning_rate (`float`, *optional*, defaults to 0.0025):
        (11) The training learning rate.
    finetune_optimizer (`str`, *optional*, defaults to `"sgd"`):
        (11) `"sgd"` (momentum `finetune_momentum`) or `"adam"`.
    finetune_momentum (`float`, *optional*, defaults to 0.9):
        Momentum of the SGD finetuning.
    finetune_pairs (`str`, *optional*, defaults to `"distinct"`):
        (11) `"distinct"`: ordered pairs of two different supports (K(K-1)); `"all"`: also an image with itself
        (the paper's "at most k^2 pairs").
    finetune_flip (`bool`, *optional*, defaults to `True`):
        (11) Each step flips the pair horizontally with probability 0.5.
    finetune_max_loss_ratio (`float`, *optional*, defaults to 10.0):
        Divergence guard of the finetuning (not in the paper): it stops when a step's loss is not finite or exceeds
        this many times the first step's loss, or when it leaves non-finite weights, and that support set keeps the
        unadapted head (a one-line warning, logged once per process, says so; the support encoding's
        `finetune_diverged` marks each such support set and evaluate.py reports their count). A model built from
        random weights diverges so at the default `finetune_learning_rate`.
    finetune_seed (`int`, *optional*, defaults to 0):
        Seed of the pair and flip draws: the same support set always gives the same finetuned weights.
    shot (`int`, *optional*, defaults to 1):
        K the weights were trained with (recorded for the model card); the model accepts any K.

    Example:
    ```python
    >>> from hf_fss.models.crcnet import CRCNetConfig, CRCNetModel
    >>> config = CRCNetConfig(backbone_kwargs={"stem": "7x7"}, use_pretrained_backbone=True, image_size=321)
    >>> model = CRCNetModel(config)
    >>> model.load_pretrained_extractors()  # ImageNet weights from microsoft/resnet-50, once, before training
    ```
    """

    model_type = "crcnet"

    builtin_backbones = get_args(CRCNetBackbone)

    backbone: str | None = "resnet50"
    freeze_backbone: bool = False
    image_size: int = 321
    feature_levels: FeatureLevels = "layer3+layer4"
    reduce_dim: int = 256
    encoder_dropout: float = 0.5
    module_init: ModuleInit = "kaiming_normal"

    use_cross_reference: bool = True
    cross_reference_activation: CrossReferenceActivation = "sigmoid"
    cross_reference_shared: bool = True
    cross_reference_reduction: int = 16
    co_occurrence_decoder_depth: int = 2
    co_occurrence_aspp: bool = True

    conditioning: Conditioning = "global+local"
    conditional_input: ConditionalInput = "encoder"
    local_attention_mask: LocalAttentionMask = "multiply"
    local_key_dim: int | None = None
    local_scaled: bool = False

    use_refinement_cache: bool = True
    refinement_steps: int = 10
    training_refinement_steps: int = 2
    refinement_training: RefinementTraining = "unrolled"
    refinement_history_probability: float = 0.3
    refinement_cache_format: CacheFormat = "probabilities"
    refinement_combined_block: CombinedBlock = "encoder_decoder"
    intermediate_loss: bool = False
    prior_mask: bool = False

    support_loss_weight: float = 1.0
    co_occurrence_loss_weight: float = 0.1

    inference_scales: list[float | int] | tuple[float | int, ...] = (0.75, 1.0, 1.25)
    predict_support: bool = True

    shot_fusion: ShotFusion = "finetune+average"
    finetune_steps: int = 50
    finetune_learning_rate: float = 0.0025
    finetune_optimizer: FinetuneOptimizer = "sgd"
    finetune_momentum: float = 0.9
    finetune_pairs: FinetunePairs = "distinct"
    finetune_flip: bool = True
    finetune_max_loss_ratio: float = 10.0
    finetune_seed: int = 0
    shot: int = 1

    def __post_init__(self, **kwargs):
        self.inference_scales = tuple(float(s) for s in self.inference_scales)
        super().__post_init__(**kwargs)

    def validate_inference_scales(self):
        """Part of `@strict` validation."""
        if not self.inference_scales or not all(math.isfinite(s) and s > 0 for s in self.inference_scales):
            raise ValueError(
                f"inference_scales must be a non-empty list of positive, finite scales, got {self.inference_scales}; "
                "use [1.0] for single-scale inference"
            )

    def validate_modules(self):
        """Part of `@strict` validation: something must compare the query with the support."""
        if self.conditioning == "unconditioned" and not self.use_cross_reference:
            raise ValueError(
                "conditioning='unconditioned' with use_cross_reference=False leaves no module comparing query and support; "
                "enable one of them"
            )

    def validate_ranges(self):
        """Part of `@strict` validation: sizes and step counts positive, rates in range."""
        check_positive(
            self, "reduce_dim", "cross_reference_reduction", "refinement_steps", "training_refinement_steps"
        )
        if self.reduce_dim // self.cross_reference_reduction < 1:
            raise ValueError(
                f"cross_reference_reduction ({self.cross_reference_reduction}) must not exceed reduce_dim "
                f"({self.reduce_dim})"
            )
        if self.local_key_dim is not None and self.local_key_dim < 1:
            raise ValueError(f"local_key_dim must be positive or None (= reduce_dim), got {self.local_key_dim}")
        check_non_negative(self, "co_occurrence_decoder_depth", "finetune_steps")
        check_positive(self, "shot")
        check_dropout(self, "encoder_dropout")
        if not 0.0 <= self.refinement_history_probability <= 1.0:
            raise ValueError(
                f"refinement_history_probability must lie in [0, 1], got {self.refinement_history_probability}"
            )
        check_positive(self, "finetune_learning_rate")
        if not self.finetune_max_loss_ratio > 1.0:  # also refuses NaN
            raise ValueError(
                f"finetune_max_loss_ratio must be a number above 1 (e.g. 10.0), got {self.finetune_max_loss_ratio}"
            )
        check_non_negative(self, "support_loss_weight", "co_occurrence_loss_weight", "finetune_momentum")
