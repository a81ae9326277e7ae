"""
CRCNet: Cross-Reference and Region-Global Conditional Network (Liu, Zhang, Lin, Liu, "CRCNet: Few-shot Segmentation
with Cross-Reference and Region-Global Conditional Networks", IJCV 2022; arXiv 2208.10761).

No official code exists. This is a reconstruction from the paper (section 4, Eq. 1-5, Tables 1-7) with every detail
the paper leaves open made a config switch (`CRCNetConfig`); `DIFFERENCES_FROM_PAPER` lists each choice.

Layout: `backbone` + `encoder_projection` form the Siamese encoder (shared by support and query); `head`
(`CRCNetHead`) holds everything after it (cross-reference, co-occurrence heads, conditional modules, mask
refinement), the part K-shot finetuning adapts (section 4.6: "we fix the Siamese encoder and finetune the rest").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from transformers.utils import logging

from ...modeling_fss import FewShotSegmentationOutput, FewShotSegmentationPreTrainedModel, SupportEncoding
from ...modules import cosine_prior_mask, masked_average_pooling, resize_mask
from .configuration_crcnet import CRCNetConfig

__all__ = ["DIFFERENCES_FROM_PAPER", "CRCNetHead", "CRCNetModel", "CRCNetSupportEncoding", "PairPrediction"]

logger = logging.get_logger(__name__)

# Every point the paper (no official code) leaves open, and the choice made here; the model card lists them. The
# numbers refer to the ambiguity checklist of the project's method notes (section D.3).
DIFFERENCES_FROM_PAPER = (
    "No official code exists: this is a reconstruction from the paper; CANet (icoz69/CaNet, same group) is the "
    "tie-breaker where the paper is silent.",
    "(1) Encoder levels: torchvision layer3 (dilation 2) + layer4 (dilation 4), both at 1/8, concatenated and "
    "projected by a 3x3 conv to 256 + ReLU + Dropout2d 0.5 (CANet's layer5); `feature_levels` offers CANet's "
    "layer2 + layer3 and the last layer alone (Table 2).",
    "(2) Encoder training: the paper trains 'end-to-end', so the ResNet trains with its batch norm in eval mode "
    "(`freeze_backbone=False`); `freeze_backbone=True` is CANet's frozen encoder.",
    "(3) Cross-reference: one GAP -> FC (256/16) -> ReLU -> FC -> sigmoid shared by both branches "
    "(`cross_reference_shared`, `cross_reference_reduction`); the branch vectors are multiplied and reweight both "
    "feature maps.",
    "(4) Co-occurrence heads: 2 x (3x3 conv + ReLU), CANet's ASPP (global pool, 1x1, 3x3 at 6/12/18 -> 1x1 256), "
    "1x1 conv to 2 classes, shared by query and support (`co_occurrence_decoder_depth`, `co_occurrence_aspp`).",
    "(5) Conditional input: the conditional modules read the encoder features F in parallel with the "
    "cross-reference module, whose output G joins them at the refinement input (`conditional_input`).",
    "(6) Local conditional: theta / delta are 1x1 conv 256->256 + ReLU, no 1/sqrt(d) scaling, Eq. 2 implemented "
    "literally (similarity times mask, then row softmax; background positions keep weight e^0) on unmasked support "
    "features; `local_attention_mask='neg_inf'` gives them no weight, `'unmasked'` drops the mask (Table 7). Global and "
    "local outputs are concatenated and fused by a 3x3 conv to 256.",
    "(7) Refinement module: the cache is the 2-channel softmax of the previous step at feature size (zeros at "
    "first); the global convolution block ((7x1 -> 1x7) + (1x7 -> 7x1), summed, ReLU) runs on the features; the "
    "combined block is a small encoder-decoder (stride-2 3x3 down, the cache concatenated at both resolutions, "
    "upsample + skip + 3x3), then CANet's ASPP and a 1x1 classifier (`refinement_cache_format`, "
    "`refinement_combined_block`).",
    "(8) Refinement training: 2 steps unrolled (zeros -> p1 -> p2) with the cache detached and the first step "
    "without gradient; 10 steps at inference (`training_refinement_steps`, `refinement_steps`); "
    "`refinement_training='random_history'` is a CANet-like alternative.",
    "(9) Losses on the final refinement step only (`intermediate_loss=True` averages every unrolled step); BCE "
    "implemented as 2-class softmax cross-entropy with ignore index 255 (the same loss on p_fg).",
    "(10) Multi-scale inference: scales 0.75, 1, 1.25 (section 5.3; section 5.1's [0.75, 1.25] taken as a typo) of "
    "both support and query, refinement run per scale, target probabilities resized to the input and averaged.",
    "(11) K-shot finetuning (no hyper-parameter given): a copy of the head (everything after the Siamese encoder, "
    "whose 3x3 projection stays fixed too), SGD lr 0.0025 momentum 0.9, 50 steps of one random ordered pair of two "
    "different supports (the paper: finetuning needs at least two images) with a random horizontal flip, the "
    "training loss (both directions, co-occurrence terms, 2 unrolled steps), seeded; then the query is predicted "
    "with every support and the probabilities averaged ('finetune+average'; 'finetune' uses the first support, "
    "'average' skips finetuning).",
    "K-shot finetuning divergence guard (not in the paper): a support set's finetuning stops when a step's loss is "
    "not finite or exceeds `finetune_max_loss_ratio` times the first step's, or when it leaves non-finite weights; "
    "that support set keeps the unadapted head (a warning logged once; the encoding's `finetune_diverged` marks it "
    "and evaluate.py counts it in `unadapted_support_sets`). A model trained from random weights diverges so.",
    "(12) Optimisation: momentum 0.9, weight decay 5e-4, batch 4, poly 0.9 schedule and 321 crops from CANet (the "
    "paper gives SGD, lr 0.0025, 200 epochs only); set in the recipes.",
    "(13) Box supports: the union of the class's instance boxes (the `bbox` annotation), at test time only; the "
    "model is trained with masks (the paper's Table 14 setting).",
    "(14) Evaluation: PFENet's protocol (1000 episodes, seed 321, labels at original size), as every hf_fss model; "
    "the paper does not give its episode count or seeds.",
    "(15) Initialisation (not in the method notes' checklist; the paper does not give it): every conv outside the "
    "backbone is He-initialised (normal, fan-in, ReLU gain, zero bias; `module_init`), since the modules have no "
    "normalisation layer; with PyTorch's default init a model trained from random weights learns more slowly (the "
    "synthetic quickstart: 59.05 novel-class mIoU instead of 73.86).",
    "Support prediction at inference: the support is conditioned on the predicted query probability (the query "
    "label is unknown), at scale 1 only; training conditions it on the query label, as the paper.",
    "K-shot training: each support-query pair of a K-shot episode is a 1-shot pair; the query losses are averaged "
    "over the K pairs (the paper trains 1-shot).",
    "Option `prior_mask` (default off: the paper's main model): the 'PFENet + CRC' variant of Tables 8 / 12, built "
    "here as CRCNet plus PFENet's training-free prior mask (cosine prior of the frozen layer4 features) as one more "
    "channel of the mask refinement input, for every (target, reference) pair; the paper does not say where its "
    "variant feeds the prior.",
)


def _conv(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1):
    # Every module conv: 3x3, 256 channels, ReLU (section 5.1).
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation),
        nn.ReLU(inplace=True),
    )


def _upsample(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class ResidualPair(nn.Module):
    """Two 3x3 conv + ReLU with an identity skip: `x + f(x)`, `(B, C, h, w)` -> `(B, C, h, w)`."""

    def __init__(self, channels: int):
        super().__init__()
        self.layers = nn.Sequential(_conv(channels, channels), _conv(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class CANetASPP(nn.Module):
    """
    CANet's ASPP (one_shot_network.py): image pooling + 1x1, a 1x1, and 3x3 convs at dilation 6 / 12 / 18, each with
    ReLU, concatenated (5C) and fused by a 1x1 conv + ReLU. `(B, C, h, w)` -> `(B, C, h, w)`.
    """

    def __init__(self, channels: int, rates: tuple[int, ...] = (6, 12, 18)):
        super().__init__()
        self.pooled = _conv(channels, channels, kernel_size=1)
        self.point = _conv(channels, channels, kernel_size=1)
        self.atrous = nn.ModuleList(_conv(channels, channels, dilation=rate) for rate in rates)
        self.fuse = _conv(channels * (2 + len(rates)), channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled(x.mean(dim=(-2, -1), keepdim=True)).expand(-1, -1, *x.shape[-2:])
        return self.fuse(torch.cat([pooled, self.point(x), *(conv(x) for conv in self.atrous)], dim=1))


class CrossReference(nn.Module):
    """
    Cross-reference module (section 4.3, Fig. 3): per branch GAP -> FC -> ReLU -> FC -> activation gives channel
    weights; the two are multiplied element-wise and reweight both feature maps, keeping the channels that respond
    in both images (the co-occurring object).

    Args:
        channels (`int`), reduction (`int`): hidden size `channels // reduction`.
        activation (`str`): `"sigmoid"`, `"relu"` or `"softmax"` (over channels), Table 6.
        shared (`bool`): one FC pair for both branches, else one for the query and one for the support branch.
    """

    def __init__(self, channels: int, reduction: int, activation: str, shared: bool):
        super().__init__()
        hidden = channels // reduction

        def mlp():
            # The FC layers as 1x1 convs on the pooled vector: the same maps, and (unlike nn.Linear's GEMM on CPU)
            # results that do not depend on the memory alignment of the weights, so a loaded checkpoint is
            # bit-identical to the saved model.
            return nn.Sequential(
                nn.Conv2d(channels, hidden, kernel_size=1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1)
            )

        self.activation = activation
        self.fc = mlp()  # the query branch's, and the support branch's too when shared
        self.support_fc = None if shared else mlp()

    def _weights(self, fc: nn.Module, features: torch.Tensor) -> torch.Tensor:
        scores = fc(features.mean(dim=(-2, -1), keepdim=True))
        if self.activation == "sigmoid":
            return torch.sigmoid(scores)
        if self.activation == "softmax":
            return torch.softmax(scores, dim=1)
        return torch.relu(scores)

    def forward(self, query: torch.Tensor, support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, C, h, w)` query and `(B, C, h', w')` support -> the reweighted `(G_q, G_s)`."""
        support_fc = self.fc if self.support_fc is None else self.support_fc
        weights = self._weights(self.fc, query) * self._weights(support_fc, support)
        return query * weights, support * weights


class CoOccurrenceHead(nn.Module):
    """Co-occurrence decoder (section 4.3): `depth` x (3x3 conv + ReLU), optional ASPP, 1x1 conv to 2 classes."""

    def __init__(self, channels: int, depth: int, aspp: bool):
        super().__init__()
        self.layers = nn.Sequential(*(_conv(channels, channels) for _ in range(depth)))
        self.aspp = CANetASPP(channels) if aspp else nn.Identity()
        self.classifier = nn.Conv2d(channels, 2, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.aspp(self.layers(features)))


class GlobalConditional(nn.Module):
    """
    Global conditional module (section 4.4, Fig. 5): the support's masked average feature (the category vector) is
    tiled over the target map, concatenated with it, then a 3x3 conv and a residual block.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.merge = _conv(2 * channels, channels)
        self.residual = ResidualPair(channels)

    def forward(self, target: torch.Tensor, reference: torch.Tensor, reference_mask: torch.Tensor) -> torch.Tensor:
        vector = masked_average_pooling(reference, reference_mask).expand(-1, -1, *target.shape[-2:])
        return self.residual(self.merge(torch.cat([target, vector], dim=1)))


class LocalConditional(nn.Module):
    """
    Local conditional module (section 4.4, Fig. 6, Eq. 1-3): `M_sim = theta(F_t)^T delta(F_r)` (`HW_t x HW_r`),
    `M' = softmax_rows(M_sim * mask_r)` (Eq. 2; `mask_mode` chooses the literal product, a `-inf` fill or no mask),
    `F'_t = F_r M'^T`: every target position aggregates reference features. The similarities and their softmax are
    computed in float32 whatever the model's dtype: a sum over `key_dim` products overflows float16 and bfloat16
    rounds the attention weights too coarsely.
    """

    def __init__(self, channels: int, key_dim: int, mask_mode: str, scaled: bool):
        super().__init__()
        self.theta = _conv(channels, key_dim, kernel_size=1)
        self.delta = _conv(channels, key_dim, kernel_size=1)
        self.mask_mode = mask_mode
        self.scale = 1.0 / math.sqrt(key_dim) if scaled else 1.0

    def forward(self, target: torch.Tensor, reference: torch.Tensor, reference_mask: torch.Tensor) -> torch.Tensor:
        """`target` `(B, C, h, w)`, `reference` `(B, C, h', w')`, `reference_mask` `(B, 1, h', w')` in [0, 1]."""
        batch_size, channels, height, width = target.shape
        query = self.theta(target).flatten(2).float()  # (B, d, HW_t)
        key = self.delta(reference).flatten(2).float()  # (B, d, HW_r)
        similarity = torch.bmm(query.transpose(1, 2), key) * self.scale  # (B, HW_t, HW_r), float32
        mask = reference_mask.flatten(2).float()  # (B, 1, HW_r), broadcast over rows
        if self.mask_mode == "multiply":
            similarity = similarity * mask
        elif self.mask_mode == "neg_inf":
            # finfo.min rather than -inf: a mask empty at feature size gives uniform weights, not NaN.
            similarity = similarity.masked_fill(mask <= 0, torch.finfo(similarity.dtype).min)
        attention = similarity.softmax(dim=-1).to(reference.dtype)
        attended = torch.bmm(reference.flatten(2), attention.transpose(1, 2))  # (B, C, HW_t)
        return attended.reshape(batch_size, channels, height, width)


class GlobalConvolutionBlock(nn.Module):
    """Global convolution block (Peng et al. 2017): `(k x 1 -> 1 x k) + (1 x k -> k x 1)`, summed, ReLU."""

    def __init__(self, channels: int, kernel_size: int = 7):
        super().__init__()
        pad = kernel_size // 2
        self.left = nn.Sequential(
            nn.Conv2d(channels, channels, (kernel_size, 1), padding=(pad, 0)),
            nn.Conv2d(channels, channels, (1, kernel_size), padding=(0, pad)),
        )
        self.right = nn.Sequential(
            nn.Conv2d(channels, channels, (1, kernel_size), padding=(0, pad)),
            nn.Conv2d(channels, channels, (kernel_size, 1), padding=(pad, 0)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.left(x) + self.right(x))


class MaskRefinement(nn.Module):
    """
    Mask refinement module (section 4.5, Fig. 7). `features` (once per pair): the input conv over
    `concat(conditional, G)` and the global convolution block. `step` (every iteration): the combined block fuses
    the features with the cache (the previous step's probabilities, zeros at first), then ASPP and a 1x1 classifier
    give 2-class logits at feature size.
    """

    def __init__(self, channels: int, in_channels: int, cache_channels: int, combined_block: str):
        super().__init__()
        self.cache_channels = cache_channels
        self.combined_block = combined_block
        self.input = _conv(in_channels, channels)
        self.global_conv = GlobalConvolutionBlock(channels)
        self.combine_in = _conv(channels + cache_channels, channels)
        if combined_block == "encoder_decoder":
            self.down = _conv(channels, channels, stride=2)
            self.combine_low = _conv(channels + cache_channels, channels)
            self.combine_out = _conv(2 * channels, channels)
        else:
            self.residual = ResidualPair(channels)
        self.aspp = CANetASPP(channels)
        self.classifier = nn.Conv2d(channels, 2, kernel_size=1)

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.global_conv(self.input(inputs))

    def step(self, features: torch.Tensor, cache: torch.Tensor | None) -> torch.Tensor:
        """`features` `(B, C, h, w)`, `cache` `(B, cache_channels, h, w)` or None without cache -> `(B, 2, h, w)`."""
        with_cache = [features] if cache is None else [features, cache]
        hidden = self.combine_in(torch.cat(with_cache, dim=1))
        if self.combined_block == "encoder_decoder":
            low = self.down(hidden)
            low_in = [low] if cache is None else [low, _upsample(cache, low.shape[-2:])]
            low = self.combine_low(torch.cat(low_in, dim=1))
            hidden = self.combine_out(torch.cat([_upsample(low, hidden.shape[-2:]), hidden], dim=1))
        else:
            hidden = self.residual(hidden)
        return self.classifier(self.aspp(hidden))


@dataclass
class PairPrediction:
    """
    What `CRCNetHead` predicts for a (target, reference) pair.

    Args:
        logits (`list[torch.FloatTensor]`): `(B, 2, h, w)` target logits after each refinement step.
        caches (`list[torch.FloatTensor | None]`): the cache fed into each step (`caches[0]` zeros; None without
            cache); `caches[t + 1]` is derived from `logits[t]`.
        target_co_occurrence, reference_co_occurrence (`torch.FloatTensor` of shape `(B, 2, h, w)` or None):
            co-occurrence logits (QM_sub / SM_sub), None without the cross-reference module.
    """

    logits: list[torch.Tensor]
    caches: list[torch.Tensor | None]
    target_co_occurrence: torch.Tensor | None = None
    reference_co_occurrence: torch.Tensor | None = None


class CRCNetHead(nn.Module):
    """
    Everything after the Siamese encoder: cross-reference, co-occurrence heads, global / local conditional modules
    and the recurrent mask refinement. One call predicts the mask of a target image from a reference image and the
    reference's mask (the query from a support, or symmetrically a support from the query); K-shot finetuning adapts
    a copy of its parameters through `torch.func.functional_call`.
    """

    def __init__(self, config: CRCNetConfig):
        super().__init__()
        dim = config.reduce_dim
        self.config = config
        if config.use_cross_reference:
            self.cross_reference = CrossReference(
                dim, config.cross_reference_reduction, config.cross_reference_activation, config.cross_reference_shared
            )
            self.co_occurrence = CoOccurrenceHead(dim, config.co_occurrence_decoder_depth, config.co_occurrence_aspp)
        conditionals = 0
        if "global" in config.conditioning:
            self.global_conditional = GlobalConditional(dim)
            conditionals += 1
        if "local" in config.conditioning:
            self.local_conditional = LocalConditional(
                dim, config.local_key_dim or dim, config.local_attention_mask, config.local_scaled
            )
            conditionals += 1
        if conditionals:
            self.conditional_fuse = _conv(conditionals * dim, dim)
        cache_channels = 0
        if config.use_refinement_cache:
            cache_channels = 2 if config.refinement_cache_format == "probabilities" else 1
        # The prior mask (`prior_mask`) joins the refinement input as one more channel, as PFENet's FEM input.
        in_channels = dim * (1 + bool(conditionals)) + int(config.prior_mask)
        self.refinement = MaskRefinement(dim, in_channels, cache_channels, config.refinement_combined_block)

    def initial_cache(self, features: torch.Tensor) -> torch.Tensor | None:
        """The zero cache of the first step (section 4.5), or None without cache."""
        channels = self.refinement.cache_channels
        return features.new_zeros(features.shape[0], channels, *features.shape[-2:]) if channels else None

    def cache_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The cache of the next step: the softmax (2 channels) or its target channel, detached."""
        probabilities = logits.detach().softmax(dim=1)
        return probabilities if self.refinement.cache_channels == 2 else probabilities[:, 1:]

    def _conditional(self, target, reference, reference_mask) -> torch.Tensor | None:
        outputs = []
        if hasattr(self, "global_conditional"):
            outputs.append(self.global_conditional(target, reference, reference_mask))
        if hasattr(self, "local_conditional"):
            outputs.append(self.local_conditional(target, reference, reference_mask))
        return self.conditional_fuse(torch.cat(outputs, dim=1)) if outputs else None

    def forward(
        self,
        target: torch.Tensor,
        reference: torch.Tensor,
        reference_mask: torch.Tensor,
        steps: int,
        grad_steps: int = 1,
        target_is_query: bool = True,
        co_occurrence: bool = True,
        prior: torch.Tensor | None = None,
    ) -> PairPrediction:
        """
        Args:
            target (`torch.FloatTensor` of shape `(B, C, h, w)`): encoder features of the image to segment.
            reference (`torch.FloatTensor` of shape `(B, C, h', w')`): encoder features of the annotated image.
            reference_mask (`torch.FloatTensor` of shape `(B, 1, h', w')`): its target mask in [0, 1].
            steps (`int`): refinement steps (the cache starts at zeros; without cache one step is run).
            grad_steps (`int`): the last `grad_steps` steps keep autograd (the cache is detached between steps).
            target_is_query (`bool`): which FC pair of an unshared cross-reference module sees which image.
            co_occurrence (`bool`): also run the co-occurrence heads.
            prior (`torch.FloatTensor` of shape `(B, 1, h, w)`, *optional*): the target's prior mask in [0, 1]
                (`cosine_prior_mask`); required with `prior_mask=True`, refused without.

        Raises:
            `ValueError`: `prior` given without `config.prior_mask`, or missing with it.
        """
        if (prior is not None) != self.config.prior_mask:
            raise ValueError(
                f"CRCNetHead got prior={'a tensor' if prior is not None else None} with "
                f"prior_mask={self.config.prior_mask}: pass the prior mask exactly when prior_mask=True"
            )
        features_target, features_reference = target, reference
        target_co = reference_co = None
        if hasattr(self, "cross_reference"):
            if target_is_query:
                target, reference = self.cross_reference(target, reference)
            else:
                reference, target = self.cross_reference(reference, target)
            if co_occurrence:
                target_co, reference_co = self.co_occurrence(target), self.co_occurrence(reference)
        if self.config.conditional_input == "encoder":
            conditional = self._conditional(features_target, features_reference, reference_mask)
        else:
            conditional = self._conditional(target, reference, reference_mask)
        inputs = target if conditional is None else torch.cat([conditional, target], dim=1)
        if prior is not None:
            inputs = torch.cat([inputs, prior], dim=1)
        features = self.refinement.features(inputs)
        cache = self.initial_cache(features)
        steps = steps if cache is not None else 1
        logits, caches = [], []
        for step in range(steps):
            caches.append(cache)
            with torch.set_grad_enabled(torch.is_grad_enabled() and step >= steps - grad_steps):
                logits.append(self.refinement.step(features, cache))
            if cache is not None:
                cache = self.cache_from_logits(logits[-1])
        return PairPrediction(logits, caches, target_co, reference_co)


@dataclass
class CRCNetSupportEncoding(SupportEncoding):
    """
    What CRCNet keeps of a support set.

    Args:
        shot (`int`): number of support images K.
        scales (`torch.FloatTensor` of shape `(batch_size, num_scales)`): the image scales the features are at.
        features (`tuple` of `torch.FloatTensor` of shape `(batch_size, shot, reduce_dim, h_s, w_s)`):
            Siamese encoder features of the supports, one per scale.
        feature_masks (`tuple` of `torch.FloatTensor` of shape `(batch_size, shot, 1, h_s, w_s)`):
            target masks in [0, 1] at each scale's feature size (ignored pixels count as background).
        labels (`torch.LongTensor` of shape `(batch_size, shot, height, width)`): the support masks {0, 1, 255}.
        adapted_parameters (`tuple` of `torch.FloatTensor`, each `(batch_size, *parameter_shape)`, *optional*):
            the head's parameters finetuned on each support set (K-shot finetuning), in `head.named_parameters()`
            order; None when not finetuned.
        high_features (`tuple` of `torch.FloatTensor` of shape `(batch_size, shot, C4, h_s, w_s)`, *optional*):
            the frozen backbone's layer4 features of the supports, one per scale (no autograd), for the prior mask;
            None unless `prior_mask`.
        finetune_diverged (`torch.BoolTensor` of shape `(batch_size,)`, *optional*): True for each support set
            whose finetuning diverged (`finetune_max_loss_ratio`) and that keeps the unadapted head in
            `adapted_parameters`; None when not finetuned. Evaluation counts them.
    """

    scales: torch.FloatTensor | None = None
    features: tuple[torch.FloatTensor, ...] | None = None
    feature_masks: tuple[torch.FloatTensor, ...] | None = None
    labels: torch.LongTensor | None = None
    adapted_parameters: tuple[torch.FloatTensor, ...] | None = None
    high_features: tuple[torch.FloatTensor, ...] | None = None
    finetune_diverged: torch.BoolTensor | None = None


_LEVELS = {"layer3+layer4": (3, 4), "layer2+layer3": (2, 3), "layer4": (4,)}


def _resize_images(pixel_values: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return pixel_values
    size = [max(8, round(side * scale)) for side in pixel_values.shape[-2:]]
    return _upsample(pixel_values, size)


def _shot_mean(x: torch.Tensor, shot: int) -> torch.Tensor:
    """`(N * shot, ...)` -> `(N, ...)`: the mean over the shots of each support set."""
    return x.unflatten(0, (-1, shot)).mean(dim=1)


def _as_float32(features: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
    """The (encoder, layer4) features of `_encode` in float32 (None stays None), for the float32 finetuning."""
    return tuple(None if x is None else x.float() for x in features)


def _probability(logits: torch.Tensor) -> torch.Tensor:
    """`(N, 2, h, w)` logits -> `(N, 1, h, w)` float32 target probability (softmax in float32 for any dtype)."""
    return logits.float().softmax(dim=1)[:, 1:]


def _repeat_shots(x: torch.Tensor | None, shot: int) -> torch.Tensor | None:
    """`(N, ...)` -> `(N * shot, ...)`: each item repeated for the shots of its support set (None stays None)."""
    return None if x is None else x.unsqueeze(1).expand(-1, shot, *x.shape[1:]).flatten(0, 1)


def _target_mask(labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`(..., H, W)` labels {0, 1, 255} -> `(..., 1, H, W)` target mask of `dtype`, the features' (ignored pixels are
    background)."""
    return (labels == 1).unsqueeze(-3).to(dtype)


class CRCNetModel(FewShotSegmentationPreTrainedModel):
    r"""
    CRCNet few-shot segmenter (paper section 4).

    1. Siamese encoder: a dilated ResNet (`backbone`, output stride 8); the configured stages are concatenated and
       projected by a 3x3 conv to `reduce_dim` (`encoder_projection`).
    2. `head` (`CRCNetHead`) for a (target, reference) pair: cross-reference reweighting (G), co-occurrence heads
       (training losses, `co_occurrence` map), global + local conditional modules on the reference mask, and the
       mask refinement module run `refinement_steps` times with its cache.
    3. Symmetric prediction: the query from each support, and each support from the query (`support_logits`,
       conditioned on the query label in training and on the predicted query probability at inference).
    4. K shots: `shot_fusion` averages the per-support probabilities and/or finetunes a copy of the head on support
       pairs inside `encode_support` (section 4.6); inference averages the probabilities of `inference_scales`.

    Logits at inference are `log` of the fused probabilities (background, target), so their softmax is the fused
    probability; in training they are the raw logits of the last refinement step (averaged over the K pairs).
    Training loss (Eq. 5): `(L_QM + support_loss_weight L_SM) + co_occurrence_loss_weight (L_QMsub + L_SMsub)`.
    """

    config_class = CRCNetConfig
    finetune_count = 0  # support sets finetuned so far (class-wide), for tests and benchmarks

    def __init__(self, config: CRCNetConfig):
        super().__init__(config)
        self.backbone = self.build_backbone()
        levels = _LEVELS[config.feature_levels]
        if 4 not in levels:  # layer4 unused: keep it out of the optimiser (and of DDP's unused-parameter check)
            self.backbone.layer4.requires_grad_(False)
        in_channels = sum(self.backbone.channels[level] for level in levels)
        self.encoder_projection = nn.Sequential(
            nn.Conv2d(in_channels, config.reduce_dim, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Dropout2d(config.encoder_dropout),
        )
        self.head = CRCNetHead(config)
        self.post_init()

    @property
    def output_maps(self) -> dict[str, str]:
        """Every map `outputs.maps` may hold: one per refinement step (as many as the config runs) and the
        co-occurrence map."""
        most = max(self.config.refinement_steps, self.config.training_refinement_steps)
        maps = {f"refinement_step_{t}": f"target probability after refinement step {t}" for t in range(1, most + 1)}
        maps["co_occurrence"] = "probability of the object co-occurring in query and support (cross-reference head)"
        return maps

    def _init_weights(self, module):
        # (15) He init for the modules' convs: no normalisation layer keeps their activations' scale otherwise.
        if self.config.module_init == "kaiming_normal" and isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    # --- encoder -------------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Siamese encoder: `(N, 3, H, W)` -> `(N, reduce_dim, H / 8, W / 8)` (the configured stages, projected)."""
        return self._encode(pixel_values, high_level=False)[0]

    def _encode(self, pixel_values: torch.Tensor, high_level: bool | None = None):
        """
        `(N, 3, H, W)` -> (encoder features `(N, reduce_dim, h, w)`, layer4 features `(N, C4, h, w)` or None). The
        layer4 features (for the prior mask; `high_level` defaults to `config.prior_mask`) never carry autograd:
        detached when layer4 is one of the encoder's levels, else computed once more from layer3 under no_grad.
        """
        high_level = self.config.prior_mask if high_level is None else high_level
        levels = _LEVELS[self.config.feature_levels]
        stages = self.backbone.forward_stages(pixel_values, 0, max(levels) + 1)
        size = stages[levels[-1]].shape[-2:]
        features = self.encoder_projection(torch.cat([_upsample(stages[level], size) for level in levels], dim=1))
        if not high_level:
            return features, None
        if len(stages) > 4:
            return features, stages[4].detach()
        with torch.no_grad():
            return features, self.backbone.forward_stages(stages[3], 4, 5)[0]

    def _prior(self, target_high, reference_high, reference_mask, size) -> torch.Tensor | None:
        """PFENet's prior mask of the targets `(N, 1, *size)` from the layer4 features `(N, C4, h, w)` of targets and
        references and the references' masks `(N, 1, h', w')`; None when `prior_mask` is off."""
        if target_high is None:
            return None
        return cosine_prior_mask(target_high, reference_high, reference_mask.detach(), output_size=tuple(size))

    def _scales(self) -> tuple[float, ...]:
        return (1.0,) if self.training else tuple(self.config.inference_scales)

    def _encode_support(self, support_pixel_values, support_masks) -> CRCNetSupportEncoding:
        batch_size, shot = support_pixel_values.shape[:2]
        images = support_pixel_values.flatten(0, 1)
        targets = _target_mask(support_masks.flatten(0, 1), images.dtype)
        scales = self._scales()
        features, feature_masks, high_features = [], [], []
        for scale in scales:
            scaled, high = self._encode(_resize_images(images, scale))
            features.append(scaled.unflatten(0, (batch_size, shot)))
            feature_masks.append(resize_mask(targets, scaled.shape[-2:]).unflatten(0, (batch_size, shot)))
            if high is not None:
                high_features.append(high.unflatten(0, (batch_size, shot)))
        adapted = diverged = None
        if not self.training and shot > 1 and self.config.shot_fusion != "average":
            adapted, diverged = self._finetune_support_sets(support_pixel_values, support_masks)
        return CRCNetSupportEncoding(
            shot=shot,
            scales=torch.tensor(scales, device=images.device).expand(batch_size, -1),
            features=tuple(features),
            feature_masks=tuple(feature_masks),
            labels=support_masks.long(),
            adapted_parameters=adapted,
            high_features=tuple(high_features) if high_features else None,
            finetune_diverged=diverged,
        )

    # --- K-shot finetuning (section 4.6) -------------------------------------------------------------------------
    def _finetune_support_sets(
        self, support_pixel_values, support_masks
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """
        Finetune a copy of the head on each support set (batch item) and return the adapted parameters stacked over
        the batch, in `head.named_parameters()` order and the model's dtype, and a `(batch_size,)` bool tensor, True
        where the finetuning diverged and the unadapted head was kept. The model's own weights are never touched.
        The encoder is fixed, so the features of the supports and of their horizontal flips are computed once,
        without autograd, in the model's dtype; the finetuning itself runs in float32 (see `_finetune`).
        """
        adapted, diverged = [], []
        unadapted = tuple(p.detach().float() for p in self.head.parameters())
        for index, (images, masks) in enumerate(zip(support_pixel_values, support_masks)):
            with torch.no_grad():
                features = _as_float32(self._encode(images))
                flipped = _as_float32(self._encode(images.flip(-1))) if self.config.finetune_flip else None
            params = self._finetune(features, flipped, masks.long(), index)
            diverged.append(params is None)
            adapted.append(unadapted if params is None else params)
        dtypes = [p.dtype for p in self.head.parameters()]
        stacked = tuple(torch.stack(values).to(dtype) for values, dtype in zip(zip(*adapted), dtypes))
        return stacked, torch.tensor(diverged, device=support_pixel_values.device)

    def _finetune(self, features, flipped, labels, index: int = 0) -> tuple[torch.Tensor, ...] | None:
        """
        `finetune_steps` optimiser steps on one random ordered pair of supports each (with a random horizontal
        flip), the training loss of Eq. 5 on both predictions; pairs and flips from a generator seeded with
        `finetune_seed`, so a support set always gives the same result. The head's copy, its gradients, the loss and
        the optimiser state are float32 whatever the model's dtype (float16 gradients overflow, and bfloat16 drops
        updates smaller than 1/256 of a weight).

        Finetuning stops when a step's loss is not finite or exceeds `finetune_max_loss_ratio` times the first
        step's, or when it leaves non-finite weights (see `_log_divergence`).

        Args:
            features, flipped (`tuple`): (encoder features `(K, reduce_dim, h, w)`, layer4 features `(K, C4, h, w)`
                or None without `prior_mask`) of the supports and of their flips (`flipped` None without flips),
                float32.
            labels (`torch.LongTensor` of shape `(K, H, W)`): support masks {0, 1, 255}.
            index (`int`): the support set's index in the batch, for the log.

        Returns:
            `tuple` of float32 tensors: the head's adapted parameters; None when the finetuning diverged.
        """
        config = self.config
        shot = features[0].shape[0]
        pairs = [(i, j) for i in range(shot) for j in range(shot) if i != j or config.finetune_pairs == "all"]
        params = {name: p.detach().float().clone().requires_grad_(True) for name, p in self.head.named_parameters()}
        if config.finetune_optimizer == "sgd":
            optimizer = torch.optim.SGD(
                params.values(), lr=config.finetune_learning_rate, momentum=config.finetune_momentum
            )
        else:
            optimizer = torch.optim.Adam(params.values(), lr=config.finetune_learning_rate)
        generator = torch.Generator().manual_seed(config.finetune_seed)
        type(self).finetune_count += 1
        first_loss = None
        with torch.enable_grad():
            for step in range(config.finetune_steps):
                target, reference = pairs[int(torch.randint(len(pairs), (1,), generator=generator))]
                flip = flipped is not None and bool(torch.rand((), generator=generator) < 0.5)
                (source, high), pair_labels = (flipped, labels.flip(-1)) if flip else (features, labels)
                pair_labels = pair_labels[[target, reference]]
                pair_high = (
                    (None, None) if high is None else (high[target : target + 1], high[reference : reference + 1])
                )
                loss, _ = self._pair_losses(
                    params,
                    source[target : target + 1],
                    source[reference : reference + 1],
                    pair_labels[:1],
                    pair_labels[1:],
                    pair_high,
                )
                value = float(loss.detach())
                first_loss = value if first_loss is None else first_loss
                if not math.isfinite(value) or value > config.finetune_max_loss_ratio * first_loss:
                    return self._log_divergence(index, f"at step {step + 1} the loss is {value:.4g}", first_loss)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        if not all(bool(torch.isfinite(p).all()) for p in params.values()):
            return self._log_divergence(index, "the last step left non-finite weights", first_loss)
        return tuple(p.detach() for p in params.values())

    def _log_divergence(self, index: int, reason: str, first_loss: float | None) -> None:
        """
        Log that the finetuning of support set `index` diverged: the cause and the fix once per process and
        setting (`warning_once`: an evaluation where every finetuning diverges would print one line per episode),
        the support set and its losses at INFO level each time. Returns None (no adapted parameters).
        """
        config = self.config
        logger.warning_once(
            "CRCNet K-shot finetuning diverged (a step's loss was not finite or above finetune_max_loss_ratio="
            f"{config.finetune_max_loss_ratio:g} x the first step's, or it left non-finite weights): such a support "
            "set keeps the unadapted head; lower finetune_learning_rate "
            f"({config.finetune_learning_rate:g}) or use shot_fusion='average' (logged once; the support encoding's "
            "finetune_diverged marks each such support set and evaluate.py counts them)"
        )
        first = "none" if first_loss is None else f"{first_loss:.4g}"  # None: finetune_steps=0
        logger.info(f"CRCNet K-shot finetuning of support set {index} diverged: {reason} (first step's loss {first})")
        return None

    # --- predictions ---------------------------------------------------------------------------------------------
    def _run_head(self, params, *args, **kwargs) -> PairPrediction:
        """The head with its own parameters (`params` None) or with finetuned ones (a name -> tensor dict)."""
        if params is None:
            return self.head(*args, **kwargs)
        return functional_call(self.head, params, args, kwargs)

    def _head_parameters(self, encoding: CRCNetSupportEncoding, index: int) -> dict[str, torch.Tensor] | None:
        if encoding.adapted_parameters is None:
            return None
        names = [name for name, _ in self.head.named_parameters()]
        return {name: value[index] for name, value in zip(names, encoding.adapted_parameters)}

    def _predict_query(self, query, encoding, scale_index, params) -> tuple[PairPrediction, int]:
        """
        The query (`query`: encoder features `(N, C, h, w)` and layer4 features or None) predicted from every
        support of the N support sets: one batch of N * K pairs.
        """
        support = encoding.features[scale_index]
        batch_size, shot = support.shape[:2]
        if params is not None and self.config.shot_fusion == "finetune":
            shot = 1  # finetune only: the first support conditions the prediction
        query_features, query_high = (_repeat_shots(x, shot) for x in query)
        masks = encoding.feature_masks[scale_index][:, :shot].flatten(0, 1)
        support_high = None if query_high is None else encoding.high_features[scale_index][:, :shot].flatten(0, 1)
        prior = self._prior(query_high, support_high, masks, query_features.shape[-2:])
        steps = self.config.refinement_steps
        support = support[:, :shot].flatten(0, 1)
        return self._run_head(params, query_features, support, masks, steps, prior=prior), shot

    def _infer_scale(self, pixel_values, encoding, scale_index, scale):
        """
        Fused target probability `(B, 1, H, W)` at one scale, plus the per-step maps and the query features. The
        probabilities (softmax, shot and scale averages) are float32 whatever the model's dtype.
        """
        query = self._encode(_resize_images(pixel_values, scale))
        groups = range(pixel_values.shape[0]) if encoding.adapted_parameters is not None else [None]
        probabilities, steps, co_occurrence = [], [], []
        for index in groups:
            selected = slice(None) if index is None else slice(index, index + 1)
            params = None if index is None else self._head_parameters(encoding, index)
            sub_encoding = encoding if index is None else _select(encoding, selected)
            selected_query = tuple(None if x is None else x[selected] for x in query)
            prediction, shot = self._predict_query(selected_query, sub_encoding, scale_index, params)
            target = _upsample(_probability(prediction.logits[-1]), pixel_values.shape[-2:])
            probabilities.append(_shot_mean(target, shot))
            steps.append([_shot_mean(_probability(logits), shot) for logits in prediction.logits])
            if prediction.target_co_occurrence is not None:
                co_occurrence.append(_shot_mean(_probability(prediction.target_co_occurrence), shot))
        maps = {f"refinement_step_{t + 1}": torch.cat(step) for t, step in enumerate(zip(*steps))}
        if co_occurrence:
            maps["co_occurrence"] = torch.cat(co_occurrence)
        return torch.cat(probabilities), maps, query

    def _predict_supports(self, query, query_probability, encoding, scale_index) -> torch.Tensor:
        """
        Each support predicted from the query (`query`: encoder features `(B, C, h, w)` and layer4 features or None)
        and its predicted probability `(B, 1, H, W)`: `(B, K, 2, H_s, W_s)` logits.
        """
        query_features, query_high = query
        support = encoding.features[scale_index]
        batch_size, shot = support.shape[:2]
        mask = resize_mask(query_probability.to(query_features.dtype), query_features.shape[-2:])
        logits = []
        for index in range(batch_size) if encoding.adapted_parameters is not None else [None]:
            selected = slice(None) if index is None else slice(index, index + 1)
            params = None if index is None else self._head_parameters(encoding, index)
            count = support[selected].shape[0]
            target = support[selected].flatten(0, 1)
            reference = _repeat_shots(query_features[selected], shot)
            reference_mask = _repeat_shots(mask[selected], shot)
            prior = None
            if query_high is not None:
                target_high = encoding.high_features[scale_index][selected].flatten(0, 1)
                reference_high = _repeat_shots(query_high[selected], shot)
                prior = self._prior(target_high, reference_high, reference_mask, target.shape[-2:])
            prediction = self._run_head(
                params, target, reference, reference_mask, self.config.refinement_steps,
                target_is_query=False, co_occurrence=False, prior=prior,
            )  # fmt: skip
            logits.append(prediction.logits[-1].unflatten(0, (count, shot)))
        logits = torch.cat(logits)
        return _upsample(logits.flatten(0, 1), encoding.labels.shape[-2:]).unflatten(0, (batch_size, shot))

    def _infer(self, pixel_values, encoding) -> FewShotSegmentationOutput:
        scales = [float(s) for s in encoding.scales[0].tolist()]
        main = min(range(len(scales)), key=lambda i: abs(scales[i] - 1.0))  # maps and supports at scale ~1
        total, maps, main_features, main_probability = 0.0, None, None, None
        for index, scale in enumerate(scales):
            probability, scale_maps, query_features = self._infer_scale(pixel_values, encoding, index, scale)
            total = total + probability
            if index == main:
                maps, main_features, main_probability = scale_maps, query_features, probability
        # Clamped and logged in float32: 1 - 1e-6 rounds to 1 in float16 / bfloat16 and its log1p(-p) to -inf.
        probability = (total / len(scales)).clamp(1e-6, 1 - 1e-6)
        logits = torch.cat([torch.log1p(-probability), torch.log(probability)], dim=1).to(pixel_values.dtype)
        support_logits = None
        if self.config.predict_support:
            support_logits = self._predict_supports(main_features, main_probability, encoding, main)
        return FewShotSegmentationOutput(logits=logits, support_logits=support_logits, maps=maps)

    # --- training ------------------------------------------------------------------------------------------------
    def _training_steps(self) -> tuple[int, int]:
        """(steps, steps with gradient) of one training prediction, by `refinement_training`."""
        config = self.config
        if config.refinement_training == "random_history":
            # CANet-like: sometimes start from the model's own (detached) prediction instead of the zero cache.
            steps = 2 if bool(torch.rand(()) < config.refinement_history_probability) else 1
        else:
            steps = config.training_refinement_steps
        return steps, steps if config.intermediate_loss else 1

    def _cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """2-class cross-entropy at the labels' size, in float32 whatever the model's dtype."""
        logits = _upsample(logits.float(), labels.shape[-2:])
        if not bool((labels != self.config.ignore_index).any()):
            return logits.sum() * 0.0  # every pixel ignored: no signal, but keep the graph
        return F.cross_entropy(logits, labels, ignore_index=self.config.ignore_index)

    def _step_loss(self, step_logits: list[torch.Tensor], labels: torch.Tensor, grad_steps: int) -> torch.Tensor:
        """The loss of the final step, or the mean over the steps that kept autograd (`intermediate_loss`)."""
        return torch.stack([self._cross_entropy(x, labels) for x in step_logits[-grad_steps:]]).mean()

    def _pair_losses(self, params, query, support, query_labels, support_labels, high=(None, None)):
        """
        Eq. 5 for N (query, support) pairs: the query from the support (QM, QM_sub, SM_sub) and the support from the
        query label (SM). Features `(N, C, h, w)`, labels `(N, H, W)` in {0, 1, 255}, `high` the (query, support)
        layer4 features `(N, C4, h, w)` for the prior masks (None without `prior_mask`). Returns the total loss,
        the named terms, and the two predictions.
        """
        config = self.config
        steps, grad_steps = self._training_steps()
        query_high, support_high = high
        support_mask = resize_mask(_target_mask(support_labels, support.dtype), support.shape[-2:])
        query_mask = resize_mask(_target_mask(query_labels, query.dtype), query.shape[-2:])
        query_prior = self._prior(query_high, support_high, support_mask, query.shape[-2:])
        support_prior = self._prior(support_high, query_high, query_mask, support.shape[-2:])
        forward = self._run_head(params, query, support, support_mask, steps, grad_steps, prior=query_prior)
        backward = self._run_head(
            params, support, query, query_mask, steps, grad_steps,
            target_is_query=False, co_occurrence=False, prior=support_prior,
        )  # fmt: skip
        losses = {
            "query": self._step_loss(forward.logits, query_labels, grad_steps),
            "support": self._step_loss(backward.logits, support_labels, grad_steps),
        }
        total = losses["query"] + config.support_loss_weight * losses["support"]
        if forward.target_co_occurrence is not None:
            losses["query_co_occurrence"] = self._cross_entropy(forward.target_co_occurrence, query_labels)
            losses["support_co_occurrence"] = self._cross_entropy(forward.reference_co_occurrence, support_labels)
            co_occurrence = losses["query_co_occurrence"] + losses["support_co_occurrence"]
            total = total + config.co_occurrence_loss_weight * co_occurrence
        return total, (losses, forward, backward)

    def _train_forward(self, pixel_values, encoding, labels) -> FewShotSegmentationOutput:
        """Every (query, support) pair of the batch as a 1-shot pair; logits averaged over the K pairs."""
        support = encoding.features[0]
        batch_size, shot = support.shape[:2]
        query, query_high = self._encode(pixel_values)
        query_pairs, query_high = _repeat_shots(query, shot), _repeat_shots(query_high, shot)
        support_high = None if query_high is None else encoding.high_features[0].flatten(0, 1)
        size = pixel_values.shape[-2:]
        if labels is None:  # no query label: predict the query only
            steps, _ = self._training_steps()
            masks = encoding.feature_masks[0].flatten(0, 1)
            prior = self._prior(query_high, support_high, masks, query.shape[-2:])
            forward = self.head(query_pairs, support.flatten(0, 1), masks, steps, prior=prior)
            logits = _upsample(forward.logits[-1], size).unflatten(0, (batch_size, shot)).mean(dim=1)
            return FewShotSegmentationOutput(logits=logits, maps=self._training_maps(forward, shot))
        query_labels = labels.long().unsqueeze(1).expand(-1, shot, -1, -1).flatten(0, 1)
        total, (losses, forward, backward) = self._pair_losses(
            None,
            query_pairs,
            support.flatten(0, 1),
            query_labels,
            encoding.labels.flatten(0, 1),
            (query_high, support_high),
        )
        logits = _upsample(forward.logits[-1], size).unflatten(0, (batch_size, shot)).mean(dim=1)
        support_logits = _upsample(backward.logits[-1], encoding.labels.shape[-2:]).unflatten(0, (batch_size, shot))
        return FewShotSegmentationOutput(
            loss=total,
            logits=logits,
            losses={name: value.detach() for name, value in losses.items()},
            support_logits=support_logits,
            maps=self._training_maps(forward, shot),
        )

    @staticmethod
    def _training_maps(prediction: PairPrediction, shot: int) -> dict[str, torch.Tensor]:
        def shot_mean(logits):
            return logits.detach().softmax(dim=1)[:, 1:].unflatten(0, (-1, shot)).mean(dim=1)

        maps = {f"refinement_step_{t + 1}": shot_mean(x) for t, x in enumerate(prediction.logits)}
        if prediction.target_co_occurrence is not None:
            maps["co_occurrence"] = shot_mean(prediction.target_co_occurrence)
        return maps

    # --- forward -------------------------------------------------------------------------------------------------
    def _segment(self, pixel_values, support_encoding, labels=None) -> FewShotSegmentationOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`)
            support_encoding (`CRCNetSupportEncoding`)
            labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*): {0, 1, 255}; in
                training the loss of Eq. 5 (query and support predictions, co-occurrence terms).

        Returns:
            `FewShotSegmentationOutput` with `logits` `(batch_size, 2, height, width)`, `support_logits`
            `(batch_size, shot, 2, height_s, width_s)` (unless `predict_support=False` at inference), `maps`
            (`refinement_step_t`, `co_occurrence`, each `(batch_size, 1, h, w)`) and, with labels in training,
            `loss` and `losses` (`query`, `support`, `query_co_occurrence`, `support_co_occurrence`).
        """
        if not isinstance(support_encoding, CRCNetSupportEncoding):
            raise ValueError(
                f"support_encoding must be a CRCNetSupportEncoding, got {type(support_encoding).__name__}"
            )
        if self.training:
            return self._train_forward(pixel_values, support_encoding, labels)
        outputs = self._infer(pixel_values, support_encoding)
        if labels is not None:  # evaluation loss: the query term on the fused prediction
            outputs.loss = self._cross_entropy(outputs.logits, labels.long())
            outputs.losses = {"query": outputs.loss.detach()}
        return outputs


def _select(encoding: CRCNetSupportEncoding, selected: slice) -> CRCNetSupportEncoding:
    """The encoding of some support sets of a batch (tensors sliced along the batch dimension)."""
    values = {}
    for name, value in encoding.items():
        if isinstance(value, torch.Tensor):
            value = value[selected]
        elif isinstance(value, tuple):
            value = tuple(v[selected] for v in value)
        values[name] = value
    return CRCNetSupportEncoding(**values)
