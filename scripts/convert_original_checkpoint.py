"""
Convert an official checkpoint of a supported method to an hf_fss `save_pretrained` folder (safetensors weights,
`config.json` inferred from the weights, and the image processor's `preprocessor_config.json`).

Examples and details: `python scripts/convert_original_checkpoint.py --help` (the command line lives in `hf_fss.models.conversion`).
The same command, installed: `hf-fss convert ...` (`hf_fss.cli`).
"""

from hf_fss.models.conversion import CONVERTERS, main, parse_args  # noqa: F401 (tests import them from here)

if __name__ == "__main__":
    raise SystemExit(main())
