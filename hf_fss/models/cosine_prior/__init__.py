"""The training-free cosine-prior baseline."""

from ...utils.lazy import lazy_exports
from .configuration_cosine_prior import CosinePriorConfig

# The modeling file (transformers' modeling_utils) is imported when one of its names is first read.
_LAZY = dict.fromkeys(["CosinePriorModel"], ".modeling_cosine_prior")
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = ["CosinePriorConfig", *sorted(_LAZY)]
