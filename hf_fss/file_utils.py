"""Moved to `hf_fss.utils.io` (atomic writes, output paths, output locks); this name stays for existing imports."""

from hf_fss.utils.io import LOCK_NAME, OutputLock, atomic_write_text, check_output_path, hold_on_main_process

__all__ = ["LOCK_NAME", "OutputLock", "atomic_write_text", "check_output_path", "hold_on_main_process"]
