"""
QGNet: Query Guided Network (Liu et al., "Few-Shot Segmentation with Global and Local Contrastive Learning", 2021,
arXiv:2108.05293).

PFENet with a second, frozen feature extractor, the *prior extractor*, pretrained without labels (global + local
contrastive learning, `scripts/pretrain_prior.py`). From the query alone it gives a *prior region map* that locates
objects (self-correspondence, paper Eq. 8-12), next to PFENet's support-guided *guided region map*
(cross-correspondence); both maps, the query features and the support prototype go through PFENet's feature
enrichment module.

Module and parameter names follow the official code (github.com/liuweide01/QGNet-Few-shot-segmentation, commit
1e77b35, `model/PFENet_QGNet.py`) where they are meaningful (`down_query`, `down_supp`); the official `layer*_unsuper`
stages are `prior_extractor.layer*`, `down_learn_super` / `down_learn_unsuper` are `bridge_projection` /
`prior_projection`, and PFENet's decoder (`init_merge`, `alpha_conv`, `beta_conv`, `inner_cls`, `res1`, `res2`,
`cls`) lives under `feature_enrichment.`; `convert_qgnet.py` maps the keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from ...backbones import StagedBackbone, build_backbone
from ...modeling_fss import FewShotSegmentationOutput, FewShotSegmentationPreTrainedModel, SupportEncoding
from ...modules import (
    FeatureEnrichmentModule,
    masked_average_pooling,
    multi_shot_prior_mask,
    pfenet_mid_level,
    pfenet_support_features,
    resize_mask,
)
from ...utils import looks_local
from .configuration_qgnet import QGNetConfig

logger = logging.get_logger(__name__)

__all__ = ["DIFFERENCES_FROM_OFFICIAL_CODE", "QGNetModel", "QGNetSupportEncoding", "prior_region_map"]

# Every place where the paper, the official code (github.com/liuweide01/QGNet-Few-shot-segmentation, commit 1e77b35)
# and this implementation part ways, with the choice made here. The model card reuses this list.
DIFFERENCES_FROM_OFFICIAL_CODE = (
    "Learned projections: the paper's Eq. 8 compares the raw features of the two extractors; the code first passes "
    "each stage-4 map through a trainable 3x3 conv (2048 -> 256, no bias) + ReLU + Dropout2d(0.5) (down_learn_super "
    "/ down_learn_unsuper, 9.4 M parameters, not in the paper). Default: the code (`region_projection='learned'`, "
    "`bridge_projection` / `prior_projection`); the paper's projection-free form is `region_projection='raw'`.",
    "Bridge features: the paper builds both region maps from the same 'bridge features'; in the code the prior "
    "region map uses the projected supervised stage-4 features, the guided region map PFENet's raw 2048-d stage-4 "
    "features (support masked before and after layer 4), and the decoder's query input is down_query(layer3 + "
    "layer2). We follow the code.",
    "Decoder input order: [query features, support prototype, guided region map, prior region map] (514 channels at "
    "reduce_dim 256); the order is only in the code, kept so converted weights stay valid.",
    "Prior extractor batch norm: the code trains with the BN layers of both frozen extractors in train mode (batch "
    "statistics, drifting running statistics, also in the prior extractor); we keep both in eval mode by default "
    "(`freeze_backbone_batchnorm=True`, `freeze_prior_extractor_batchnorm=True`); set them to False to reproduce the "
    "code. For checkpoint parity the BN statistics come from the trained QGNet checkpoint, not the MoCo file.",
    "Non-square inputs: the code's `view(bsize, sp_sz * sp_sz)` in both region maps requires square feature maps and "
    "its output size requires H = 8k + 1; here both maps are computed on (h, w) maps and the logits are upsampled to "
    "any input size (identical for square 8k + 1 inputs).",
    "K-shot: prototypes and guided region maps are averaged over shots as in the code; the prior region map depends "
    "on the query only and is computed once per query, however many shots (the code also computes it once).",
    "Backbones: the code's constructor crashes for ResNet-101 (no prior extractor built) and VGG (no VGG backbone, "
    "768-channel down_query); here ResNet-50/101 (deep or 7x7 stem) and VGG-16-BN backbones all work, with a "
    "ResNet-50/101 prior extractor at the backbone's output stride. No official weights exist for them.",
    "Eq. 6 of the paper (local contrastive loss) reads exp(q_p . k_p + tau); it is a typo for / tau (as in Eq. 1 "
    "and MoCo), which is what `scripts/pretrain_prior.py` implements (the official repository has no pretraining "
    "code).",
    "Prior-extractor weights: the official loader copies `module.encoder_k.*` keys from ./checkpoint_2000.pth.tar "
    "at construction, and silently loads nothing from a checkpoint saved without `module.`; here the weights come "
    "from `prior_extractor_weights` (safetensors, MoCo layout with or without `module.`, encoder_k or encoder_q) "
    "and every key must match.",
    "Loss: the paper names cross-entropy; the code adds the mean cross-entropy of the four per-scale classifiers "
    "with weight 1.0 (`aux_loss_weight`). We follow the code.",
    "Augmentation: the paper lists random crop, scale and flip; the code (PFENet's) also rotates by up to 10 degrees "
    "and applies Gaussian blur. The PASCAL recipe follows the code.",
    "Model selection: the code validates every 2 epochs on 1000 episodes of the test fold's novel classes and keeps "
    "the best (PFENet's protocol; the paper's numbers probably come from there since test.py cannot run). The "
    "recipes select on held-out base-class images instead; `select_on_test_fold: true` reproduces the code.",
    "Learning rate: the paper gives 0.0025; the code's poly schedule multiplies the lr of every parameter group by "
    "10 (index_split=-1), i.e. 0.025. The recipes use the effective 0.025.",
    "Official code bugs fixed: `.cuda()` default arguments evaluated at import (no CPU import), `.cuda()` in the "
    "loss, test.py importing plain PFENet (which crashes at construction with deep_base=False).",
)


@dataclass
class QGNetSupportEncoding(SupportEncoding):
    """
    What QGNet keeps of a support set (the prior region map depends on the query only, so nothing of it is here).

    Args:
        shot (`int`): number of support images K.
        prototype (`torch.FloatTensor` of shape `(batch_size, reduce_dim, 1, 1)`):
            Support target prototype (masked average pooling of `down_supp` features), averaged over shots.
        high_level_features (`torch.FloatTensor` of shape `(batch_size, shot, channels, h4, w4)`):
            Stage-4 backbone features computed on mask-weighted stage-3 features (PFENet), for the guided region map.
        masks (`torch.FloatTensor` of shape `(batch_size, shot, 1, height, width)`):
            1 on the target, else 0 (ignored pixels are 0), at the support image resolution.
    """

    prototype: torch.FloatTensor | None = None
    high_level_features: torch.FloatTensor | None = None
    masks: torch.FloatTensor | None = None


def prior_region_map(bridge_features: torch.Tensor, prior_features: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """
    QGNet's prior region map (paper Eq. 9-12; official `PFENet_QGNet.py` forward, `unsup_query`): for each bridge
    position, the highest cosine similarity to *any* position of the query's own prior features, min-max normalised
    per image.

    Args:
        bridge_features (`torch.FloatTensor` of shape `(batch_size, channels, height, width)`):
            Query features of the segmentation backbone (after `bridge_projection` in the official form).
        prior_features (`torch.FloatTensor` of shape `(batch_size, channels, prior_height, prior_width)`):
            Query features of the prior extractor (after `prior_projection` in the official form); any size.
        eps (`float`, *optional*, defaults to 1e-7): added to the norm product and to the min-max range, as the
            official `cosine_eps`.

    Returns:
        `torch.FloatTensor` of shape `(batch_size, 1, height, width)`, values in [0, 1].

    Raises:
        `ValueError`: when batch sizes or channel counts differ.
    """
    if bridge_features.shape[:2] != prior_features.shape[:2]:
        raise ValueError(
            f"bridge features {tuple(bridge_features.shape)} and prior features {tuple(prior_features.shape)} must "
            "agree on batch size and channels"
        )
    batch_size, _, height, width = bridge_features.shape
    bridge = bridge_features.flatten(2).transpose(1, 2)  # (batch, bridge positions, channels)
    prior = prior_features.flatten(2)  # (batch, channels, prior positions)
    norms = torch.linalg.vector_norm(bridge, dim=2, keepdim=True) * torch.linalg.vector_norm(
        prior, dim=1, keepdim=True
    )
    # The official code reshapes with view(B, sp * sp), which needs square maps; flattening (h, w) works for any.
    similarity = (torch.bmm(bridge, prior) / (norms + eps)).amax(dim=2)  # best prior position per bridge position
    minimum = similarity.min(dim=1, keepdim=True).values
    maximum = similarity.max(dim=1, keepdim=True).values
    return ((similarity - minimum) / (maximum - minimum + eps)).view(batch_size, 1, height, width)


def _conv_block(in_channels: int, out_channels: int, dropout: float, kernel_size: int = 1) -> nn.Sequential:
    # conv (no bias), ReLU, Dropout2d: the official down_query / down_supp (1x1) and down_learn_* (3x3).
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, padding=kernel_size // 2, bias=False),
        nn.ReLU(inplace=True),
        nn.Dropout2d(dropout),
    )


def _upsample(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class QGNetModel(FewShotSegmentationPreTrainedModel):
    r"""
    QGNet few-shot segmenter.

    Pipeline (`h x w` is the stage-3 feature size, 60 x 60 for a 473 x 473 ResNet input):

    1. Frozen backbone on query and supports; `down_query` / `down_supp` reduce `layer3 ⊕ layer2` to `reduce_dim`;
       the support prototype is their masked average pooling (averaged over shots).
    2. Guided region map (cross-correspondence): PFENet's prior, the cosine of the query's stage 4 to the masked
       support stage 4, max over support positions, min-max normalised, averaged over shots.
    3. Prior region map (self-correspondence, query only, once per query): the frozen prior extractor's stage 4 and
       the backbone's stage 4, each through its projection (`prior_projection`, `bridge_projection`), compared by
       [`prior_region_map`].
    4. PFENet's feature enrichment module on `[query features, prototype, guided map, prior map]` (`init_merge` takes
       `2 * reduce_dim + 2` channels); logits upsampled (bilinear, `align_corners=True`) to the input size.

    Training (`labels`): cross-entropy on the logits plus `aux_loss_weight` times the mean cross-entropy of the
    per-scale classifiers. Both extractors are frozen; their BN policy is per extractor (see the config).
    """

    config_class = QGNetConfig
    output_maps = {
        "guided_region": "guided region map: similarity of the query to the support's target (PFENet prior, stage 4)",
        "prior_region": "prior region map: the query's self-similarity through the prior extractor (support-free)",
    }

    def __init__(self, config: QGNetConfig):
        super().__init__(config)
        self.backbone = self.build_backbone()
        self.prior_extractor = self.build_prior_extractor()
        channels = self.backbone.channels
        reduce_dim = config.reduce_dim
        self.down_query = _conv_block(channels[3] + channels[2], reduce_dim, config.feature_dropout)
        self.down_supp = _conv_block(channels[3] + channels[2], reduce_dim, config.feature_dropout)
        if config.region_projection == "learned":
            self.bridge_projection = _conv_block(channels[4], reduce_dim, config.projection_dropout, kernel_size=3)
            self.prior_projection = _conv_block(
                self.prior_extractor.channels[4], reduce_dim, config.projection_dropout, kernel_size=3
            )
        elif channels[4] != self.prior_extractor.channels[4]:
            raise ValueError(
                f"region_projection='raw' compares the raw stage-4 features of both extractors, but the backbone "
                f"has {channels[4]} channels and the prior extractor {self.prior_extractor.channels[4]}; use "
                "region_projection='learned' or match their widths (backbone_kwargs / prior_extractor_kwargs)"
            )
        # Input order [query, prototype, guided, prior], as the official init_merge (514 channels at 256).
        self.feature_enrichment = FeatureEnrichmentModule(
            reduce_dim=reduce_dim,
            pyramid_bins=config.pyramid_bins,
            num_classes=2,
            prior_channels=2,
            dropout=config.classifier_dropout,
        )
        self.post_init()

    # --- extractors ----------------------------------------------------------------------------------------------
    def build_prior_extractor(self) -> StagedBackbone:
        """The frozen prior extractor: a dilated ResNet at the backbone's stage-4 stride unless configured."""
        kwargs = dict(self.config.prior_extractor_kwargs or {})
        if "output_stride" not in kwargs and self.backbone.strides[4] in (8, 16, 32):
            kwargs["output_stride"] = self.backbone.strides[4]
        extractor = build_backbone(self.config.prior_extractor_backbone, **kwargs)
        extractor.chunk_on_cpu = self.config.chunk_extractors_on_cpu
        return extractor.freeze(batchnorm_eval=self.config.freeze_prior_extractor_batchnorm)

    def pretrained_weight_sources(self) -> dict[str, str]:
        """The backbone's ImageNet weights (when configured) and the prior extractor's `prior_extractor_weights`."""
        sources = super().pretrained_weight_sources()
        if self.config.prior_extractor_weights:
            sources["prior_extractor"] = self.config.prior_extractor_weights
        return sources

    def load_pretrained_extractors(self) -> dict[str, str]:
        """
        Load the backbone's and the prior extractor's pretrained weights (see `pretrained_weight_sources`); the prior
        extractor takes `prior_extractor_moco_encoder` from a MoCo checkpoint. With
        `prior_extractor_weights_if_missing="random"` a local path that does not exist leaves the prior extractor
        random, logs it and sets `config.prior_extractor_weights = None` so the saved config says so.

        Raises:
            `ValueError` / `FileNotFoundError`: see `hf_fss.backbones.load_backbone_weights`.
        """
        config = self.config
        source = config.prior_extractor_weights
        if source and config.prior_extractor_weights_if_missing == "random" and _missing_local_path(source):
            logger.warning(
                f"QGNet: no prior extractor weights at {source!r} (a path is read from the current folder); the "
                "prior extractor keeps the weights it has (random for a model built from a config; run `accelerate "
                "launch scripts/pretrain_prior.py` first to pretrain one)"
            )
            config.prior_extractor_weights = None
        sources = self.pretrained_weight_sources()
        for name, weights in sources.items():
            options = {"moco_encoder": config.prior_extractor_moco_encoder} if name == "prior_extractor" else {}
            self.get_submodule(name).load_weights(weights, **options)
        if "prior_extractor" in sources:
            logger.info(f"QGNet: prior extractor loaded from {sources['prior_extractor']}")
        return sources

    # --- support -------------------------------------------------------------------------------------------------
    def _encode_support(self, support_pixel_values, support_masks) -> QGNetSupportEncoding:
        batch_size, shot = support_pixel_values.shape[:2]
        support = pfenet_support_features(
            self.backbone, support_pixel_values.flatten(0, 1), support_masks.flatten(0, 1)
        )
        features = self.down_supp(pfenet_mid_level(support.stages[2], support.stages[3]))
        prototypes = masked_average_pooling(features, support.stage3_masks)  # (batch * shot, reduce_dim, 1, 1)
        return QGNetSupportEncoding(
            shot=shot,
            prototype=prototypes.unflatten(0, (batch_size, shot)).mean(dim=1),
            high_level_features=support.masked_layer4.unflatten(0, (batch_size, shot)),
            masks=support.masks.unflatten(0, (batch_size, shot)),
        )

    # --- query ---------------------------------------------------------------------------------------------------
    def query_prior_region(self, pixel_values: torch.Tensor, layer4: torch.Tensor) -> torch.Tensor:
        """
        The prior region map of a batch of queries (support-free): `(batch_size, 1, h4, w4)`, values in [0, 1].

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): the query images.
            layer4 (`torch.FloatTensor` of shape `(batch_size, channels_4, h4, w4)`): the backbone's stage 4.
        """
        prior_layer4 = self.prior_extractor.forward_stages(pixel_values, 0, 5)[-1]
        if self.config.region_projection == "learned":
            bridge, prior_layer4 = self.bridge_projection(layer4), self.prior_projection(prior_layer4)
        else:
            bridge = layer4
        return prior_region_map(bridge, prior_layer4, eps=self.config.prior_eps)

    def _segment(
        self, pixel_values: torch.Tensor, support_encoding: QGNetSupportEncoding, labels: torch.Tensor | None = None
    ) -> FewShotSegmentationOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`)
            support_encoding (`QGNetSupportEncoding`)
            labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*): {0, 1, 255}.
        """
        encoding = support_encoding
        if not isinstance(encoding, QGNetSupportEncoding):
            raise ValueError(f"support_encoding must be a QGNetSupportEncoding, got {type(encoding).__name__}")
        _, _, layer2, layer3, layer4 = self.backbone_features(pixel_values)
        query_features = self.down_query(pfenet_mid_level(layer2, layer3))
        feature_size = query_features.shape[-2:]
        prior_region = resize_mask(self.query_prior_region(pixel_values, layer4), feature_size)
        guided_region = multi_shot_prior_mask(
            layer4, encoding.high_level_features, encoding.masks, eps=self.config.prior_eps, output_size=feature_size
        )
        logits, aux_logits = self.feature_enrichment(
            query_features, encoding.prototype, torch.cat([guided_region, prior_region], dim=1)
        )
        logits = _upsample(logits, pixel_values.shape[-2:])
        maps = {"guided_region": guided_region, "prior_region": prior_region}
        loss = losses = None
        if labels is not None:
            labels = labels.long()
            main = self._cross_entropy(logits, labels)
            aux = torch.stack([self._cross_entropy(x, labels) for x in aux_logits]).mean()
            loss = main + self.config.aux_loss_weight * aux
            losses = {"main": main.detach(), "aux": aux.detach()}
        return FewShotSegmentationOutput(loss=loss, logits=logits, losses=losses, maps=maps)

    def _cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = _upsample(logits, labels.shape[-2:])
        if not bool((labels != self.config.ignore_index).any()):
            return logits.sum() * 0.0  # every pixel ignored: no signal, but keep the graph (and avoid NaN)
        return F.cross_entropy(logits, labels, ignore_index=self.config.ignore_index)


def _missing_local_path(source: str) -> bool:
    """A source meant as a local path (`hf_fss.utils.looks_local`, or a `.safetensors` name) that does not exist."""
    return not os.path.exists(os.path.expanduser(source)) and (looks_local(source) or source.endswith(".safetensors"))
