"""
SMCP: Semantically Meaningful Class Prototype learning (Chen et al., "Semantically Meaningful Class Prototype Learning
for One-Shot Image Segmentation", IEEE TMM 2021, arXiv:2102.10935).

A dilated VGG-16 (trained, not frozen) encodes query and support; the support prototype (masked average pooling at
image resolution) is tiled, concatenated with the query features, reduced (`feat_rd`), processed by a pyramid module
(`pyramid_m`) and classified by an ASPP head (`classifier_2`). Training adds a multi-class ASPP head over the base
classes (MCL, `classifier`) on both images and segments the support with its own prototype (SPT). At test time the
query's first prediction gives a pseudo-mask whose query prototype is fused with the support prototype for a second
pass.

Module and parameter names follow the official code (`classifier`, `feat_rd`, `pyramid_m.{p1,p2,p3,feat_fuse,
residule1,residule2}`, `classifier_2`), with the encoder under `backbone.layer{k}`; `convert_smcp.py` maps the keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from ...differences import read_differences
from ...modeling_fss import FewShotSegmentationOutput, FewShotSegmentationPreTrainedModel, SupportEncoding
from ...modules import ASPPBranch, ASPPClassifier, MaskedCrossEntropy, conv_relu, resize
from .configuration_smcp import SMCPConfig

logger = logging.get_logger(__name__)

__all__ = [
    "DIFFERENCES_FROM_OFFICIAL_CODE",
    "SMCPLoss",
    "SMCPModel",
    "SMCPPyramidModule",
    "SMCPSupportEncoding",
    "fuse_prototypes",
    "image_resolution_prototype",
]

# Every place where the paper, the official code (github.com/NUST-Machine-Intelligence-Laboratory/SMCP) and this
# implementation part ways, with the choice made here: package data (hf_fss/model_cards/differences/smcp.md), which the
# model card renders.
DIFFERENCES_FROM_OFFICIAL_CODE = read_differences("smcp")


@dataclass
class SMCPSupportEncoding(SupportEncoding):
    """
    SMCP's support encoding: prototypes pooled at image resolution (Eq. 1) for the query, each support's own for the
    SPT branch, and in training the MCL head's scores and targets.

    Args (besides `shot`):
        prototype (`torch.FloatTensor` of shape `(batch_size, channels, 1, 1)`):
            Mean over shots of the support prototypes (Eq. 1, masked average pooling at image resolution).
        shot_prototypes (`torch.FloatTensor` of shape `(batch_size, shot, channels, 1, 1)`):
            Each support's own prototype (the self-prototype of the SPT branch).
        features (`torch.FloatTensor` of shape `(batch_size, shot, channels, h, w)`):
            Encoder output (fc7) of each support, for the training losses.
        masks (`torch.LongTensor` of shape `(batch_size, shot, height, width)`):
            The support masks (0, 1, 255), the SPT targets.
        semantic_logits (`torch.FloatTensor` of shape `(batch_size, shot, num_base_classes + 1, h, w)`, *optional*):
            MCL head scores of each support; only in training.
        semantic_labels (`torch.LongTensor` of shape `(batch_size, shot, height, width)`, *optional*):
            The supports' multi-class labels (`support_semantic_labels`), only in training.
    """

    shot_mean_fields = ("prototype",)  # the mean of `shot_prototypes`

    prototype: torch.FloatTensor | None = None
    shot_prototypes: torch.FloatTensor | None = None
    features: torch.FloatTensor | None = None
    masks: torch.LongTensor | None = None
    semantic_logits: torch.FloatTensor | None = None
    semantic_labels: torch.LongTensor | None = None


@lru_cache(maxsize=32)
def _linear_interpolation_matrix(in_size: int, out_size: int) -> torch.Tensor:
    # Row c = the weights with which input position c contributes to each output position of torch's 1-D linear
    # interpolation (align_corners=False): the interpolation of the c-th unit impulse. Bilinear is separable, so the
    # 2-D upsampling is R_h^T X R_w.
    eye = torch.eye(in_size, dtype=torch.float64).unsqueeze(0)
    return F.interpolate(eye, size=out_size, mode="linear", align_corners=False)[0]  # (in_size, out_size)


def image_resolution_prototype(
    features: torch.Tensor, mask: torch.Tensor, mode: str = "adjoint", eps: float = 1e-5
) -> torch.Tensor:
    """
    Masked average pooling at the mask's (image) resolution, SMCP's Eq. 1 (official `Encoder.forward`): the features
    are bilinearly upsampled (align_corners=False) to the mask size and `sum(F * M) / (sum(M) + eps)`.

    Args:
        features (`torch.FloatTensor` of shape `(batch_size, channels, h, w)`).
        mask (`torch.FloatTensor` of shape `(batch_size, 1, height, width)`): 1 on the target, else 0.
        mode (`str`, *optional*, defaults to `"adjoint"`): `"upsample"` computes it literally (a
            `(batch_size, channels, height, width)` tensor); `"adjoint"` pools the features with the mask carried
            down to `(h, w)` by the transpose of the upsampling, which is the same sum (upsampling is linear), to
            float rounding.
        eps (`float`, *optional*, defaults to 1e-5): added to the mask area (official value).

    Returns:
        `torch.FloatTensor` of shape `(batch_size, channels, 1, 1)`; zero for an empty mask.
    """
    # Sums over an image's area leave float16's range (65504) for unit-scale features (a transformers backbone's
    # normalised ones at 417 px): they are accumulated in float32 and returned in the features' dtype.
    area = mask.float().sum(dim=(-2, -1), keepdim=True) + eps
    if mode == "upsample":
        upsampled = F.interpolate(features, size=mask.shape[-2:], mode="bilinear", align_corners=False)
        return ((upsampled * mask).float().sum(dim=(-2, -1), keepdim=True) / area).to(features.dtype)
    if mode != "adjoint":
        raise ValueError(f"mode must be 'adjoint' or 'upsample', got {mode!r}")
    (h, w), (height, width) = features.shape[-2:], mask.shape[-2:]
    rows = _linear_interpolation_matrix(h, height).to(features.device, features.dtype)  # (h, height)
    cols = _linear_interpolation_matrix(w, width).to(features.device, features.dtype)  # (w, width)
    weights = rows.float() @ mask.float() @ cols.float().T  # (batch, 1, h, w)
    return ((features.float() * weights).sum(dim=(-2, -1), keepdim=True) / area).to(features.dtype)


def fuse_prototypes(
    support_prototype: torch.Tensor, pseudo_prototype: torch.Tensor, shot: int, pseudo_mask_area: torch.Tensor
) -> torch.Tensor:
    """
    Test-time prototype fusion (paper section III-G and Fig. 9): the mean of the K support prototypes and the
    pseudo-prototype, `(K * support_prototype + pseudo_prototype) / (K + 1)`; for K = 1 the official
    `(prototype + self_prototype) / 2`. A query whose pseudo-mask is empty keeps `support_prototype` (the official code
    would halve it).

    Args:
        support_prototype (`torch.FloatTensor` of shape `(batch_size, channels, 1, 1)`): mean of the K prototypes.
        pseudo_prototype (`torch.FloatTensor` of shape `(batch_size, channels, 1, 1)`).
        shot (`int`): K.
        pseudo_mask_area (`torch.Tensor` of shape `(batch_size,)`): target pixels of each pseudo-mask.

    Returns:
        `torch.FloatTensor` of shape `(batch_size, channels, 1, 1)`.
    """
    fused = (shot * support_prototype + pseudo_prototype) / (shot + 1)
    empty = (pseudo_mask_area <= 0).view(-1, 1, 1, 1)
    return torch.where(empty, support_prototype, fused)


def _bottleneck(channels: int, inner: int) -> nn.Sequential:
    # 1x1, 3x3, 1x1 with biases (official `residule1/2`); the residual sum and its ReLU are in the module's forward.
    return nn.Sequential(
        nn.Conv2d(channels, inner, kernel_size=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(inner, inner, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(inner, channels, kernel_size=1),
    )


class SMCPPyramidModule(nn.Module):
    r"""
    SMCP's pyramid feature fusion module (PFF, paper section III-D; official `Pyramid_Module`).

    `p1(x) + up(p2(avg(x))) + up(p3(avg(avg(x))))` with `avg` a 3x3 average pool of stride 2 (padding 1) and `up`
    bilinear (align_corners=False) back to the input size; then `feat_fuse` (two 3x3 convs with ReLU) and two
    residual bottlenecks `relu(x + residule_i(x))`.

    Args:
        channels (`int`): input and output channels (512 in SMCP).
        bottleneck_dim (`int`): inner channels of the residual bottlenecks (64).
    """

    def __init__(self, channels: int, bottleneck_dim: int):
        super().__init__()
        self.avg_pooling = nn.AvgPool2d(kernel_size=3, stride=2, padding=1)
        self.p1 = conv_relu(channels, channels)
        self.p2 = conv_relu(channels, channels)
        self.p3 = conv_relu(channels, channels)
        self.feat_fuse = nn.Sequential(*conv_relu(channels, channels), *conv_relu(channels, channels))
        self.residule1 = _bottleneck(channels, bottleneck_dim)
        self.residule2 = _bottleneck(channels, bottleneck_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`(batch_size, channels, h, w)` -> `(batch_size, channels, h, w)`."""
        size = features.shape[-2:]
        half = self.avg_pooling(features)
        quarter = self.avg_pooling(half)
        out = (
            self.p1(features)
            + resize(self.p2(half), size, align_corners=False)
            + resize(self.p3(quarter), size, align_corners=False)
        )
        out = self.feat_fuse(out)
        out = F.relu(out + self.residule1(out))
        return F.relu(out + self.residule2(out))


class SMCPLoss(nn.Module):
    """
    SMCP's training loss (official train.py; paper Eq. 4): `query + support + mcl_loss_weight * (mcl_query +
    mcl_support)`, each a cross-entropy at the labels' size (bilinear resize with `align_corners=False`, as the
    official code): the query, the supports segmented with their own prototypes (SPT) and, in training, the MCL head on
    the query and the supports.

    Args:
        config (`SMCPConfig`): `mcl_loss_weight` and `ignore_index`.
    """

    def __init__(self, config: SMCPConfig):
        super().__init__()
        self.config = config  # read at each call: the weight may change after construction
        self.cross_entropy = MaskedCrossEntropy(config.ignore_index, align_corners=False)

    def forward(
        self,
        labels: torch.Tensor,
        logits: torch.Tensor,
        support_logits: torch.Tensor,
        encoding: SMCPSupportEncoding,
        semantic_logits: torch.Tensor | None = None,
        semantic_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            labels (`torch.LongTensor` of shape `(batch_size, height, width)`): {0, 1, 255}.
            logits (`torch.FloatTensor` of shape `(batch_size, 2, height, width)`).
            support_logits (`torch.FloatTensor` of shape `(batch_size * shot, 2, h, w)`): the SPT predictions.
            encoding (`SMCPSupportEncoding`): the support masks and, in training, the supports' MCL logits and labels.
            semantic_logits (`torch.FloatTensor` of shape `(batch_size, num_base_classes + 1, h, w)`, *optional*): the
                query's MCL logits; without them (or the supports') the MCL terms are skipped in training, with a
                warning.
            semantic_labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*).

        Returns:
            `tuple(torch.FloatTensor, dict[str, torch.FloatTensor])`: the total and the detached named terms (`query`,
            `support`, and with MCL `mcl_query`, `mcl_support`).
        """
        query = self.cross_entropy(logits, labels)
        support = self.cross_entropy(support_logits, encoding.masks.flatten(0, 1))
        total = query + support
        losses = {"query": query, "support": support}
        if self.training and self.config.mcl_loss_weight > 0:
            if semantic_logits is None or encoding.semantic_labels is None:
                logger.warning_once(
                    "SMCP: training without `semantic_labels` and `support_semantic_labels`, so the multi-class label "
                    "guidance (MCL) loss is skipped; the episodic dataset emits them for this model."
                )
            else:
                mcl_query = self.cross_entropy(semantic_logits, semantic_labels)
                mcl_support = self.cross_entropy(
                    encoding.semantic_logits.flatten(0, 1), encoding.semantic_labels.flatten(0, 1)
                )
                total = total + self.config.mcl_loss_weight * (mcl_query + mcl_support)
                losses.update(mcl_query=mcl_query, mcl_support=mcl_support)
        return total, {name: value.detach() for name, value in losses.items()}


class SMCPModel(FewShotSegmentationPreTrainedModel):
    r"""
    SMCP one-shot (and K-shot) segmenter.

    Pipeline (`h x w` = 52 x 52 for a 417 x 417 input):

    1. Dilated VGG-16 (`backbone`, trained): fc7 features of the query and supports, `(batch, 512, h, w)`.
    2. Support prototype: masked average pooling at image resolution (Eq. 1), averaged over the K shots.
    3. PFF: `feat_rd(query ⊕ tiled prototype)` (3x3 conv 1024 -> 512, ReLU), `pyramid_m`, `classifier_2` (ASPP, 2
       classes); the logits are upsampled (bilinear, align_corners=False) to the input size.
    4. Test time (`pseudo_prototype_fusion`, not training): pseudo-mask = argmax of the upsampled first-pass softmax;
       pseudo-prototype pooled from the query; fused with the support prototypes (weight 1 / (K + 1)); step 3 again.

    Training (`labels`, and the declared `semantic_labels` / `support_semantic_labels` for MCL): cross-entropy of the
    query (`query`), of each support segmented with its own prototype (`support`, SPT) and, weighted by
    `mcl_loss_weight`, of the MCL head (`classifier`, ASPP over background + base classes) on the query and the
    supports (`mcl_query`, `mcl_support`). See `DIFFERENCES_FROM_OFFICIAL_CODE`.
    """

    config_class = SMCPConfig
    support_encoding_class = SMCPSupportEncoding
    support_shots_separable = True  # in eval mode: the MCL scores and labels exist only in training
    query_inputs = ("semantic_labels",)
    support_inputs = ("support_semantic_labels",)
    output_maps = {
        "first_pass": "target probability of the first pass (support prototype only), before prototype fusion",
        "pseudo_mask": "pseudo-mask: argmax of the first pass, whose query prototype is fused with the support's",
    }
    binary_maps = ("pseudo_mask",)
    # Config overrides that make test time a single pass (the benchmark times both).
    single_pass_overrides = {"pseudo_prototype_fusion": False}

    def __init__(self, config: SMCPConfig):
        super().__init__(config)
        self.backbone = self.build_backbone()
        channels = self.backbone.channels[-1]
        rates, std = config.aspp_rates, config.aspp_init_std
        self.classifier = ASPPClassifier(channels, config.num_base_classes + 1, rates, std)
        self.feat_rd = nn.Sequential(*conv_relu(2 * channels, config.reduce_dim))
        self.pyramid_m = SMCPPyramidModule(config.reduce_dim, config.bottleneck_dim)
        self.classifier_2 = ASPPClassifier(config.reduce_dim, 2, rates, std)
        self.criterion = SMCPLoss(config)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, ASPPBranch):  # N(0, 0.01) weights, default biases (official Classifier_Module)
            module.reset_parameters()
        else:
            super()._init_weights(module)

    # --- prototypes ------------------------------------------------------------------------------------------------
    def _prototype(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return image_resolution_prototype(features, mask, mode=self.config.prototype_pooling)

    def _encode_support(
        self, support_pixel_values, support_masks, support_semantic_labels=None
    ) -> SMCPSupportEncoding:
        batch_size, shot = support_pixel_values.shape[:2]
        features = self.backbone_features(support_pixel_values.flatten(0, 1))[-1]
        target = (support_masks.flatten(0, 1) == 1).unsqueeze(1).to(features.dtype)
        prototypes = self._prototype(features, target).unflatten(0, (batch_size, shot))
        semantic_logits = None
        if support_semantic_labels is not None:
            support_semantic_labels = self._check_semantic_labels(
                "support_semantic_labels", support_semantic_labels, tuple(support_masks.shape)
            )
            if self.training:
                semantic_logits = self.classifier(features).unflatten(0, (batch_size, shot))
        return SMCPSupportEncoding(
            shot=shot,
            prototype=prototypes.mean(dim=1),
            shot_prototypes=prototypes,
            features=features.unflatten(0, (batch_size, shot)),
            masks=support_masks,
            semantic_logits=semantic_logits,
            semantic_labels=support_semantic_labels if self.training else None,
        )

    def _check_semantic_labels(self, name: str, labels, shape: tuple[int, ...]) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != shape:
            found = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"{name} must have shape {shape} (that of the masks), got {found}")
        labels = labels.long()
        num_classes = self.config.num_base_classes
        invalid = (labels < 0) | ((labels > num_classes) & (labels != self.config.ignore_index))
        if bool(invalid.any()):
            raise ValueError(
                f"{name} must hold 0 (background), 1..{num_classes} (base classes) or {self.config.ignore_index} "
                f"(ignore), got also {sorted(set(labels[invalid].unique()[:5].tolist()))}; set num_base_classes "
                "to the fold's number of base classes"
            )
        return labels

    # --- the segmentation head -------------------------------------------------------------------------------------
    def _head(self, features: torch.Tensor, prototype: torch.Tensor, use_pyramid: bool = True) -> torch.Tensor:
        """`feat_rd(features ⊕ tiled prototype)` -> (`pyramid_m`) -> `classifier_2`: `(batch, 2, h, w)` logits."""
        tiled = prototype.expand(-1, -1, *features.shape[-2:])
        fused = self.feat_rd(torch.cat([features, tiled], dim=1))
        if use_pyramid:
            fused = self.pyramid_m(fused)
        return self.classifier_2(fused)

    def _pseudo_prototype(self, logits: torch.Tensor, features: torch.Tensor, image_size) -> tuple[torch.Tensor, ...]:
        """Pseudo-mask (argmax of the upsampled softmax, `(batch, 1, H, W)`) and the query prototype under it."""
        probabilities = resize(logits.softmax(dim=1), image_size, align_corners=False)
        pseudo_mask = probabilities.argmax(dim=1, keepdim=True).to(features.dtype)
        return pseudo_mask, self._prototype(features, pseudo_mask)

    # --- forward ---------------------------------------------------------------------------------------------------
    def _segment(self, pixel_values, support_encoding, labels=None, semantic_labels=None) -> FewShotSegmentationOutput:
        r"""
        One pass over the queries, two with pseudo-prototype fusion at test time; `semantic_labels` (declared in
        `query_inputs`) joins the arguments of `FewShotSegmentationPreTrainedModel._segment`:

        Args:
            semantic_labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
                The query's multi-class labels: 0 background, 1..num_base_classes base classes, 255 ignored (novel
                classes and boundaries); for the MCL loss in training, ignored otherwise.

        Raises:
            `ValueError`: an encoding of another model, or semantic labels of the wrong shape or out of range.
        """
        encoding = support_encoding
        if semantic_labels is not None:
            shape = (pixel_values.shape[0], *pixel_values.shape[-2:])
            semantic_labels = self._check_semantic_labels("semantic_labels", semantic_labels, shape)
        image_size = pixel_values.shape[-2:]
        features = self.backbone_features(pixel_values)[-1]
        logits = first_logits = self._head(features, encoding.prototype)
        maps = {"first_pass": first_logits.softmax(dim=1)[:, 1:]}
        if self.config.pseudo_prototype_fusion and not self.training:
            pseudo_mask, pseudo_prototype = self._pseudo_prototype(first_logits, features, image_size)
            area = pseudo_mask.flatten(1).sum(dim=1)
            fused = fuse_prototypes(encoding.prototype, pseudo_prototype, encoding.shot, area)
            logits = self._head(features, fused)
            maps["pseudo_mask"] = pseudo_mask
        logits = resize(logits, image_size, align_corners=False)  # as every resize of the official code

        loss = losses = None
        if labels is not None:
            support_logits = self._support_logits(encoding)
            semantic_logits = None  # the MCL head's, when the loss takes its term
            if (
                self.training
                and self.config.mcl_loss_weight > 0
                and None not in (semantic_labels, encoding.semantic_labels)
            ):
                semantic_logits = self.classifier(features)
            loss, losses = self.criterion(labels, logits, support_logits, encoding, semantic_logits, semantic_labels)
        return FewShotSegmentationOutput(loss=loss, logits=logits, losses=losses, maps=maps)

    def _support_logits(self, encoding: SMCPSupportEncoding) -> torch.Tensor:
        """SPT: every support segmented with its own prototype, `(batch * shot, 2, h, w)`."""
        use_pyramid = self.config.self_prototype_branch == "paper"
        return self._head(encoding.features.flatten(0, 1), encoding.shot_prototypes.flatten(0, 1), use_pyramid)
