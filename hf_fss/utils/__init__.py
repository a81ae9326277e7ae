"""
What every command of hf_fss needs from its surroundings: `environment` (threads, command-line paths: local folder
or Hub id, model folder or training run folder) and `io` (atomic writes, staging folders, output locks).
"""

from .environment import (
    RUN_FOLDER_MODEL_TYPE,
    RUN_FOLDER_MODELS,
    check_model_path,
    default_num_threads,
    is_model_folder,
    looks_local,
    resolve_model_path,
    run_folder_model,
    set_num_threads,
)
from .io import (
    LOCK_NAME,
    OutputLock,
    atomic_write_text,
    check_output_path,
    give_plain_file_modes,
    hold_on_main_process,
    make_staging_dir,
    remove_stale_staging,
    replace_folder,
    write_json_atomic,
)
from .lazy import lazy_exports

# torch is imported by what uses it, not by `import hf_fss` (docs/development.md, "Import time").
_LAZY = {
    name: ".precision"
    for name in ("PRECISIONS", "channels_last_input", "check_precision", "inference_precision", "logit_agreement")
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = [
    *_LAZY,
    "LOCK_NAME",
    "RUN_FOLDER_MODELS",
    "RUN_FOLDER_MODEL_TYPE",
    "OutputLock",
    "atomic_write_text",
    "check_model_path",
    "check_output_path",
    "default_num_threads",
    "give_plain_file_modes",
    "hold_on_main_process",
    "is_model_folder",
    "looks_local",
    "make_staging_dir",
    "remove_stale_staging",
    "replace_folder",
    "resolve_model_path",
    "run_folder_model",
    "set_num_threads",
    "write_json_atomic",
]
