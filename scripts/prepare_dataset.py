"""
Build a few-shot segmentation benchmark from its raw release and save it as a Hugging Face dataset.

    python scripts/prepare_dataset.py pascal5i --voc-root VOC2012 --sbd-root benchmark_RELEASE/dataset --output-dir data/pascal5i
    python scripts/prepare_dataset.py pascal5i --voc-root VOC2012 --aug-label-dir SegmentationClassAug \
        [--train-list train_aug.txt] --output-dir data/pascal5i
    python scripts/prepare_dataset.py coco20i --coco-root coco --output-dir data/coco20i
    python scripts/prepare_dataset.py fss1000 --fss-root FSS-1000 [--split-dir hsnet/data/splits/fss] --output-dir data/fss1000
    python scripts/prepare_dataset.py folder --images my/images --masks my/masks --class-names my/classes.txt \
        --output-dir data/mine                                       # your label maps (palette PNGs of class ids)
    python scripts/prepare_dataset.py folder --images my/classes --class-folders --output-dir data/mine  # FSS-1000 style
    python scripts/prepare_dataset.py synthetic --seed 0 --num-train 200 --num-val 50 --image-size 128 --output-dir data/synthetic

Add `--push-to-hub ORG/NAME` to upload the result, `--overwrite` to replace a non-empty output folder. The logic
lives in `hf_fss.data.builders`.

The same command, installed: `hf-fss prepare ...` (`hf_fss.cli`).
"""

from hf_fss.data.builders.prepare import main  # `pip install -e .` (the README's first command) installs hf_fss

if __name__ == "__main__":
    raise SystemExit(main())
