"""
Convert an official checkpoint of a supported method to an hf_fss `save_pretrained` folder (safetensors weights,
`config.json` inferred from the weights, and the image processor's `preprocessor_config.json`).

Examples and details: `python scripts/convert_original_checkpoint.py --help` (the command line lives in `hf_fss.models.conversion`).
The same command, installed: `hf-fss convert ...` (`hf_fss.cli`).
"""

import sys

try:
    from hf_fss.models.conversion import CONVERTERS, main, parse_args  # noqa: F401 (tests import them from here)
except ModuleNotFoundError as err:  # a checkout without `pip install -e .`: no sys.path edit, one line
    sys.exit(
        f"convert_original_checkpoint.py: error: {err.name} is not installed; run `pip install -e .` in the repository first"
    )

if __name__ == "__main__":
    sys.exit(main())
