"""
Hugging Face Hub side of hf_fss: model cards rendered from the real config, metrics and training record
(`render_model_card`), atomic model folders with their card (`save_pretrained_with_card`) and uploads
(`push_to_hub`).
"""

from .model_card import (
    CARD_MARKER,
    find_model_card_template,
    model_card_templates_dir,
    render_model_card,
    save_pretrained_with_card,
)
from .upload import PICKLE_SUFFIXES, REQUIRED_FILES, HubUploadError, check_model_folder, push_to_hub

__all__ = [
    "CARD_MARKER",
    "HubUploadError",
    "PICKLE_SUFFIXES",
    "REQUIRED_FILES",
    "check_model_folder",
    "find_model_card_template",
    "model_card_templates_dir",
    "push_to_hub",
    "render_model_card",
    "save_pretrained_with_card",
]
