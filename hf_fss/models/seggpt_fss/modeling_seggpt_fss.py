"""SegGPT (transformers' `SegGptForImageSegmentation`) as an hf_fss few-shot segmentation model."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from transformers import SegGptForImageSegmentation, SegGptImageProcessorPil
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ...modeling_fss import FewShotSegmentationOutput, FewShotSegmentationPreTrainedModel, SupportEncoding
from .configuration_seggpt_fss import SegGptFssConfig, seggpt_config_from
from .image_processing_seggpt_fss import SegGptFssImageProcessor

# SegGptImageProcessor's palette for one class (`build_palette(1)`): background black, the class white.
_PALETTE = ((0.0, 0.0, 0.0), (255.0, 255.0, 255.0))
# SegGptImageProcessor's normalisation (ImageNet's), applied to the prompt masks and undone on the prediction.
_MEAN_STD = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


@functools.cache
def _palette_pixels() -> tuple[torch.Tensor, torch.Tensor]:
    """
    The palette's black and white as SegGPT's processor hands them to the model (rescaled and normalised by it, so
    the prompt masks are bit-identical to `SegGptImageProcessor(prompt_masks=..., num_labels=1)`'s).
    """
    colours = np.array([[_PALETTE[0], _PALETTE[1]]] * 2, dtype=np.uint8)  # (2, 2, 3), channels last
    pixels = SegGptImageProcessorPil()(images=colours, do_resize=False, input_data_format="channels_last")
    pixels = torch.as_tensor(np.asarray(pixels["pixel_values"][0]))  # (3, 2, 2)
    return pixels[:, 0, 0].clone(), pixels[:, 0, 1].clone()


@dataclass
class SegGptFssSupportEncoding(SupportEncoding):
    """
    SegGPT's prompts. SegGPT encodes a prompt together with each query (they are one stacked image in its ViT), so
    the encoding holds the prepared prompts only: reusing it saves their preparation, not the encoder's work.

    Args:
        prompt_pixel_values (`torch.FloatTensor` of shape `(batch_size, shot, 3, height, width)`): the supports.
        prompt_masks (`torch.FloatTensor` of shape `(batch_size, shot, 3, height, width)`): the support masks drawn in
            SegGPT's palette (target white, background and ignored pixels black), normalised as its images.
    """

    prompt_pixel_values: torch.FloatTensor | None = None
    prompt_masks: torch.FloatTensor | None = None


class SegGptFssModel(FewShotSegmentationPreTrainedModel):
    """
    SegGPT run on hf_fss's inputs and outputs. `logits[:, c]` is SegGPT's class score for c = 0 (background) and 1
    (target): the negative squared distance of the predicted mask colour (unnormalised, in [0, 255]) to the class's
    palette colour, the `segmentation_scores` of `SegGptImageProcessor.post_process_semantic_segmentation(...,
    num_labels=1)`, so its argmax is that method's result. K-shot: the query is repeated once per support and SegGPT's
    feature ensemble averages its features across them (`config.feature_ensemble`); the first of the K predictions is
    kept, as the official `seggpt_engine.py` does.

    What SegGPT does not offer in hf_fss (see docs/foundation_models.md): training (`labels` raise a `ValueError`),
    test-time adaptation, the evaluation feature cache (it has no separate frozen extractor), and saving encoder work
    through `encode_support` (see `SegGptFssSupportEncoding`).
    """

    config_class = SegGptFssConfig
    support_encoding_class = SegGptFssSupportEncoding
    fss_image_processor_class = SegGptFssImageProcessor
    supports_training = False

    def __init__(self, config: SegGptFssConfig):
        super().__init__(config)
        self.seggpt = SegGptForImageSegmentation(config.seggpt_config)
        # SegGPT initialised itself with its documented scheme: keep it from being redrawn by hf_fss's initialisation.
        for module in self.seggpt.modules():
            module._is_hf_initialized = True
        self.post_init()

    @classmethod
    def from_seggpt(cls, seggpt_name_or_path: str, **config_kwargs) -> SegGptFssModel:
        """
        The adapter around a SegGPT checkpoint: `from_seggpt("BAAI/seggpt-vit-large")` reads its config once, builds
        the model and loads its weights (`load_pretrained_extractors`). Save it with `save_pretrained` to get a folder
        that `AutoModel.from_pretrained` / `pipeline` / `scripts/evaluate.py` load without the Hub.

        Raises:
            `OSError`: the Hub id or folder cannot be read (transformers' message).
            `ValueError`: the folder holds another architecture than SegGPT, or is already a saved `SegGptFssModel`
                (then `from_pretrained` is the call).
        """
        model = cls(SegGptFssConfig(seggpt_name_or_path=seggpt_name_or_path, **config_kwargs))
        model.load_pretrained_extractors()
        return model

    def min_input_size(self) -> tuple[int, int]:
        """SegGPT takes squares of exactly `config.image_size` (its processor makes them)."""
        return self.config.seggpt_input_size

    def pretrained_weight_sources(self) -> dict[str, str]:
        """`{"seggpt": config.seggpt_name_or_path}`, or empty when the config names no SegGPT checkpoint."""
        return {"seggpt": self.config.seggpt_name_or_path} if self.config.seggpt_name_or_path else {}

    def load_pretrained_extractors(self) -> dict[str, str]:
        """
        Load SegGPT's weights from `config.seggpt_name_or_path` (Hub id or folder of `SegGptForImageSegmentation`).

        Raises:
            `ValueError`: the checkpoint is of another architecture (its `model_type` named), or its shapes differ from
                `config.seggpt_config`.
        """
        sources = self.pretrained_weight_sources()
        for source in sources.values():
            seggpt_config_from(source)  # another architecture's folder is refused by name before any weight is read
            loaded = SegGptForImageSegmentation.from_pretrained(source)
            if loaded.config.to_diff_dict() != self.config.seggpt_config.to_diff_dict():
                loaded_arch = {k: v for k, v in loaded.config.to_dict().items() if not k.startswith("_")}
                own_arch = {k: v for k, v in self.config.seggpt_config.to_dict().items() if not k.startswith("_")}
                differ = sorted(k for k in set(own_arch) | set(loaded_arch) if own_arch.get(k) != loaded_arch.get(k))
                if any(k not in ("architectures", "transformers_version", "dtype") for k in differ):
                    raise ValueError(
                        f"{source} is a SegGPT of another shape than config.seggpt_config (fields {differ}); build "
                        "the config from it: SegGptFssConfig(seggpt_name_or_path=...)"
                    )
            self.seggpt.load_state_dict(loaded.state_dict())
            self._record_loaded_weights({"seggpt": source})
        return sources

    def _check_size(self, name: str, pixels: torch.Tensor) -> None:
        expected = self.config.seggpt_input_size
        if tuple(pixels.shape[-2:]) != expected:
            raise ValueError(
                f"{name} holds images of {tuple(pixels.shape[-2:])} but SegGPT takes exactly {expected} (height, "
                "width); preprocess with SegGptFssImageProcessor (AutoImageProcessor of the model, or the pipeline)"
            )

    def _prompt_masks(self, support_masks: torch.Tensor) -> torch.Tensor:
        """`(B, K, H, W)` {0, 1, 255} -> `(B, K, 3, H, W)` palette colours normalised as SegGPT's processor does."""
        black, white = (colour.to(support_masks.device, self.dtype).view(3, 1, 1) for colour in _palette_pixels())
        return torch.where((support_masks == 1)[:, :, None], white, black)

    def _encode_support(self, support_pixel_values, support_masks) -> SegGptFssSupportEncoding:
        self._check_size("support_pixel_values", support_pixel_values)
        return SegGptFssSupportEncoding(
            shot=support_pixel_values.shape[1],
            prompt_pixel_values=support_pixel_values,
            prompt_masks=self._prompt_masks(support_masks),
        )

    def _segment(self, pixel_values, support_encoding, labels=None) -> FewShotSegmentationOutput:
        if labels is not None:
            raise ValueError(
                "SegGptFssModel computes no loss: SegGPT's in-context training is not part of hf_fss; call it "
                "without labels (evaluation, pipeline)"
            )
        self._check_size("pixel_values", pixel_values)
        shot = support_encoding.prompt_pixel_values.shape[1]
        if shot == 1:
            # One prompt per query: the batch runs at once (no ensemble, whose average would mix the queries).
            pred_masks = self._seggpt_pass(
                pixel_values, support_encoding.prompt_pixel_values[:, 0], support_encoding.prompt_masks[:, 0], False
            )
        else:
            # SegGPT's K-shot: the query repeated per prompt, one ensemble pass per query, the first prediction kept.
            pred_masks = torch.cat(
                [
                    self._seggpt_pass(
                        query[None].expand(shot, -1, -1, -1),
                        prompts,
                        masks,
                        self.config.feature_ensemble,
                    )[:1]
                    for query, prompts, masks in zip(
                        pixel_values, support_encoding.prompt_pixel_values, support_encoding.prompt_masks
                    )
                ]
            )
        logits = self._palette_scores(pred_masks)
        return FewShotSegmentationOutput(logits=logits, maps={})

    def _seggpt_pass(self, pixel_values, prompt_pixel_values, prompt_masks, feature_ensemble) -> torch.Tensor:
        outputs = self.seggpt(
            pixel_values=pixel_values,
            prompt_pixel_values=prompt_pixel_values,
            prompt_masks=prompt_masks,
            feature_ensemble=feature_ensemble,
            embedding_type=self.config.embedding_type,
        )
        return outputs.pred_masks

    def _palette_scores(self, pred_masks: torch.Tensor) -> torch.Tensor:
        """
        `(B, 3, 2H, W)` SegGPT predictions -> `(B, 2, H, W)` float32 scores: the operations of
        `SegGptImageProcessor.post_process_semantic_segmentation(num_labels=1, return_segmentation_scores=True)` in
        its order (query half, unnormalise, x 255 clipped, negative squared distance to each palette colour).
        """
        masks = pred_masks[:, :, pred_masks.shape[2] // 2 :, :].float()
        mean, std = (torch.tensor(v, device=masks.device) for v in _MEAN_STD)
        masks = masks.permute(0, 2, 3, 1) * std + mean
        masks = torch.clip(masks * 255, 0, 255)  # (B, H, W, 3)
        palette = torch.tensor(_PALETTE, device=masks.device, dtype=torch.float).view(1, 1, 1, 2, 3)
        dist = torch.pow(masks[..., None, :] - palette, 2).sum(dim=-1)  # (B, H, W, 2)
        return -dist.permute(0, 3, 1, 2)
