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
from torch import nn
from transformers.utils import logging

from ...backbones import StagedBackbone, build_backbone
from ...differences import read_differences
from ...modeling_fss import FewShotSegmentationOutput, FewShotSegmentationPreTrainedModel, SupportEncoding
from ...modules import (
    FeatureEnrichmentModule,
    MaskedCrossEntropy,
    autocast_off,
    conv_block,
    multi_shot_prior_mask,
    pfenet_mid_level,
    pfenet_support_encoding,
    resize,
)
from ...utils import looks_local
from .configuration_qgnet import QGNetConfig

logger = logging.get_logger(__name__)

__all__ = ["DIFFERENCES_FROM_OFFICIAL_CODE", "QGNetLoss", "QGNetModel", "QGNetSupportEncoding", "prior_region_map"]

# Every place where the paper, the official code (github.com/liuweide01/QGNet-Few-shot-segmentation, commit 1e77b35)
# and this implementation part ways, with the choice made here: package data (hf_fss/model_cards/differences/qgnet.md),
# which the model card renders.
DIFFERENCES_FROM_OFFICIAL_CODE = read_differences("qgnet")


@dataclass
class QGNetSupportEncoding(SupportEncoding):
    """
    What QGNet keeps of a support set (the prior region map depends on the query only, so nothing of it is here).

    Args (besides `shot`):
        prototype (`torch.FloatTensor` of shape `(batch_size, reduce_dim, 1, 1)`):
            Support target prototype (masked average pooling of `down_supp` features), averaged over shots.
        high_level_features (`torch.FloatTensor` of shape `(batch_size, shot, channels, h4, w4)`):
            Stage-4 backbone features computed on mask-weighted stage-3 features (PFENet), for the guided region map.
        masks (`torch.FloatTensor` of shape `(batch_size, shot, 1, height, width)`):
            1 on the target, else 0 (ignored pixels are 0), at the support image resolution.
    """

    shot_mean_fields = ("prototype",)  # the mean of the per-shot prototypes, as `pfenet_support_encoding` computes it

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
    # Cosine similarities in float32 whatever the dtype, autocast off (as the cosine prior, `cosine_prior_mask`).
    bridge = bridge_features.float().flatten(2).transpose(1, 2)  # (batch, bridge positions, channels)
    prior = prior_features.float().flatten(2)  # (batch, channels, prior positions)
    with autocast_off(bridge):
        norms = torch.linalg.vector_norm(bridge, dim=2, keepdim=True) * torch.linalg.vector_norm(
            prior, dim=1, keepdim=True
        )
        # The official code reshapes with view(B, sp * sp), which needs square maps; flattening (h, w) works for any.
        similarity = (torch.bmm(bridge, prior) / (norms + eps)).amax(dim=2)  # best prior position per bridge position
        minimum = similarity.min(dim=1, keepdim=True).values
        maximum = similarity.max(dim=1, keepdim=True).values
        region = (similarity - minimum) / (maximum - minimum + eps)
    return region.view(batch_size, 1, height, width).to(bridge_features.dtype)


class QGNetLoss(nn.Module):
    """
    QGNet's training loss (official code): cross-entropy of the logits plus `aux_loss_weight` times the mean
    cross-entropy of the feature enrichment module's per-scale classifiers.

    Args:
        config (`QGNetConfig`): `aux_loss_weight` and `ignore_index`.
    """

    def __init__(self, config: QGNetConfig):
        super().__init__()
        self.config = config  # read at each call: the weight may change after construction
        self.cross_entropy = MaskedCrossEntropy(config.ignore_index)

    def forward(
        self, labels: torch.Tensor, logits: torch.Tensor, aux_logits: list[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            labels (`torch.LongTensor` of shape `(batch_size, height, width)`): {0, 1, 255}.
            logits (`torch.FloatTensor` of shape `(batch_size, 2, height, width)`).
            aux_logits (list of `torch.FloatTensor` of shape `(batch_size, 2, h_i, w_i)`): one per pyramid scale.

        Returns:
            `tuple(torch.FloatTensor, dict[str, torch.FloatTensor])`: the total and the detached `main` and `aux`.
        """
        labels = labels.long()
        main = self.cross_entropy(logits, labels)
        aux = torch.stack([self.cross_entropy(x, labels) for x in aux_logits]).mean()
        return main + self.config.aux_loss_weight * aux, {"main": main.detach(), "aux": aux.detach()}


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
    support_encoding_class = QGNetSupportEncoding
    support_shots_separable = True
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
        self.down_query = conv_block(channels[3] + channels[2], reduce_dim, config.feature_dropout)
        self.down_supp = conv_block(channels[3] + channels[2], reduce_dim, config.feature_dropout)
        if config.region_projection == "learned":
            self.bridge_projection = conv_block(channels[4], reduce_dim, config.projection_dropout, kernel_size=3)
            self.prior_projection = conv_block(
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
        self.criterion = QGNetLoss(config)
        self.post_init()

    # --- extractors ----------------------------------------------------------------------------------------------
    def build_prior_extractor(self) -> StagedBackbone:
        """The frozen prior extractor: a dilated ResNet at the backbone's stage-4 stride unless configured, or the
        transformers backbone of `prior_extractor_config` (on the stride-8 grid)."""
        kwargs = dict(self.config.prior_extractor_kwargs or {})
        transformers_prior = self.config.prior_extractor_config is not None
        if not transformers_prior and "output_stride" not in kwargs and self.backbone.strides[4] in (8, 16, 32):
            kwargs["output_stride"] = self.backbone.strides[4]
        extractor = build_backbone(self.config.prior_extractor_backbone, self.config.prior_extractor_config, **kwargs)
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
            self._record_loaded_weights({name: weights})
        if "prior_extractor" in sources:
            logger.info(f"QGNet: prior extractor loaded from {sources['prior_extractor']}")
        return sources

    # --- support -------------------------------------------------------------------------------------------------
    def _encode_support(self, support_pixel_values, support_masks) -> QGNetSupportEncoding:
        fields = pfenet_support_encoding(self.backbone, support_pixel_values, support_masks, self.down_supp)
        del fields["features"]  # the reduced features serve the prototype only
        return QGNetSupportEncoding(**fields)

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

    def _encode_query(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The query's `layer4`, reduced mid-level `features` and `prior_region` at their size (support-free)."""
        _, _, layer2, layer3, layer4 = self.backbone_features(pixel_values)
        features = self.down_query(pfenet_mid_level(layer2, layer3))
        prior_region = resize(self.query_prior_region(pixel_values, layer4), features.shape[-2:])
        return {"layer4": layer4, "features": features, "prior_region": prior_region}

    def _segment(self, pixel_values, support_encoding, labels=None) -> FewShotSegmentationOutput:
        r"""The arguments of `FewShotSegmentationPreTrainedModel._segment` (with a `QGNetSupportEncoding`)."""
        encoding = support_encoding
        query = self.query_encoding(pixel_values)
        layer4, query_features, prior_region = query["layer4"], query["features"], query["prior_region"]
        feature_size = query_features.shape[-2:]
        guided_region = multi_shot_prior_mask(
            layer4, encoding.high_level_features, encoding.masks, eps=self.config.prior_eps, output_size=feature_size
        )
        logits, aux_logits = self.feature_enrichment(
            query_features, encoding.prototype, torch.cat([guided_region, prior_region], dim=1)
        )
        logits = resize(logits, pixel_values.shape[-2:])
        maps = {"guided_region": guided_region, "prior_region": prior_region}
        loss = losses = None
        if labels is not None:
            loss, losses = self.criterion(labels, logits, aux_logits)
        return FewShotSegmentationOutput(loss=loss, logits=logits, losses=losses, maps=maps)


def _missing_local_path(source: str) -> bool:
    """A source meant as a local path (`hf_fss.utils.looks_local`, or a `.safetensors` name) that does not exist."""
    return not os.path.exists(os.path.expanduser(source)) and (looks_local(source) or source.endswith(".safetensors"))
