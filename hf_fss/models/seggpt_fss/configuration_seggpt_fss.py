"""Configuration of the SegGPT adapter: transformers' SegGPT run as an hf_fss few-shot model."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ...configuration_fss import check_dtype_name, check_unknown_config_fields

if TYPE_CHECKING:
    from transformers import SegGptConfig


def _seggpt_config_class() -> type:
    # Imported when used, not with this module: importing transformers' SegGptConfig runs its docstring decorator,
    # which needs transformers' modeling_auto whole, and hf_fss registers its configs while modeling_auto may still be
    # importing (configuration_auto is imported by it; hf_fss/__init__.py).
    from transformers import SegGptConfig

    return SegGptConfig


class _SubConfigs(Mapping):
    """transformers' `sub_configs` (`{"seggpt_config": SegGptConfig}`): keys known at once, the class on first read."""

    def __getitem__(self, key: str) -> type:
        if key != "seggpt_config":
            raise KeyError(key)
        return _seggpt_config_class()

    def __iter__(self) -> Iterator[str]:
        return iter(("seggpt_config",))

    def __len__(self) -> int:
        return 1


def seggpt_config_from(name_or_path: str) -> SegGptConfig:
    """
    SegGPT's config from a Hub id or folder (its `config.json`).

    Raises:
        `OSError`: it cannot be read (transformers' message).
        `ValueError`: it is another architecture's config (its `model_type` is named), or an hf_fss `seggpt_fss`
            folder (`from_pretrained` is named).
    """
    SegGptConfig = _seggpt_config_class()
    config_dict, _ = SegGptConfig.get_config_dict(name_or_path)
    found = config_dict.get("model_type")
    if found == "seggpt_fss":  # already the adapter (a folder saved by SegGptFssModel): nothing to wrap
        raise ValueError(
            f"{name_or_path} already holds an hf_fss SegGPT adapter ('seggpt_fss'), not a SegGPT checkpoint to wrap; "
            f"load it with SegGptFssModel.from_pretrained('{name_or_path}') or AutoModel.from_pretrained"
        )
    if found != SegGptConfig.model_type:
        raise ValueError(
            f"{name_or_path} holds a model of type {found!r}, not SegGPT ({SegGptConfig.model_type!r}); give a SegGPT "
            "checkpoint such as BAAI/seggpt-vit-large"
        )
    return SegGptConfig.from_dict(config_dict)


@strict(accept_kwargs=True)
class SegGptFssConfig(PreTrainedConfig):
    r"""
    SegGPT ([Wang et al., 2023](https://huggingface.co/papers/2304.03284); transformers' `SegGptForImageSegmentation`)
    as a few-shot segmentation model: the supports and their masks are SegGPT's prompt images and prompt masks, the
    query its input image. It has no trainable head of its own and is not trained by hf_fss.

    seggpt_config (`SegGptConfig` or `dict`, *optional*):
        SegGPT's own architecture. When left out it is read once from `seggpt_name_or_path` (a Hub id or folder, its
        `config.json`), else transformers' default `SegGptConfig()`, the shapes of `BAAI/seggpt-vit-large`. A saved
        `config.json` holds it in full, so loading a saved model never reads the Hub.
    seggpt_name_or_path (`str`, *optional*):
        Where SegGPT's weights come from (e.g. `"BAAI/seggpt-vit-large"` or a folder written by
        `SegGptForImageSegmentation.save_pretrained`); `model.load_pretrained_extractors()` loads them. `None`: random
        weights (tests, timing), and the config says so.
    feature_ensemble (`bool`, *optional*, defaults to `True`):
        K-shot through SegGPT's feature ensemble (the query is repeated once per prompt and its features are averaged
        across the prompts inside the encoder); without it, K > 1 runs K independent one-shot passes of which the
        first is kept.
    embedding_type (`str`, *optional*, defaults to `"instance"`):
        SegGPT's prompt type embedding, `"instance"` (transformers' default) or `"semantic"`.
    image_size (`int`, *optional*):
        Side of the square images SegGPT takes (448 for `BAAI/seggpt-vit-large`): always SegGPT's input width, set
        from `seggpt_config`; giving another value is an error.
    ignore_index (`int`, *optional*, defaults to 255):
        Label value excluded from metrics; in support masks it is treated as background (SegGPT has no ignore colour).
    loaded_pretrained_weights (`dict`, *optional*):
        Written by the model: `{"seggpt": source}` once `load_pretrained_extractors()` / `from_seggpt` loaded SegGPT's
        weights, `{}` for random weights; see `FewShotSegmentationConfig`.

    Example:
    ```python
    >>> from hf_fss import SegGptFssConfig, SegGptFssModel
    >>> from transformers import SegGptConfig
    >>> tiny = SegGptConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=[64, 32],
    ...                     patch_size=8, pretrain_image_size=16, decoder_hidden_size=8, merge_index=0,
    ...                     intermediate_hidden_state_indices=[1, 3])
    >>> model = SegGptFssModel(SegGptFssConfig(seggpt_config=tiny))
    >>> model.config.image_size
    32
    ```
    """

    model_type = "seggpt_fss"
    sub_configs = _SubConfigs()
    # The shapes `scripts/benchmark.py` times (random weights): "base" is SegGptConfig()'s default, the architecture
    # of BAAI/seggpt-vit-large (ViT-L, 24 layers, 448 x 448 inputs); "tiny" the tests' 4-layer model on 32 x 32.
    benchmark_sizes = {
        "base": {},
        "tiny": {
            "seggpt_config": {
                "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "image_size": [64, 32],
                "patch_size": 8, "pretrain_image_size": 16, "decoder_hidden_size": 8, "merge_index": 1,
                "intermediate_hidden_state_indices": [1, 3], "drop_path_rate": 0.0,
            }
        },
    }  # fmt: skip

    seggpt_config: dict | PreTrainedConfig | None = None  # a SegGptConfig (checked in __post_init__)
    seggpt_name_or_path: str | None = None
    feature_ensemble: bool = True
    embedding_type: Literal["instance", "semantic"] = "instance"
    image_size: int | None = None
    ignore_index: int = 255
    loaded_pretrained_weights: dict | None = None

    def __post_init__(self, **kwargs):
        check_unknown_config_fields(type(self), kwargs)
        check_dtype_name(self.dtype)
        SegGptConfig = _seggpt_config_class()
        if isinstance(self.seggpt_config, dict):
            if self.seggpt_config.get("model_type", SegGptConfig.model_type) != SegGptConfig.model_type:
                raise ValueError(
                    f"seggpt_config holds model_type {self.seggpt_config['model_type']!r}, not SegGPT's "
                    f"{SegGptConfig.model_type!r}; give SegGPT's config fields"
                )
            self.seggpt_config = SegGptConfig(**{k: v for k, v in self.seggpt_config.items() if k != "model_type"})
        elif self.seggpt_config is None:
            # Resolved once: the saved config.json then holds the architecture and never reads the Hub again.
            self.seggpt_config = (
                seggpt_config_from(self.seggpt_name_or_path) if self.seggpt_name_or_path else SegGptConfig()
            )
        elif not isinstance(self.seggpt_config, SegGptConfig):
            raise ValueError(
                f"seggpt_config must be a SegGptConfig or a dict of its fields, got a {type(self.seggpt_config).__name__}"
            )
        if self.image_size is None:
            self.image_size = self.seggpt_input_size[1]
        super().__post_init__(**kwargs)

    @property
    def seggpt_input_size(self) -> tuple[int, int]:
        """`(height, width)` of one image in SegGPT: its `image_size` stacks prompt and query vertically."""
        size = self.seggpt_config.image_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return height // 2, width

    def validate_geometry(self):
        """Part of `@strict` validation: SegGPT's two stacked images are squares of `image_size`."""
        height, width = self.seggpt_input_size
        if height != width:
            raise ValueError(
                f"seggpt_config.image_size {self.seggpt_config.image_size} must stack two squares (height = 2 x "
                "width), as SegGPT's image processor makes square images"
            )
        if self.image_size != width:
            raise ValueError(
                f"image_size {self.image_size} differs from SegGPT's input width {width} (seggpt_config.image_size); "
                "leave image_size out, it follows seggpt_config"
            )
