"""hf_fss: few-shot semantic segmentation models for the Hugging Face ecosystem.

Importing the package registers every model, its configuration and the image processor with transformers'
`AutoConfig`, `AutoModel` and `AutoImageProcessor`, so `AutoModel.from_pretrained(repo_or_dir)` returns the
right class, and the `"few-shot-segmentation"` task with `pipeline()`.

The import itself loads neither torch nor transformers (docs/development.md, "Import time"). Every public name is
imported on first read (`from hf_fss import NTRENetConfig`), and each registration waits for the transformers module
it fills: the configurations when `transformers.models.auto.configuration_auto` is imported (by `AutoConfig`, or
`AutoModel`, ...), the models when `modeling_auto` is, the processors when `image_processing_auto` is and the task
when `transformers.pipelines` is; none of those can be used before its module exists, and a module imported before
hf_fss is filled at `import hf_fss`. `AutoModel` holds a stand-in per method that imports the model class on first use.
"""

import sys

from .utils.lazy import after_import, lazy_exports

__version__ = "0.1.0"

_METHOD_EXPORTS = {
    "cosine_prior": ("CosinePriorConfig", "CosinePriorModel"),
    "crcnet": ("CRCNetConfig", "CRCNetModel"),
    "ntrenet": ("NTRENetConfig", "NTRENetModel"),
    "qgnet": ("QGNetConfig", "QGNetModel"),
    "seggpt_fss": ("SegGptFssConfig", "SegGptFssModel", "SegGptFssImageProcessor"),
    "smcp": ("SMCPConfig", "SMCPModel"),
}
_LAZY = {
    **{name: f".models.{method}" for method, names in _METHOD_EXPORTS.items() for name in names},
    "MODEL_CLASSES": ".models",
    "FewShotSegmentationConfig": ".configuration_fss",
    "FewShotSegmentationImageProcessor": ".image_processing_fss",
    "FewShotSegmentationOutput": ".modeling_fss",
    "FewShotSegmentationPipeline": ".pipelines",
    "FewShotSegmentationPreTrainedModel": ".modeling_fss",
    "RunFolderConfig": ".run_folder",
    "RunFolderModel": ".run_folder",
    "SupportEncoding": ".modeling_fss",
    "register_pipeline": ".pipelines",
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


def _register_configs() -> None:
    # A run folder's marker config.json too: AutoModel / pipeline() load its best/ (else final/) model.
    from transformers.models.auto.configuration_auto import AutoConfig

    from .models import CONFIG_CLASSES
    from .run_folder import RunFolderConfig

    for model_type, config_class in CONFIG_CLASSES.items():
        AutoConfig.register(model_type, config_class, exist_ok=True)
    AutoConfig.register(RunFolderConfig.model_type, RunFolderConfig, exist_ok=True)


def _register_models() -> None:
    # A stand-in per method that imports the model class on first use and then registers the real class in its place.
    from functools import partial

    from transformers.models.auto.modeling_auto import AutoModel

    from .models import CONFIG_CLASSES, MODEL_CLASS_PATHS
    from .run_folder import RunFolderConfig, RunFolderModel
    from .utils.lazy import lazy_class

    for model_type, config_class in CONFIG_CLASSES.items():
        register_real = partial(AutoModel.register, config_class, exist_ok=True)
        stand_in = lazy_class(*MODEL_CLASS_PATHS[model_type], on_resolve=register_real, config_class=config_class)
        AutoModel.register(config_class, stand_in, exist_ok=True)
    AutoModel.register(RunFolderConfig, RunFolderModel, exist_ok=True)


def _register_image_processors() -> None:
    # Each method gets its processor: the shared one unless PROCESSOR_CLASS_PATHS names another.
    import importlib

    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    from .image_processing_fss import FewShotSegmentationImageProcessor
    from .models import CONFIG_CLASSES, PROCESSOR_CLASS_PATHS

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


# Each runs inside the import it watches (other threads wait for it), so no Auto class is seen without its entries.
# modeling_auto and image_processing_auto import configuration_auto first, so the configs are always registered first;
# the configs' own imports touch no transformers auto module (hf_fss.models.seggpt_fss imports SegGptConfig on use).
after_import("transformers.models.auto.configuration_auto", _register_configs)
after_import("transformers.models.auto.modeling_auto", _register_models)
after_import("transformers.models.auto.image_processing_auto", _register_image_processors)
after_import("transformers.pipelines", _register_pipeline)

__all__ = sorted(set(_LAZY) - {"register_pipeline"})  # register_pipeline stays out of `from hf_fss import *`
