"""
Command line of `scripts/prepare_dataset.py`: build a benchmark from its raw release (or the synthetic one),
save it with `save_to_disk` and optionally push it to the Hub.

The dataset is written into a hidden staging sibling of `--output-dir` (`.{name}.partial.{host}.{pid}.{random}`,
see `hf_fss.utils.io`) and renamed into place only when complete, so an interrupted run never leaves a half-written
output; the next run removes the staging folders killed runs left behind. A non-empty `--output-dir` is refused
unless `--overwrite` is given, and so is one another build holds (`hf_fss.utils.io.OutputLock`, beside it).
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
from pathlib import Path

import pyarrow.compute as pc
from datasets import DatasetDict, load_from_disk
from datasets.exceptions import DatasetGenerationError

from hf_fss.cli import IMAGE_SIDE, NON_NEGATIVE_INT, POSITIVE_INT, SEED, ScriptArgumentParser, os_error_line
from hf_fss.utils.io import OutputLock, check_output_path, make_staging_dir, remove_stale_staging, replace_folder

from ._common import build_report, format_counts

STAGING_TAG = "partial"
# Staging folders of earlier versions: `.{name}.XXXXXXXX.partial` (tempfile.mkdtemp, no pid recorded).
LEGACY_STAGING = r"\.{}\.[A-Za-z0-9_]{{8}}\.partial"


def build_parser() -> ScriptArgumentParser:
    """The argparse parser: one subcommand per benchmark, common output options on each."""
    common = ScriptArgumentParser(add_help=False)
    common.add_argument("--output-dir", required=True, type=Path, help="where save_to_disk writes the DatasetDict")
    common.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    common.add_argument("--push-to-hub", metavar="REPO", help="also push the DatasetDict to this Hub dataset repo")
    common.add_argument("--private", action="store_true", help="make a newly created Hub repo private")
    common.add_argument(
        "--export-episodes",
        nargs="+",
        metavar="PROTOCOL",
        choices=("pfenet", "hsnet", "panet"),
        default=None,
        help="write these protocols' fixed test episode lists into <output-dir>/episodes/ (pushed with the data)",
    )
    common.add_argument(
        "--episode-shots", type=int, nargs="+", default=[1, 5], help="shots of the exported lists (default 1 5)"
    )
    common.add_argument(
        "--num-proc", allowed=POSITIVE_INT, default=None, help="worker processes for building and saving"
    )

    parser = ScriptArgumentParser(
        prog="prepare_dataset.py", description="Build a few-shot segmentation benchmark as a Hugging Face dataset."
    )
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="{pascal5i,coco20i,fss1000,synthetic,folder}")

    pascal = sub.add_parser("pascal5i", parents=[common], help="PASCAL-5i from VOC 2012 + SBD")
    pascal.add_argument("--voc-root", required=True, type=Path, help="VOC2012/ (or VOCdevkit/)")
    source = pascal.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--sbd-root", type=Path, help="SBD benchmark_RELEASE/dataset/ (cls/, img/, train.txt, val.txt)"
    )
    source.add_argument("--aug-label-dir", type=Path, help="a ready SegmentationClassAug/ folder of {id}.png labels")
    pascal.add_argument(
        "--train-list", type=Path, help="with --aug-label-dir: train ids (e.g. train_aug.txt) instead of all labels"
    )

    coco = sub.add_parser("coco20i", parents=[common], help="COCO-20i from COCO 2014")
    coco.add_argument("--coco-root", required=True, type=Path, help="holds train2014/, val2014/, annotations/")

    fss = sub.add_parser("fss1000", parents=[common], help="FSS-1000")
    fss.add_argument("--fss-root", required=True, type=Path, help="one folder per class of N.jpg + N.png")
    fss.add_argument("--split-dir", type=Path, help="folder with trn.txt, val.txt, test.txt (HSNet data/splits/fss)")
    fss.add_argument("--seed", allowed=SEED, default=0, help="seed of the fallback class split (without --split-dir)")

    folder = sub.add_parser(
        "folder", parents=[common], help="your own images and masks (label maps, or per-class folders of binary masks)"
    )
    folder.add_argument("--images", required=True, type=Path, help="the images (.jpg, .jpeg, .png; sub-folders too)")
    folder.add_argument(
        "--masks", type=Path, help="masks at the images' relative paths with .png (default: the --images folder)"
    )
    layout = folder.add_mutually_exclusive_group()
    layout.add_argument(
        "--class-names", type=Path, help="label maps: text file, line k names class id k (line 0 the background)"
    )
    layout.add_argument(
        "--class-folders",
        action="store_true",
        help="FSS-1000 layout: IMAGES/<class>/<name>.jpg with a black / white MASKS/<class>/<name>.png",
    )
    folder.add_argument(
        "--split-dir", type=Path, help="folder with train.txt, val.txt, test.txt of class names (default: seeded)"
    )
    folder.add_argument("--seed", allowed=SEED, default=0, help="seed of the class split (without --split-dir)")
    folder.add_argument(
        "--skip-invalid", action="store_true", help="leave out (and report) images with bad input instead of failing"
    )

    synthetic = sub.add_parser("synthetic", parents=[common], help="the synthetic benchmark (no download)")
    synthetic.add_argument("--seed", allowed=SEED)
    synthetic.add_argument("--num-train", allowed=NON_NEGATIVE_INT)
    synthetic.add_argument("--num-val", allowed=NON_NEGATIVE_INT)
    synthetic.add_argument("--image-size", allowed=IMAGE_SIDE)
    return parser


def build(args: argparse.Namespace, cache_dir: Path | None = None) -> DatasetDict:
    """The DatasetDict the parsed `args` ask for; builder caches go to `cache_dir`."""
    if args.benchmark == "pascal5i":
        from .pascal import build_pascal5i

        if args.train_list is not None and args.aug_label_dir is None:
            raise ValueError("--train-list only applies with --aug-label-dir")
        return build_pascal5i(
            args.voc_root,
            sbd_root=args.sbd_root,
            aug_label_dir=args.aug_label_dir,
            train_list=args.train_list,
            cache_dir=cache_dir,
            num_proc=args.num_proc,
        )
    if args.benchmark == "coco20i":
        from .coco import build_coco20i

        return build_coco20i(args.coco_root, cache_dir=cache_dir, num_proc=args.num_proc)
    if args.benchmark == "fss1000":
        from .fss import build_fss1000

        return build_fss1000(
            args.fss_root, split_dir=args.split_dir, seed=args.seed, cache_dir=cache_dir, num_proc=args.num_proc
        )
    if args.benchmark == "folder":
        from .folder import build_folder

        return build_folder(
            args.images,
            args.masks,
            class_names_file=args.class_names,
            class_folders=args.class_folders,
            split_dir=args.split_dir,
            seed=args.seed,
            skip_invalid=args.skip_invalid,
            cache_dir=cache_dir,
            num_proc=args.num_proc,
        )
    if args.benchmark == "synthetic":
        from hf_fss.data.synthetic import build_synthetic  # written separately; imported only when asked for

        options = {
            "seed": args.seed,
            "num_train": args.num_train,
            "num_val": args.num_val,
            "image_size": args.image_size,
            "num_proc": args.num_proc,
        }
        return build_synthetic(**{k: v for k, v in options.items() if v is not None})
    raise ValueError(f"unknown benchmark {args.benchmark!r}")


def split_summary(name: str, dataset) -> str:
    """One line: split name, rows, how many distinct classes (background and ignore excluded) it holds, and how many
    defects of the raw release the build fixed and skipped, with the number of each kind (`REPORT_KINDS`)."""
    if "class_ids" not in dataset.column_names:
        return f"{name}: {dataset.num_rows} rows"
    ids = pc.unique(pc.list_flatten(dataset.data.column("class_ids")))
    line = f"{name}: {dataset.num_rows} rows, {len(ids)} classes"
    report = build_report(dataset)
    if report["fixed"] or report["skipped"]:
        line += (
            f"; defects of the release: {len(report['fixed'])} fixed, {len(report['skipped'])} skipped "
            f"({format_counts(report['counts'])}; listed above and in the dataset info: "
            "hf_fss.data.builders.build_report)"
        )
    return line


def verify_splits(dataset: DatasetDict, what: str) -> None:
    """ValueError naming the first split of `dataset` (`what` names where it is) that has no rows or cannot be read
    back: a DatasetDict with an empty split is saved by `save_to_disk` but `load_from_disk` cannot open it."""
    for name, split in dataset.items():
        if split.num_rows == 0:
            raise ValueError(
                f"the {name} split of {what} has no rows; nothing was written (every split needs one row at least; "
                "synthetic: --num-train and --num-val >= 1)"
            )
        _ = split[0]  # decodes one row: an unreadable split fails here, before the rename


def save_atomically(
    dataset: DatasetDict, output_dir: Path, staging: Path, num_proc: int | None = None, finish=None
) -> None:
    """
    save_to_disk into `staging`, read it back and check every split (`verify_splits`), let `finish(saved, folder)`
    add its files (the card, episode lists), then swap it in for `output_dir` (whose old content, if any, is
    dropped). A split or a `finish` that fails leaves `output_dir` untouched.
    """
    verify_splits(dataset, "the build")
    written = staging / "dataset"
    dataset.save_to_disk(str(written), num_proc=num_proc)
    saved = load_from_disk(str(written))
    verify_splits(saved, f"the saved copy {written}")
    if finish is not None:
        finish(saved, written)
    replace_folder(written, output_dir, backup=staging / "replaced")  # a failed rename puts the old one back


def main(argv: list[str] | None = None) -> int:
    """
    Run the command line; returns the exit status: 0 saved, 2 refused (a usage error, input the build cannot use,
    another run building into the same `--output-dir`, or an operating-system error such as a full disk), with one
    line on stderr and nothing written: an earlier output stays as it was.
    """
    parser = build_parser()
    args = parser.parse_checked(argv)
    output_dir: Path = args.output_dir
    if output_dir.exists() and not output_dir.is_dir():
        parser.error(f"--output-dir {output_dir} exists and is not a directory")
    try:
        check_output_path(output_dir, "--output-dir")  # before any work: an unwritable place, a file on the way
        # Held beside the folder, which is replaced whole: two builds into one --output-dir would replace each other.
        with OutputLock(output_dir, beside=True):
            if output_dir.is_dir() and any(output_dir.iterdir()) and not args.overwrite:
                parser.error(f"--output-dir {output_dir} exists and is not empty; pass --overwrite to replace it")
            _build_and_save(args, parser.prog)
    except (OSError, ValueError, DatasetGenerationError, ImportError) as err:
        # Errors raised while generating rows arrive wrapped in DatasetGenerationError; report the cause.
        cause = err.__cause__ if isinstance(err, DatasetGenerationError) and err.__cause__ is not None else err
        line = os_error_line(cause) if isinstance(cause, OSError) and cause.errno else " ".join(str(cause).split())
        print(f"{parser.prog}: error: {line}", file=sys.stderr)
        return 2

    saved = load_from_disk(str(output_dir))
    print(f"saved {args.benchmark} to {output_dir}")
    for name, split in saved.items():
        print(split_summary(name, split))
    if args.push_to_hub:
        saved.push_to_hub(args.push_to_hub, private=args.private or None)
        _upload_card_and_episodes(output_dir, args.push_to_hub)
        print(f"pushed to https://huggingface.co/datasets/{args.push_to_hub}")
    return 0


def _upload_card_and_episodes(output_dir: Path, repo_id: str) -> None:
    """After `DatasetDict.push_to_hub` (data files): the card (replacing the one it wrote) and the episode lists."""
    from huggingface_hub import HfApi

    HfApi().upload_folder(
        folder_path=str(output_dir),
        repo_id=repo_id,
        repo_type="dataset",
        allow_patterns=["README.md", "episodes/**"],
        commit_message="Dataset card and test episode lists (hf_fss prepare_dataset.py)",
    )


def _finish(args: argparse.Namespace):
    """What goes into the saved folder before it is swapped in: the dataset card, the exported episode lists."""
    from hf_fss.utils.io import atomic_write_text

    from .card import render_dataset_card

    def finish(saved: DatasetDict, folder: Path) -> None:
        if args.export_episodes:
            from hf_fss.evaluation.episode_export import export_test_episodes  # the protocols sit above the data

            export_test_episodes(saved, args.benchmark, folder / "episodes", args.export_episodes, args.episode_shots)
        card = render_dataset_card(saved, args.benchmark, repo_id=args.push_to_hub)
        atomic_write_text(folder / "README.md", str(card))

    return finish


def _build_and_save(args: argparse.Namespace, prog: str) -> None:
    """Build into a staging folder beside `--output-dir` and swap it in (`save_atomically`); the staging goes."""
    output_dir: Path = args.output_dir
    # Staging folders of killed runs (their writer's pid is dead) are removed; a live run's are left alone.
    remove_stale_staging(output_dir, STAGING_TAG, legacy=[LEGACY_STAGING.format(re.escape(output_dir.name))])
    staging = make_staging_dir(output_dir, STAGING_TAG)
    # The build's log (each defect of the raw release fixed or skipped) goes to stderr.
    log_handler = logging.StreamHandler(sys.stderr)
    log_handler.setFormatter(logging.Formatter(f"{prog}: %(levelname)s: %(message)s"))
    build_logger = logging.getLogger("hf_fss.data")
    build_logger.addHandler(log_handler)
    try:
        dataset = build(args, cache_dir=staging / "cache")
        save_atomically(dataset, output_dir, staging, num_proc=args.num_proc, finish=_finish(args))
    finally:
        build_logger.removeHandler(log_handler)
        shutil.rmtree(staging, ignore_errors=True)
