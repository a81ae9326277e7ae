"""The argument group of `scripts/pretrain_prior.py`, parsed with `LoopArguments` by `parse_groups`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from hf_fss.cli import (
    IMAGE_SIDE,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Range,
    check_ranges,
)
from hf_fss.evaluation.arguments import SyntheticArguments, synthetic_kwargs
from hf_fss.training.arguments import _FRACTION, LoopArguments, _check_choices

__all__ = ["PRETRAIN_DESCRIPTION", "PRETRAIN_GROUPS", "PRETRAIN_QUICKSTART", "PretrainingArguments"]

# MoCo's key encoder update: m = 0 copies the query encoder, m = 1 never moves.
_KEY_MOMENTUM = Range(0, 1)
PRETRAIN_QUICKSTART = Path(str(resources.files("hf_fss") / "recipes" / "prior" / "quickstart_synthetic.yaml"))


@dataclass
class PretrainingArguments(SyntheticArguments):
    """The prior extractor's global + local contrastive pretraining: data, superpixels, model, losses, export, probe."""

    config: str | None = field(
        default=None, metadata={"help": "YAML recipe (e.g. recipes/prior/quickstart_synthetic.yaml); flags override"}
    )
    # --- data ----------------------------------------------------------------------------------------------------
    dataset: str = field(
        default="synthetic",
        metadata={"help": "'synthetic', a prepare_dataset.py folder, a Hub dataset id, or a folder of image files"},
    )
    include_eval_images: bool = field(
        default=False,
        metadata={"help": "also the benchmark's evaluation split(s): the paper's 'all images' (the test queries)"},
    )
    image_size: int = field(default=224, metadata={"range": IMAGE_SIDE, "help": "side of the image views (MoCo: 224)"})
    patch_size: int | None = field(
        default=None, metadata={"range": IMAGE_SIDE, "help": "side of the patch views (default image_size)"}
    )
    # --- local patches -------------------------------------------------------------------------------------------
    local_form: Literal["patch", "pooled"] = field(
        default="patch",
        metadata={"help": "patch: superpixel crops as extra inputs (paper Fig. 3); pooled: mask pooling (option)"},
    )
    superpixels: Literal["slic", "felzenszwalb"] = field(default="slic", metadata={"help": "patch generator"})
    slic_segments: int = field(default=100, metadata={"range": POSITIVE_INT, "help": "skimage slic n_segments"})
    slic_compactness: float = field(
        default=10.0, metadata={"range": POSITIVE, "help": "skimage slic compactness (Eq. 2's m)"}
    )
    slic_sigma: float = field(default=0.0, metadata={"range": NON_NEGATIVE, "help": "skimage slic sigma"})
    felzenszwalb_scale: float = field(default=1.0, metadata={"range": POSITIVE, "help": "skimage felzenszwalb scale"})
    felzenszwalb_sigma: float = field(
        default=0.8, metadata={"range": NON_NEGATIVE, "help": "skimage felzenszwalb sigma"}
    )
    felzenszwalb_min_size: int = field(
        default=20, metadata={"range": NON_NEGATIVE_INT, "help": "skimage felzenszwalb min_size"}
    )
    superpixel_min_area: float = field(
        default=0.01,
        metadata={"range": _FRACTION, "help": "superpixels under this share of the image are never sampled"},
    )
    superpixel_cache_dir: str | None = field(
        default=None, metadata={"help": "on-disk superpixel cache (default <output_dir>/superpixels)"}
    )
    # --- model and losses ----------------------------------------------------------------------------------------
    backbone_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": 'DilatedResNet arguments, JSON (default {"depth": 50, "stem": "7x7"}: ResNet-50, 7x7 stem)'},
    )
    init_weights: str | None = field(
        default=None, metadata={"help": "initialise both encoders' backbones from these weights (default: random)"}
    )
    head_hidden_dim: int | None = field(
        default=None, metadata={"range": POSITIVE_INT, "help": "MLP head hidden width (default: C_last)"}
    )
    embedding_dim: int = field(default=128, metadata={"range": POSITIVE_INT, "help": "embedding (key) width"})
    queue_size: int = field(default=65536, metadata={"range": POSITIVE_INT, "help": "image key queue K (Eq. 1)"})
    patch_queue_size: int = field(default=65536, metadata={"range": POSITIVE_INT, "help": "patch key queue M (Eq. 6)"})
    temperature: float = field(default=0.2, metadata={"range": POSITIVE, "help": "tau of both losses (MoCo v2)"})
    key_momentum: float = field(default=0.999, metadata={"range": _KEY_MOMENTUM, "help": "key encoder momentum m"})
    global_weight: float = field(
        default=1.0, metadata={"range": NON_NEGATIVE, "help": "weight of L_global (0: local only, Table VI)"}
    )
    local_weight: float = field(
        default=1.0, metadata={"range": NON_NEGATIVE, "help": "weight of L_local (0: global only, Table VI)"}
    )
    symmetric: bool = field(default=False, metadata={"help": "symmetric loss (MoCo colab); MoCo v2 is one-way"})
    bn_splits: int | None = field(
        default=None,
        metadata={
            "range": POSITIVE_INT,
            "help": "SplitBatchNorm splits (default: 8 on one process, else 1 = Shuffle-BN)",
        },
    )
    base_learning_rate: float = field(
        default=0.03,
        metadata={"range": POSITIVE, "help": "SGD lr per 256 images; --learning-rate = this x global batch / 256"},
    )
    lr_schedule: Literal["cosine_epoch", "loop"] = field(
        default="cosine_epoch",
        metadata={"help": "cosine_epoch: MoCo's per-epoch cosine; loop: the loop's --lr-scheduler"},
    )
    # --- export and probe ----------------------------------------------------------------------------------------
    export_encoder: Literal["encoder_k", "encoder_q"] = field(
        default="encoder_k", metadata={"help": "the encoder exported to --output-dir (QGNet loads encoder_k)"}
    )
    export_moco: str | None = field(
        default=None, metadata={"help": "also write MoCo's checkpoint layout to this file (.safetensors or .pth.tar)"}
    )
    probe: bool = field(
        default=False, metadata={"help": "after training: region-map recall and k-NN probe vs a random extractor"}
    )
    probe_fold: int = field(
        default=0, metadata={"range": NON_NEGATIVE_INT, "help": "probe: the fold whose base classes are used"}
    )
    probe_train_images: int = field(
        default=600, metadata={"range": POSITIVE_INT, "help": "probe: k-NN bank images (training split)"}
    )
    probe_test_images: int = field(
        default=300, metadata={"range": NON_NEGATIVE_INT, "help": "probe: test images (evaluation split)"}
    )
    queue_digest_file: str | None = field(
        default=None, metadata={"help": "debug: write per-step queue hashes to <this>.<process>.json"}
    )

    def __post_init__(self):
        if isinstance(self.backbone_kwargs, str):
            try:
                self.backbone_kwargs = json.loads(self.backbone_kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(f"--backbone-kwargs must be a JSON object ({err})") from err
        if self.backbone_kwargs is not None and not isinstance(self.backbone_kwargs, dict):
            raise ValueError(
                f"--backbone-kwargs must be a JSON object of DilatedResNet arguments such as '{{\"depth\": 50}}', "
                f"got {type(self.backbone_kwargs).__name__} {self.backbone_kwargs!r}"
            )
        self.backbone_kwargs = dict(self.backbone_kwargs or {"depth": 50, "stem": "7x7"})
        check_ranges(self)
        _check_choices(
            self,
            {
                "local_form": ("patch", "pooled"),
                "superpixels": ("slic", "felzenszwalb"),
                "lr_schedule": ("cosine_epoch", "loop"),
                "export_encoder": ("encoder_k", "encoder_q"),
            },
        )
        if self.global_weight + self.local_weight == 0:
            raise ValueError("global_weight and local_weight are both 0: nothing to train; set one > 0")

    @property
    def uses_local(self) -> bool:
        return self.local_weight > 0

    def synthetic_kwargs(self) -> dict:
        """`load_benchmark`'s keywords of the `--synthetic-*` flags (none unless `--dataset synthetic`)."""
        return synthetic_kwargs(self)

    def default_output_dir(self) -> str:
        name = Path(self.dataset.rstrip("/")).name or "dataset"
        return f"outputs/prior-{name}-{self.superpixels}-{self.local_form}"


PRETRAIN_GROUPS: tuple[type, ...] = (LoopArguments, PretrainingArguments)
PRETRAIN_DESCRIPTION = (
    "Pretrain QGNet's prior extractor with global (MoCo v2) + local (superpixel) contrastive learning on unlabeled "
    "images. `accelerate launch scripts/pretrain_prior.py` with no argument runs the quickstart "
    "(recipes/prior/quickstart_synthetic.yaml); precedence: defaults < --config < flags."
)
