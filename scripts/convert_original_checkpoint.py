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
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

PROG = "convert_original_checkpoint.py"

# model type -> "module:function"; add QGNet, SMCP, ... here as their converters land.
CONVERTERS = {
    "ntrenet": "hf_fss.models.ntrenet.convert_ntrenet:convert_ntrenet_checkpoint",
    "qgnet": "hf_fss.models.qgnet.convert_qgnet:convert_qgnet_checkpoint",
    "smcp": "hf_fss.models.smcp.convert_smcp:convert_smcp_checkpoint",
}


def _import(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:  # run from a checkout without `pip install -e .`
        if err.name != "hf_fss":
            raise
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        return importlib.import_module(module_name)


def _load_converter(model_type: str):
    module_name, function_name = CONVERTERS[model_type].split(":")
    return getattr(_import(module_name), function_name)


def _bin(value: str) -> int | float:
    """A pyramid bin: an int side > 1, or a fraction of the feature map in (0, 1]."""
    number = _import("hf_fss.cli").POSITIVE(value)
    return int(number) if number > 1 and number.is_integer() else number


def parse_args(argv=None) -> argparse.Namespace:
    cli = _import("hf_fss.cli")
    POSITIVE_INT, IMAGE_SIDE = cli.POSITIVE_INT, cli.IMAGE_SIDE  # noqa: N806 (the shared range constants)
    parser = cli.ScriptArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model-type", required=True, choices=sorted(CONVERTERS), help="method of the checkpoint")
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="official .pth / .pt file, or for qgnet a MoCo .pth.tar (prior extractor alone)",
    )
    parser.add_argument("--output-dir", required=True, type=Path, help="folder to write (save_pretrained layout)")
    parser.add_argument(
        "--image-size",
        allowed=IMAGE_SIDE,
        default=None,
        help="test image size for the config and processor (default: the method's, 473 NTRENet / QGNet, 417 SMCP)",
    )
    parser.add_argument(
        "--shot",
        allowed=POSITIVE_INT,
        default=1,
        help="K the checkpoint was trained with, recorded in the config (default 1)",
    )
    parser.add_argument(
        "--pyramid-bins",
        type=_bin,
        nargs="+",
        default=None,
        help="NTRENet: pyramid scale sizes when the checkpoint does not use the official 60 30 15 8",
    )
    parser.add_argument(
        "--moco-encoder",
        choices=("encoder_k", "encoder_q"),
        default=None,
        help="QGNet, MoCo checkpoint of the prior extractor: the encoder to take (default encoder_k, as the official code)",
    )
    args = parser.parse_checked(argv)
    return args


def main(argv=None) -> int:
    """Convert; on a bad checkpoint print one line `convert_original_checkpoint.py: error: ...` and return 2."""
    args = parse_args(argv)
    file_utils = _import("hf_fss.file_utils")
    try:
        # Before the (slow) conversion: a file where the folder goes, an unwritable place.
        file_utils.check_output_path(args.output_dir, "--output-dir")
        if not args.checkpoint.is_file():
            raise FileNotFoundError(f"--checkpoint {args.checkpoint} does not exist or is not a file")
        converter = _load_converter(args.model_type)
        options = {} if args.image_size is None else {"image_size": args.image_size}
        if args.pyramid_bins is not None:
            options["pyramid_bins"] = tuple(args.pyramid_bins)
        if args.moco_encoder is not None:
            options["moco_encoder"] = args.moco_encoder
        model = converter(args.checkpoint, args.output_dir, shot=args.shot, **options)
    except OSError as err:
        if err.errno is None:  # the checkpoint's own problem, in its words
            return _refuse(args, str(err))
        # A full disk or a refused write names its own path (the output's, or the checkpoint's when unreadable).
        print(f"{PROG}: error: {_import('hf_fss.cli').os_error_line(err)}", file=sys.stderr)
        return 2
    except ValueError as err:
        return _refuse(args, str(err))
    # A QGNet MoCo checkpoint converts to a prior extractor (a backbone, no config).
    backbone = model.config.backbone if hasattr(model, "config") else f"{type(model).__name__} prior extractor"
    print(
        f"converted {args.checkpoint} -> {args.output_dir} ({args.model_type}, backbone={backbone}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters)"
    )
    return 0


def _refuse(args: argparse.Namespace, text: str) -> int:
    """Print one line naming the checkpoint (and the output check's flag as it comes); the exit status, 2."""
    message = " ".join(text.splitlines())
    if str(args.checkpoint) not in message and not message.startswith("--output-dir"):
        message = f"{args.checkpoint}: {message}"
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
