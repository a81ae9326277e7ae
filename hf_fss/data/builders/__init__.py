"""
Builders that turn the raw benchmark releases into `datasets.DatasetDict`s with the columns of
`hf_fss.data.schema.benchmark_features`: PASCAL-5i (VOC 2012 + SBD), COCO-20i (COCO 2014), FSS-1000, and a user's own folder of images and masks.
`prepare.main` is the command line of `scripts/prepare_dataset.py`.

Builders survive the known defects of the raw releases: what has an obvious fix is fixed, what has none is
skipped, and both are logged and stored in each split's `info.description` (`build_report(split)` reads them).
"""

from ._common import build_report
from .coco import build_coco20i
from .folder import build_folder
from .fss import build_fss1000
from .pascal import build_pascal5i

__all__ = ["build_coco20i", "build_folder", "build_fss1000", "build_pascal5i", "build_report"]
