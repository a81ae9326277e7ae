"""
The prior extractor's global + local contrastive pretraining (QGNet, paper 000 §IV-A) on MoCo v2, under the generic
training loop (`hf_fss.training.loop`) and the memory bank (`hf_fss.modules.memory_bank`): encoders and heads
(`modeling`), queues (`queues`), Shuffle-BN (`shuffle_bn`), superpixels (`superpixels`), views (`views`); the run,
export and probe live in `training`, `export` and `probe`; the entry point is `scripts/pretrain_prior.py`.
"""

from .modeling import ContrastiveEncoder, ContrastiveOutput, GlobalLocalContrastiveModel, PretrainingConfig, info_nce
from .queues import KeyQueue
from .shuffle_bn import SplitBatchNorm, convert_to_split_batchnorm, shuffled_forward
from .superpixels import SUPERPIXEL_METHODS, SuperpixelCache, SuperpixelSettings, compute_superpixels
from .views import LOCAL_FORMS, ContrastiveViews, moco_v2_augmentation

__all__ = [
    "LOCAL_FORMS",
    "SUPERPIXEL_METHODS",
    "ContrastiveEncoder",
    "ContrastiveOutput",
    "ContrastiveViews",
    "GlobalLocalContrastiveModel",
    "KeyQueue",
    "PretrainingConfig",
    "SplitBatchNorm",
    "SuperpixelCache",
    "SuperpixelSettings",
    "compute_superpixels",
    "convert_to_split_batchnorm",
    "info_nce",
    "moco_v2_augmentation",
    "shuffled_forward",
]
