"""hf_fss: few-shot semantic segmentation models for the Hugging Face ecosystem.

Importing the package registers every model, its configuration and the image processor with transformers'
`AutoConfig`, `AutoModel` and `AutoImageProcessor`, so `AutoModel.from_pretrained(repo_or_dir)` returns the
right class.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .configuration_fss import FewShotSegmentationConfig
from .image_processing_fss import FewShotSegmentationImageProcessor
from .modeling_fss import FewShotSegmentationOutput, FewShotSegmentationPreTrainedModel, SupportEncoding
from .models import MODEL_CLASSES
from .models.cosine_prior import CosinePriorConfig, CosinePriorModel
from .models.crcnet import CRCNetConfig, CRCNetModel
from .models.ntrenet import NTRENetConfig, NTRENetModel
from .models.qgnet import QGNetConfig, QGNetModel
from .models.seggpt_fss import SegGptFssConfig, SegGptFssImageProcessor, SegGptFssModel
from .models.smcp import SMCPConfig, SMCPModel
from .pipelines import FewShotSegmentationPipeline, register_pipeline
from .run_folder import RunFolderConfig, RunFolderModel

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    # The registry lives in hf_fss.models (MODEL_CLASSES, re-exported here); each method gets its processor (the
    # shared one, SegGPT's geometry for the SegGPT adapter).
    for model_type, (config_class, model_class) in MODEL_CLASSES.items():
        AutoConfig.register(model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
        AutoImageProcessor.register(
            config_class, image_processor_classes={"pil": model_class.fss_image_processor_class}, exist_ok=True
        )
    # A training run folder's marker config.json: AutoModel / pipeline() load its best/ (else final/) model.
    AutoConfig.register(RunFolderConfig.model_type, RunFolderConfig, exist_ok=True)
    AutoModel.register(RunFolderConfig, RunFolderModel, exist_ok=True)


_register_auto_classes()
register_pipeline()  # pipeline("few-shot-segmentation", model=...)

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
