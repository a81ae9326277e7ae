from .configuration_seggpt_fss import SegGptFssConfig
from .image_processing_seggpt_fss import SegGptFssImageProcessor
from .modeling_seggpt_fss import SegGptFssModel

__all__ = ["SegGptFssConfig", "SegGptFssImageProcessor", "SegGptFssModel"]
