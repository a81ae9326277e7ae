"""hf_fss: few-shot semantic segmentation models for the Hugging Face ecosystem.

Importing the package registers every model, its configuration and the image processor with transformers'
`AutoConfig`, `AutoModel` and `AutoImageProcessor`, so `AutoModel.from_pretrained(repo_or_dir)` returns the
right class, and the `"few-shot-segmentation"` task with `pipeline()`.

The import is lazy (docs/development.md, "Import time"): it loads the configuration classes only. A model class,
the image processor and the pipeline are imported when first used, by name (`from hf_fss import NTRENetModel`) or
through the Auto classes (`AutoModel` gets a stand-in that imports the real class; the processor and the pipeline
task are registered when transformers' `image_processing_auto` / `pipelines` module is imported, before either can
be used).
"""

import sys
from functools import partial

from transformers import AutoConfig, AutoModel

from .configuration_fss import FewShotSegmentationConfig
from .models import CONFIG_CLASSES, MODEL_CLASS_PATHS, MODEL_CLASSES, PROCESSOR_CLASS_PATHS
from .models.cosine_prior import CosinePriorConfig
from .models.crcnet import CRCNetConfig
from .models.ntrenet import NTRENetConfig
from .models.qgnet import QGNetConfig
from .models.seggpt_fss import SegGptFssConfig
from .models.smcp import SMCPConfig
from .run_folder import RunFolderConfig, RunFolderModel
from .utils.lazy import after_import, lazy_class, lazy_exports

__version__ = "0.1.0"

# Public names whose modules import transformers' modeling / image-processing utilities: loaded on first read.
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "CosinePriorModel": ".models.cosine_prior",
        "CRCNetModel": ".models.crcnet",
        "FewShotSegmentationImageProcessor": ".image_processing_fss",
        "FewShotSegmentationOutput": ".modeling_fss",
        "FewShotSegmentationPipeline": ".pipelines",
        "FewShotSegmentationPreTrainedModel": ".modeling_fss",
        "NTRENetModel": ".models.ntrenet",
        "QGNetModel": ".models.qgnet",
        "SMCPModel": ".models.smcp",
        "SegGptFssImageProcessor": ".models.seggpt_fss",
        "SegGptFssModel": ".models.seggpt_fss",
        "SupportEncoding": ".modeling_fss",
        "register_pipeline": ".pipelines",
    },
)


def _register_auto_classes() -> None:
    # The registry lives in hf_fss.models (MODEL_CLASSES, re-exported here). AutoModel gets a stand-in per method
    # that imports the model class on first use and then registers the real class in its place.
    for model_type, config_class in CONFIG_CLASSES.items():
        AutoConfig.register(model_type, config_class, exist_ok=True)
        register_real = partial(AutoModel.register, config_class, exist_ok=True)
        stand_in = lazy_class(*MODEL_CLASS_PATHS[model_type], on_resolve=register_real, config_class=config_class)
        AutoModel.register(config_class, stand_in, exist_ok=True)
    # A training run folder's marker config.json: AutoModel / pipeline() load its best/ (else final/) model.
    AutoConfig.register(RunFolderConfig.model_type, RunFolderConfig, exist_ok=True)
    AutoModel.register(RunFolderConfig, RunFolderModel, exist_ok=True)


def _register_image_processor() -> None:
    # Each method gets its processor (the shared one unless PROCESSOR_CLASS_PATHS names another); run once
    # transformers' AutoImageProcessor module exists.
    import importlib

    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    from .image_processing_fss import FewShotSegmentationImageProcessor

    for model_type, config_class in CONFIG_CLASSES.items():
        processor_class = FewShotSegmentationImageProcessor
        if model_type in PROCESSOR_CLASS_PATHS:
            module, name = PROCESSOR_CLASS_PATHS[model_type]
            processor_class = getattr(importlib.import_module(module), name)
        AutoImageProcessor.register(config_class, image_processor_classes={"pil": processor_class}, exist_ok=True)


def _register_pipeline() -> None:
    # pipeline("few-shot-segmentation", model=...). hf_fss.pipelines registers the task itself when imported, and
    # is the importer of transformers.pipelines when it is in sys.modules already (half-initialised).
    if "hf_fss.pipelines" not in sys.modules:
        from .pipelines import register_pipeline

        register_pipeline()


_register_auto_classes()
after_import("transformers.models.auto.image_processing_auto", _register_image_processor)
after_import("transformers.pipelines", _register_pipeline)

__all__ = [
    "MODEL_CLASSES",
    "CosinePriorConfig",
    "CosinePriorModel",
    "CRCNetConfig",
    "CRCNetModel",
    "FewShotSegmentationConfig",
    "FewShotSegmentationImageProcessor",
    "FewShotSegmentationOutput",
    "FewShotSegmentationPipeline",
    "FewShotSegmentationPreTrainedModel",
    "NTRENetConfig",
    "NTRENetModel",
    "QGNetConfig",
    "QGNetModel",
    "RunFolderConfig",
    "RunFolderModel",
    "SMCPConfig",
    "SMCPModel",
    "SegGptFssConfig",
    "SegGptFssImageProcessor",
    "SegGptFssModel",
    "SupportEncoding",
]
