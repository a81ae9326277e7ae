"""QGNet (2021): few-shot segmentation with a contrastively pretrained prior extractor and two region maps."""

from .configuration_qgnet import QGNetConfig
from .modeling_qgnet import DIFFERENCES_FROM_OFFICIAL_CODE, QGNetModel, QGNetSupportEncoding, prior_region_map

__all__ = ["DIFFERENCES_FROM_OFFICIAL_CODE", "QGNetConfig", "QGNetModel", "QGNetSupportEncoding", "prior_region_map"]
