"""The argument group of `scripts/pretrain_prior.py`, parsed with `LoopArguments` by `parse_groups`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from hf_fss.training.arguments import LoopArguments, _check, _check_choices, _check_finite

__all__ = ["PRETRAIN_DESCRIPTION", "PRETRAIN_GROUPS", "PRETRAIN_QUICKSTART", "PretrainingArguments"]

PRETRAIN_QUICKSTART = Path(str(resources.files("hf_fss") / "recipes" / "prior" / "quickstart_synthetic.yaml"))


@dataclass
class PretrainingArguments:
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
    synthetic_num_train: int | None = field(default=None, metadata={"help": "synthetic benchmark: train images"})
    synthetic_num_val: int | None = field(default=None, metadata={"help": "synthetic benchmark: validation images"})
    synthetic_image_size: int | None = field(default=None, metadata={"help": "synthetic benchmark: image side"})
    synthetic_seed: int = field(default=0, metadata={"help": "synthetic benchmark: generation seed"})
    image_size: int = field(default=224, metadata={"help": "side of the image views (MoCo: 224)"})
    patch_size: int | None = field(default=None, metadata={"help": "side of the patch views (default image_size)"})
    # --- local patches -------------------------------------------------------------------------------------------
    local_form: Literal["patch", "pooled"] = field(
        default="patch",
        metadata={"help": "patch: superpixel crops as extra inputs (paper Fig. 3); pooled: mask pooling (option)"},
    )
    superpixels: Literal["slic", "felzenszwalb"] = field(default="slic", metadata={"help": "patch generator"})
    slic_segments: int = field(default=100, metadata={"help": "skimage slic n_segments"})
    slic_compactness: float = field(default=10.0, metadata={"help": "skimage slic compactness (Eq. 2's m)"})
    slic_sigma: float = field(default=0.0, metadata={"help": "skimage slic sigma"})
    felzenszwalb_scale: float = field(default=1.0, metadata={"help": "skimage felzenszwalb scale"})
    felzenszwalb_sigma: float = field(default=0.8, metadata={"help": "skimage felzenszwalb sigma"})
    felzenszwalb_min_size: int = field(default=20, metadata={"help": "skimage felzenszwalb min_size"})
    superpixel_min_area: float = field(
        default=0.01, metadata={"help": "superpixels under this share of the image are never sampled"}
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
    head_hidden_dim: int | None = field(default=None, metadata={"help": "MLP head hidden width (default: C_last)"})
    embedding_dim: int = field(default=128, metadata={"help": "embedding (key) width"})
    queue_size: int = field(default=65536, metadata={"help": "image key queue K (Eq. 1)"})
    patch_queue_size: int = field(default=65536, metadata={"help": "patch key queue M (Eq. 6)"})
    temperature: float = field(default=0.2, metadata={"help": "tau of both losses (MoCo v2)"})
    key_momentum: float = field(default=0.999, metadata={"help": "key encoder momentum m"})
    global_weight: float = field(default=1.0, metadata={"help": "weight of L_global (0: local only, Table VI)"})
    local_weight: float = field(default=1.0, metadata={"help": "weight of L_local (0: global only, Table VI)"})
    symmetric: bool = field(default=False, metadata={"help": "symmetric loss (MoCo colab); MoCo v2 is one-way"})
    bn_splits: int | None = field(
        default=None, metadata={"help": "SplitBatchNorm splits (default: 8 on one process, else 1 = Shuffle-BN)"}
    )
    base_learning_rate: float = field(
        default=0.03, metadata={"help": "SGD lr per 256 images; --learning-rate = this x global batch / 256"}
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
    probe_fold: int = field(default=0, metadata={"help": "probe: the fold whose base classes are used"})
    probe_train_images: int = field(default=600, metadata={"help": "probe: k-NN bank images (training split)"})
    probe_test_images: int = field(default=300, metadata={"help": "probe: test images (evaluation split)"})
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "torch threads per process (default: the cores / processes on this machine; 1 for tiny models)"
        },
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
        self.backbone_kwargs = dict(self.backbone_kwargs or {"depth": 50, "stem": "7x7"})
        _check_finite(self)
        _check_choices(
            self,
            {
                "local_form": ("patch", "pooled"),
                "superpixels": ("slic", "felzenszwalb"),
                "lr_schedule": ("cosine_epoch", "loop"),
                "export_encoder": ("encoder_k", "encoder_q"),
            },
        )
        _check(
            self,
            positive=("image_size", "embedding_dim", "queue_size", "patch_queue_size", "probe_train_images"),
            optional_positive=("patch_size", "bn_splits", "head_hidden_dim", "num_threads"),
            non_negative=("global_weight", "local_weight", "probe_fold", "probe_test_images"),
        )
        if self.global_weight + self.local_weight == 0:
            raise ValueError("global_weight and local_weight are both 0: nothing to train; set one > 0")
        if self.temperature <= 0 or self.base_learning_rate <= 0:
            raise ValueError("temperature and base_learning_rate must be > 0")

    @property
    def uses_local(self) -> bool:
        return self.local_weight > 0

    def synthetic_kwargs(self) -> dict:
        values = {"num_train": self.synthetic_num_train, "num_val": self.synthetic_num_val}
        values["image_size"] = self.synthetic_image_size
        return {"synthetic_seed": self.synthetic_seed, **{k: v for k, v in values.items() if v is not None}}

    def default_output_dir(self) -> str:
        name = Path(self.dataset.rstrip("/")).name or "dataset"
        return f"outputs/prior-{name}-{self.superpixels}-{self.local_form}"


PRETRAIN_GROUPS: tuple[type, ...] = (LoopArguments, PretrainingArguments)
PRETRAIN_DESCRIPTION = (
    "Pretrain QGNet's prior extractor with global (MoCo v2) + local (superpixel) contrastive learning on unlabeled "
    "images. `accelerate launch scripts/pretrain_prior.py` with no argument runs the quickstart "
    "(recipes/prior/quickstart_synthetic.yaml); precedence: defaults < --config < flags."
)
