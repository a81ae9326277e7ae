"""
The few-shot segmentation methods of hf_fss, one folder each, and their registry.

`MODEL_CLASSES` maps each `model_type` to its `(config class, model class)`; the package top (`import hf_fss`)
registers them with transformers' Auto classes and re-exports the registry as `hf_fss.MODEL_CLASSES`.
"""

from .cosine_prior import CosinePriorConfig, CosinePriorModel
from .crcnet import CRCNetConfig, CRCNetModel
from .ntrenet import NTRENetConfig, NTRENetModel
from .qgnet import QGNetConfig, QGNetModel
from .seggpt_fss import SegGptFssConfig, SegGptFssModel
from .smcp import SMCPConfig, SMCPModel

# (config, model) of every registered method; each gets its model's image processor (`fss_image_processor_class`).
MODEL_CLASSES = {
    CosinePriorConfig.model_type: (CosinePriorConfig, CosinePriorModel),
    CRCNetConfig.model_type: (CRCNetConfig, CRCNetModel),
    NTRENetConfig.model_type: (NTRENetConfig, NTRENetModel),
    QGNetConfig.model_type: (QGNetConfig, QGNetModel),
    SMCPConfig.model_type: (SMCPConfig, SMCPModel),
    SegGptFssConfig.model_type: (SegGptFssConfig, SegGptFssModel),
}

__all__ = ["MODEL_CLASSES"]
