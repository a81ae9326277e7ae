"""
Convert an official checkpoint of a supported method to an hf_fss `save_pretrained` folder (safetensors weights,
`config.json` inferred from the weights, and the image processor's `preprocessor_config.json`).

    python scripts/convert_original_checkpoint.py --model-type ntrenet --checkpoint train_epoch_200.pth \
        --output-dir ntrenet-pascal5i-fold0-resnet50 [--image-size 473 --shot 1 --pyramid-bins 60 30 15 8]
    python scripts/convert_original_checkpoint.py --model-type qgnet --checkpoint train_epoch_200.pth --output-dir X
    python scripts/convert_original_checkpoint.py --model-type qgnet --checkpoint checkpoint_2000.pth.tar \
        --output-dir prior-extractor [--moco-encoder encoder_q]   # QGNet's prior extractor from a MoCo checkpoint

The checkpoint may be a bare state dict or a dict holding one under `state_dict`, with or without the `module.`
prefixes of `DataParallel`. It is read with `torch.load(..., weights_only=True)`: tensors only, no arbitrary objects.
A checkpoint that does not match the inferred architecture, holds pickled objects other than tensors, or is empty or
truncated stops with one line `convert_original_checkpoint.py: error: ...` (exit status 2, like a usage error)
naming the file and, for a mismatch, the missing and unexpected keys.

Methods are looked up in `CONVERTERS` (model type -> "module:function"); a converter takes
`(checkpoint, output_dir, image_size=..., shot=..., **options)` and writes the folder.

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
