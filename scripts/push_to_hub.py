"""
Upload a saved hf_fss model folder to the Hugging Face Hub: safetensors weights, config.json,
preprocessor_config.json, the model card (README.md) and metrics.json / training.json when present.

Examples and details: `python scripts/push_to_hub.py --help` (the command line lives in `hf_fss.hub.upload`).
The same command, installed: `hf-fss push ...` (`hf_fss.cli`).
"""

from hf_fss.hub.upload import main, parse_args  # noqa: F401 (tests import parse_args from here)

if __name__ == "__main__":
    raise SystemExit(main())
