"""SegGPT (ICCV 2023) as an hf_fss few-shot model: transformers' SegGptForImageSegmentation behind the contract."""

from ...utils.lazy import lazy_exports
from .configuration_seggpt_fss import SegGptFssConfig

# The modeling and image-processing files (transformers' modeling / image-processing utilities) are imported when
# one of their names is first read.
_LAZY = {"SegGptFssImageProcessor": ".image_processing_seggpt_fss", "SegGptFssModel": ".modeling_seggpt_fss"}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = ["SegGptFssConfig", *sorted(_LAZY)]
