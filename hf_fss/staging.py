"""Moved to `hf_fss.utils.io` (staging folders of atomic saves); this name stays for existing imports."""

from hf_fss.utils.io import _host, give_plain_file_modes, make_staging_dir, remove_stale_staging  # noqa: F401 (tests)

__all__ = ["give_plain_file_modes", "make_staging_dir", "remove_stale_staging"]
