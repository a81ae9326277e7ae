"""The training-free cosine-prior baseline."""

from ...utils.lazy import lazy_exports
from .configuration_cosine_prior import CosinePriorConfig

# The modeling file (transformers' modeling_utils) is imported when one of its names is first read.
__getattr__, __dir__ = lazy_exports(__name__, dict.fromkeys(["CosinePriorModel"], ".modeling_cosine_prior"))

__all__ = ["CosinePriorConfig", "CosinePriorModel"]
