"""
Draws a few one-shot episodes of the synthetic benchmark into one PNG, to check by eye that the task is sound.

Each row is an episode on a novel class of the fold: support image, support mask overlaid, query image, query
target overlaid (the target in colour, the rest dimmed to grey, ignore pixels white).

    python scripts/visualize_episodes.py --output episodes.png [--seed 0 --num-episodes 4 --fold 0]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hf_fss.cli import IMAGE_SIDE, POSITIVE_INT, SEED, ScriptArgumentParser, os_error_line
from hf_fss.data.episodes import make_test_episodes
from hf_fss.data.folds import fold_classes, num_folds
from hf_fss.data.schema import IGNORE_INDEX
from hf_fss.data.synthetic import SYNTHETIC_CLASSES, build_synthetic
from hf_fss.utils.io import check_output_path

IGNORE_COLOUR = np.array([255, 255, 255], np.float32)
HEADER = 18
GAP = 4


def overlay(image: np.ndarray, label: np.ndarray, class_id: int) -> np.ndarray:
    """The pixels of `class_id` in their colours, everything else dimmed to grey, ignore pixels white."""
    out = image.astype(np.float32)
    grey = out.mean(axis=-1, keepdims=True) * 0.35 + 20.0
    out = np.where((label == class_id)[..., None], out, grey)
    out[label == IGNORE_INDEX] = IGNORE_COLOUR
    return out.astype(np.uint8)


def sample_episodes(dataset, fold: int, num_episodes: int, seed: int) -> list[tuple[int, int, int]]:
    """(class id, support row, query row) of the first test episodes the benchmark's own sampler draws."""
    novel = fold_classes("synthetic", fold).novel
    episodes = make_test_episodes(dataset, novel, num_episodes=num_episodes, shot=1, seed=seed)
    row_of = {image_id: row for row, image_id in enumerate(dataset["image_id"])}
    return [(e.class_id, row_of[e.supports[0]], row_of[e.query]) for e in episodes]


def draw(dataset, episodes, scale: int) -> Image.Image:
    size = dataset[0]["image"].width * scale
    columns = ("support", "support mask", "query", "query target")
    width = len(columns) * size + (len(columns) + 1) * GAP
    height = len(episodes) * (size + HEADER + GAP) + HEADER + GAP
    sheet = Image.new("RGB", (width, height), (32, 32, 32))
    pen = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for j, name in enumerate(columns):
        pen.text((GAP + j * (size + GAP), 3), name, fill=(230, 230, 230), font=font)
    for i, (class_id, support, query) in enumerate(episodes):
        top = HEADER + GAP + i * (size + HEADER + GAP)
        s, q = dataset[support], dataset[query]
        names = ", ".join(SYNTHETIC_CLASSES[c] for c in q["class_ids"])
        pen.text(
            (GAP, top + 2),
            f"class {class_id} {SYNTHETIC_CLASSES[class_id]}  |  query holds: {names}",
            fill=(255, 220, 120),
            font=font,
        )
        panels = []
        for example in (s, q):
            image = np.asarray(example["image"].convert("RGB"))
            label = np.asarray(example["label"])
            panels += [image, overlay(image, label, class_id)]
        for j, panel in enumerate(panels):
            tile = Image.fromarray(panel).resize((size, size), Image.Resampling.NEAREST)
            sheet.paste(tile, (GAP + j * (size + GAP), top + HEADER))
    return sheet


def main(argv=None) -> None:
    parser = ScriptArgumentParser(
        prog="visualize_episodes.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--seed", allowed=SEED, default=0, help="benchmark seed (and episode sampling seed)")
    parser.add_argument("--num-episodes", allowed=POSITIVE_INT, default=4)
    parser.add_argument("--fold", type=int, default=0, choices=range(num_folds("synthetic")))
    parser.add_argument(
        "--num-images", allowed=POSITIVE_INT, default=200, help="validation images to build and sample from"
    )
    parser.add_argument("--image-size", allowed=IMAGE_SIDE, default=None, help="default: the benchmark's default")
    parser.add_argument("--scale", allowed=POSITIVE_INT, default=2, help="pixel magnification of the panels")
    args = parser.parse_checked(argv)

    try:
        check_output_path(args.output, "--output", folder=False)  # before the benchmark is built
        kwargs = {} if args.image_size is None else {"image_size": args.image_size}
        # Episodes come from the validation split, where the fold's novel classes are evaluated.
        dataset = build_synthetic(seed=args.seed, num_train=0, num_val=args.num_images, **kwargs)["validation"]
        # Too few --num-images for an episode of the fold is a ValueError naming the classes: one line too.
        sheet = draw(dataset, sample_episodes(dataset, args.fold, args.num_episodes, args.seed), args.scale)
        write_png(sheet, args.output)
    except OSError as err:  # a full disk: one line, an earlier sheet intact
        parser.exit(2, f"{parser.prog}: error: {os_error_line(err) if err.errno else err}\n")
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {args.output} ({args.num_episodes} episodes, fold {args.fold})")


def write_png(sheet: Image.Image, output: Path) -> None:
    """Write `sheet` next to `output` and rename, so a reader never sees a half-written file (nor a stray one)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        sheet.save(tmp, format="PNG")
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
