"""
The few-shot segmentation methods of hf_fss, one folder each, and their registry.

`MODEL_CLASSES` maps each `model_type` to its `(config class, model class)`; the package top (`hf_fss/__init__.py`)
registers them with transformers' Auto classes when those are imported and re-exports the registry as
`hf_fss.MODEL_CLASSES`. Its keys, `in` and the configuration classes (`CONFIG_CLASSES`) cost no model import; reading
an entry imports that method's modeling file (transformers' `modeling_utils`, about 3.5 s of CPU the first time:
docs/development.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from .cosine_prior import CosinePriorConfig
from .crcnet import CRCNetConfig
from .ntrenet import NTRENetConfig
from .qgnet import QGNetConfig
from .seggpt_fss import SegGptFssConfig
from .smcp import SMCPConfig

# The configuration class of every registered method, by model_type (cheap: no modeling code).
CONFIG_CLASSES = {
    config.model_type: config
    for config in (CosinePriorConfig, CRCNetConfig, NTRENetConfig, QGNetConfig, SMCPConfig, SegGptFssConfig)
}

# Where each method's model class lives (module, class name), imported on first use.
MODEL_CLASS_PATHS = {
    "cosine_prior": ("hf_fss.models.cosine_prior.modeling_cosine_prior", "CosinePriorModel"),
    "crcnet": ("hf_fss.models.crcnet.modeling_crcnet", "CRCNetModel"),
    "ntrenet": ("hf_fss.models.ntrenet.modeling_ntrenet", "NTRENetModel"),
    "qgnet": ("hf_fss.models.qgnet.modeling_qgnet", "QGNetModel"),
    "smcp": ("hf_fss.models.smcp.modeling_smcp", "SMCPModel"),
    "seggpt_fss": ("hf_fss.models.seggpt_fss.modeling_seggpt_fss", "SegGptFssModel"),
}
# A method whose preprocessing is not the shared processor's (module, class name); the others get
# `hf_fss.FewShotSegmentationImageProcessor`. Each model class names the same one (`fss_image_processor_class`).
PROCESSOR_CLASS_PATHS = {
    "seggpt_fss": ("hf_fss.models.seggpt_fss.image_processing_seggpt_fss", "SegGptFssImageProcessor"),
}


class ModelRegistry(Mapping):
    """`model_type -> (config class, model class)`; the model class is imported when its entry is read."""

    def __getitem__(self, model_type: str) -> tuple[type, type]:
        module, name = MODEL_CLASS_PATHS[model_type]
        return CONFIG_CLASSES[model_type], getattr(importlib.import_module(module), name)

    def __contains__(self, model_type: object) -> bool:  # Mapping's default reads the entry (a model import)
        return model_type in CONFIG_CLASSES

    def __iter__(self) -> Iterator[str]:
        return iter(CONFIG_CLASSES)

    def __len__(self) -> int:
        return len(CONFIG_CLASSES)

    def __repr__(self) -> str:
        return f"ModelRegistry({sorted(CONFIG_CLASSES)})"


# (config, model) of every registered method.
MODEL_CLASSES = ModelRegistry()

__all__ = ["CONFIG_CLASSES", "MODEL_CLASSES", "MODEL_CLASS_PATHS", "PROCESSOR_CLASS_PATHS", "ModelRegistry"]
