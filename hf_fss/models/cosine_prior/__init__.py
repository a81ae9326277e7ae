from .configuration_cosine_prior import CosinePriorConfig
from .modeling_cosine_prior import CosinePriorModel

__all__ = ["CosinePriorConfig", "CosinePriorModel"]
