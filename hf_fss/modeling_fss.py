"""The API every hf_fss method shares: outputs, support encodings and the base model class (checks: input_checks)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .backbones import StagedBackbone, build_backbone
from .configuration_fss import FewShotSegmentationConfig
from .image_processing_fss import FewShotSegmentationImageProcessor
from .input_checks import check_query_inputs, check_support_inputs
from .loading import key_list, quiet_load_report, size_mismatch_message, weights_file

# Arguments of `forward` every method takes; anything else must be declared by the model.
_STANDARD_INPUTS = ("pixel_values", "support_pixel_values", "support_masks", "labels", "support_encoding")

# Bumped whenever any module anywhere gains or replaces a submodule (attribute assignment, `add_module`,
# `register_module`: torch's global registration hook), so values derived from a module tree (`min_input_size`)
# are computed once and recomputed only after such a change, without walking the tree on every call.
_MODULE_TREE_GENERATION = [0]


def _module_registered(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    _MODULE_TREE_GENERATION[0] += 1


torch.nn.modules.module.register_module_module_registration_hook(_module_registered)


@dataclass
class FewShotSegmentationOutput(ModelOutput):
    """
    Output of every hf_fss model.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Total training loss, set when `labels` are given.
        logits (`torch.FloatTensor` of shape `(batch_size, 2, height, width)`):
            Background / target scores for each query at the input resolution.
        losses (`dict[str, torch.FloatTensor]`, *optional*):
            Named loss terms (`main`, `aux`, ...) for logging; their weighted sum is `loss`.
        support_logits (`torch.FloatTensor` of shape `(batch_size, shot, 2, height, width)`, *optional*):
            Scores for the support images, for methods that also segment the supports.
        maps (`dict[str, torch.FloatTensor]`, *optional*):
            Intermediate maps worth looking at (`prior`, `background`, `distractor`, ...), each
            `(batch_size, 1, h, w)` at the resolution the method computes them.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    losses: dict[str, torch.Tensor] | None = None
    support_logits: torch.FloatTensor | None = None
    maps: dict[str, torch.Tensor] | None = None


@dataclass
class SupportEncoding(ModelOutput):
    """
    What a method keeps of a support set so that it can segment many queries without re-encoding it.

    Methods subclass it with their own fields; every tensor field has the batch dimension first, so an encoding
    of one support set (batch 1) serves a batch of queries by broadcasting.

    Args:
        shot (`int`): number of support images K per query.
    """

    shot: int | None = None
    # Joining K single-shot encodings (evaluation's support cache) concatenates shots, but averages / keeps these.
    shot_mean_fields = ()
    shot_shared_fields = ()

    @property
    def batch_size(self) -> int:
        for value in self.values():
            if isinstance(value, torch.Tensor):
                return value.shape[0]
        raise ValueError("support encoding holds no tensor")

    def _map_tensors(self, function) -> SupportEncoding:
        """A copy with `function` applied to every tensor field and to each tensor of a tuple / list field."""
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = function(value)
            elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
                value = type(value)(function(v) for v in value)
            values[f.name] = value
        return type(self)(**values)

    def expand_batch(self, batch_size: int) -> SupportEncoding:
        """Repeat an encoding of one support set for `batch_size` queries (views, no copy)."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(
                f"support_encoding was computed for a batch of {self.batch_size} support sets but pixel_values "
                f"holds {batch_size} queries; encode one support set (batch 1) or one per query"
            )
        return self._map_tensors(lambda value: value.expand(batch_size, *value.shape[1:]))

    def select(self, index: int | slice) -> SupportEncoding:
        """
        The encoding of some of the support sets (views): `index` an int (one support set, batch dimension kept) or a
        slice of the batch dimension.
        """
        selected = slice(index, index + 1) if isinstance(index, int) else index
        return self._map_tensors(lambda value: value[selected])


class FewShotSegmentationPreTrainedModel(PreTrainedModel):
    """
    Base class of the hf_fss models.

    A method implements `_encode_support` (support images and masks, plus the support-side inputs it declares, to a
    `SupportEncoding`) and `_segment` (queries, an encoding and the query-side inputs it declares to a
    `FewShotSegmentationOutput`); this class checks inputs, routes the declared extra inputs, and splits the two so
    that one support set can serve many queries.

    Class attributes a method sets:
        query_inputs (`tuple[str, ...]`): extra keyword inputs of `forward` passed to `_segment` (e.g.
            `("class_ids",)`, `("semantic_labels",)`).
        support_inputs (`tuple[str, ...]`): extra keyword inputs passed to `_encode_support` (e.g.
            `("support_semantic_labels",)`); `encode_support` takes them too. The episodic training dataset emits
            the inputs a model declares.
        output_maps (`dict[str, str]`): name -> one-line meaning of every map `outputs.maps` may hold (each
            `(batch_size, 1, h, w)`); the Space captions the maps with it.
        binary_maps (`tuple[str, ...]`): the maps of `output_maps` that are 0/1 masks rather than values in [0, 1].
        support_encoding_class (`type[SupportEncoding]`): the encoding `_encode_support` returns; `forward` refuses
            any other (an encoding of another model).
        single_pass_overrides (`dict[str, object]`): for a method whose test time runs several passes (SMCP's
            pseudo-prototype fusion), the config values that make it one pass; `scripts/benchmark.py` times both.
        fss_image_processor_class (`type`): its processor when its folder has none (`load_image_processor`, Auto).
        supports_training (`bool`): False for an adapter hf_fss cannot train (SegGPT); `scripts/train.py` refuses it.
        support_shots_separable (`bool`): in eval mode, a K-shot encoding is its K single-shot ones joined (cacheable).

    Feature extractors (`StagedBackbone` children such as `backbone`) own their frozen / batch-norm policy and their
    initialisation; `load_pretrained_extractors()` loads their pretrained weights when a training run starts from a
    config (never `from_pretrained`, whose checkpoint holds them). A model may adapt to its support set inside
    `_encode_support` (with `torch.enable_grad()`, on a copy of its weights held in the encoding): evaluation and the
    pipeline run under `torch.no_grad()`, not `torch.inference_mode()`, to allow it.
    """

    config_class = FewShotSegmentationConfig
    base_model_prefix = "fss"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = False
    _no_split_modules = []
    query_inputs: tuple[str, ...] = ()
    support_inputs: tuple[str, ...] = ()
    output_maps: dict[str, str] = {}
    binary_maps: tuple[str, ...] = ()
    single_pass_overrides: dict[str, object] = {}
    support_shots_separable: bool = False
    support_encoding_class: type[SupportEncoding] = SupportEncoding
    fss_image_processor_class: type = FewShotSegmentationImageProcessor
    supports_training: bool = True

    # --- construction -------------------------------------------------------------------------------------
    def build_backbone(self) -> StagedBackbone:
        """The configured backbone (or `backbone_config`), frozen if `config.freeze_backbone`, BN eval if configured."""
        config = self.config
        backbone = build_backbone(config.backbone, config.backbone_config, **(config.backbone_kwargs or {}))
        backbone.chunk_on_cpu = config.chunk_extractors_on_cpu
        if config.freeze_backbone:
            return backbone.freeze(batchnorm_eval=config.freeze_backbone_batchnorm)
        backbone.batchnorm_eval = config.freeze_backbone_batchnorm
        return backbone

    def feature_extractors(self) -> dict[str, StagedBackbone]:
        """Every feature extractor of the model by its module name (`{"backbone": ...}`, QGNet adds more)."""
        return {name: module for name, module in self.named_modules() if isinstance(module, StagedBackbone)}

    def post_init(self):
        # Extractors keep their own documented initialisation: mark them so `_init_weights` never redraws them.
        for extractor in self.feature_extractors().values():
            for module in extractor.modules():
                module._is_hf_initialized = True
        # A model just built holds random extractors whatever its config asks for: the record starts empty, and
        # `from_pretrained` restores the saved one (the saved weights are those).
        self._saved_weights_record = self.config.loaded_pretrained_weights
        self.config.loaded_pretrained_weights = {}
        super().post_init()

    def _record_loaded_weights(self, sources: dict[str, str]) -> None:
        """Note in `config.loaded_pretrained_weights` (saved with the model, read by its card) what was loaded."""
        self.config.loaded_pretrained_weights = {**(self.config.loaded_pretrained_weights or {}), **sources}

    def min_input_size(self) -> tuple[int, int]:
        """
        The smallest `(height, width)` of an image this model takes, from its feature extractors' convolutions and
        pooling (`StagedBackbone.min_input_size`): `(8, 8)` for SMCP's dilated VGG-16, `(1, 1)` for the ResNets and
        VGG16BN. The methods' own layers keep any feature map of at least one pixel (padded convolutions, adaptive
        pools whose PFENet bins are at least 1). `forward` / `encode_support` refuse smaller images. Computed once
        and kept until a submodule is added or replaced anywhere (so swapping `model.backbone` is seen).
        """
        generation, cached = getattr(self, "_min_input_size_cache", (None, None))
        if generation == _MODULE_TREE_GENERATION[0]:  # forward / encode_support ask on every call: no tree walk
            return cached
        sizes = [extractor.min_input_size() for extractor in self.feature_extractors().values()] or [(1, 1)]
        size = max(h for h, _ in sizes), max(w for _, w in sizes)
        self._min_input_size_cache = (_MODULE_TREE_GENERATION[0], size)
        return size

    def pretrained_weight_sources(self) -> dict[str, str]:
        """Extractor name -> weights to start training from (Hub id, folder or safetensors file); empty if none."""
        return {"backbone": self.config.backbone_weights} if self.config.use_pretrained_backbone else {}

    def load_pretrained_extractors(self) -> dict[str, str]:
        """
        Load every extractor's pretrained weights (`pretrained_weight_sources()`), as a training run or a converter
        does once after building the model from its config. Returns what was loaded from where.

        Raises:
            `ValueError` / `FileNotFoundError`: see `hf_fss.backbones.load_backbone_weights` (a missing key is named).
        """
        sources = self.pretrained_weight_sources()
        for name, source in sources.items():
            self.get_submodule(name).load_weights(source)
            self._record_loaded_weights({name: source})
        return sources

    def load_pretrained_backbone(self, name_or_path: str | None = None) -> None:
        """Load ImageNet weights into `self.backbone` from a Hub repo id, a folder or a safetensors file."""
        self.backbone.load_weights(name_or_path or self.config.backbone_weights)
        self._record_loaded_weights({"backbone": str(name_or_path or self.config.backbone_weights)})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """
        `PreTrainedModel.from_pretrained`, strict: weights come from safetensors only (a pickled `pytorch_model.bin`
        is refused, never unpickled), and a checkpoint that lacks weights of the model or holds weights it does not
        have is refused instead of loading with re-initialised layers.

        Raises:
            `OSError`: the weights file is empty, truncated or not safetensors (the file is named), or a local folder
                has no config.json.
            `ValueError`: missing or unexpected weights (their names are listed), or weights whose shapes do not fit
                the configuration (the config field responsible when it can be told, e.g. `reduce_dim`, else the
                first key with both shapes), unless `ignore_mismatched_sizes=True` asks to re-initialise them.
        """
        kwargs.setdefault("use_safetensors", True)
        output_loading_info = kwargs.pop("output_loading_info", False)
        folder = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder", ""))
        if (
            kwargs.get("config") is None
            and os.path.isdir(folder)
            and not os.path.isfile(os.path.join(folder, "config.json"))
        ):
            # Without it transformers would build the default configuration and fail on the shapes.
            raise OSError(f"{folder} has no config.json beside its weights; copy the config.json saved with the model")
        # Mismatched shapes are collected here and refused below with the config field responsible.
        reinitialise_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
        try:
            # transformers' multi-line load report lists what is refused below in one line: kept only when the
            # caller asked to re-initialise mismatched weights, where it is the record of what was re-initialised.
            with quiet_load_report(not reinitialise_mismatched):
                model, info = super().from_pretrained(
                    pretrained_model_name_or_path,
                    *args,
                    output_loading_info=True,
                    ignore_mismatched_sizes=True,
                    **kwargs,
                )
        except SafetensorError as error:
            weights = weights_file(pretrained_model_name_or_path, kwargs.get("subfolder", ""))
            raise OSError(
                f"{weights} is not a complete safetensors file ({error}); save or download the model again"
            ) from None
        if info["mismatched_keys"] and not reinitialise_mismatched:
            weights = weights_file(pretrained_model_name_or_path, kwargs.get("subfolder", ""))
            raise ValueError(f"{weights} {size_mismatch_message(model.config, info['mismatched_keys'])}")
        missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
        if missing or unexpected:
            weights = weights_file(pretrained_model_name_or_path, kwargs.get("subfolder", ""))
            problems = [f"lacks {len(missing)} weight(s) of {cls.__name__}: {key_list(missing)}"] if missing else []
            if unexpected:
                problems.append(f"holds {len(unexpected)} weight(s) it does not have: {key_list(unexpected)}")
            raise ValueError(
                f"{weights} {' and '.join(problems)}; the file is incomplete or belongs to another configuration "
                "(compare its config.json with the one it was saved with)"
            )
        for extractor in model.feature_extractors().values():
            extractor.restore_computed_buffers()
        # The saved record of loaded weights; a folder saved before the record existed was written by the trainer or
        # a converter, which loaded what the config asks for.
        saved = model._saved_weights_record
        model.config.loaded_pretrained_weights = saved if saved is not None else model.pretrained_weight_sources()
        return (model, info) if output_loading_info else model

    def _init_weights(self, module):
        # torch's own defaults, which the reference implementations train from, for every non-extractor layer.
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm)):
            if module.weight is not None:
                init.ones_(module.weight)
                init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)

    # --- training behaviour --------------------------------------------------------------------------------
    def training_state_objects(self) -> dict[str, object]:
        """
        Training state that is not weights (e.g. NTRENet's contrastive bank), by name, each with `state_dict()` /
        `load_state_dict()`; the trainer checkpoints and restores them. Empty by default.
        """
        return {}

    def convert_sync_batchnorm(self, process_group=None):
        """Replace the batch norms that train (not those of a frozen extractor) by `SyncBatchNorm` for multi-GPU runs."""

        def convert(parent: nn.Module) -> None:
            for name, child in parent.named_children():
                if isinstance(child, StagedBackbone) and child.frozen and child.batchnorm_eval:
                    continue
                if isinstance(child, nn.modules.batchnorm._BatchNorm):
                    setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child, process_group))
                else:
                    convert(child)

        convert(self)
        return self

    def backbone_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The five stage features of the backbone (without autograd when it is frozen)."""
        return self.backbone(pixel_values)

    def query_encoding(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """A method's `_encode_query(pixel_values)` (its work on the queries alone: a dict of `(batch_size, ...)`
        tensors; NTRENet, QGNet), served per query image by an attached evaluation cache where that is exact
        (`FeatureCache.query_encoding`: eval mode, no autograd, registered images)."""
        cache = getattr(self.backbone, "feature_cache", None)
        served = None if cache is None else cache.query_encoding(self, pixel_values, self._encode_query)
        return self._encode_query(pixel_values) if served is None else served

    # --- the few-shot API ----------------------------------------------------------------------------------
    def _route_inputs(self, kwargs: dict, encoding_given: bool) -> tuple[dict, dict]:
        """Split extra keyword inputs into the declared query-side and support-side ones; refuse anything else."""
        unknown = sorted(set(kwargs) - set(self.query_inputs) - set(self.support_inputs))
        if unknown:
            declared = list(self.query_inputs + self.support_inputs) or "none"
            raise ValueError(
                f"{type(self).__name__} got unexpected input(s) {unknown}; besides {list(_STANDARD_INPUTS)} it "
                f"accepts: {declared}"
            )
        query = {k: v for k, v in kwargs.items() if k in self.query_inputs}
        support = {k: v for k, v in kwargs.items() if k in self.support_inputs and k not in query}
        if encoding_given and support:
            raise ValueError(
                f"{sorted(support)} belong to the support set: pass them to model.encode_support(...), not together "
                "with support_encoding"
            )
        return query, support

    def encode_support(
        self, support_pixel_values: torch.Tensor, support_masks: torch.Tensor, **support_inputs
    ) -> SupportEncoding:
        """
        Encode a support set once to segment many queries with `model(pixel_values, support_encoding=...)`.

        Args:
            support_pixel_values (`torch.FloatTensor` of shape `(batch_size, shot, 3, height, width)`): normalised
                support images of any float dtype (cast to the model's), on the model's device.
            support_masks (`torch.LongTensor` of shape `(batch_size, shot, height, width)`):
                1 = target class, 0 = background, 255 = ignore; any integer, bool or whole-valued float dtype (cast
                to int64).
            support_inputs: the support-side inputs the model declares (`support_inputs`).

        Raises:
            `ValueError`: malformed supports, or an input the model does not declare for the support side.
        """
        query, support = self._route_inputs(support_inputs, encoding_given=False)
        if query:
            raise ValueError(f"{sorted(query)} are query-side inputs: pass them to model(...), not encode_support")
        check_support_inputs(
            support_pixel_values,
            support_masks,
            require_target=not self.training,
            device=self.device,
            min_size=self.min_input_size(),
        )
        support_pixel_values, support_masks = self._cast_inputs(support_pixel_values, support_masks)
        return self._encode_support(support_pixel_values, support_masks, **support)

    def _cast_inputs(self, pixels: torch.Tensor, masks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked inputs in the dtypes the methods compute with: pixels in the model's float dtype, masks int64."""
        return pixels.to(self.dtype), None if masks is None else masks.long()

    def forward(
        self,
        pixel_values: torch.Tensor,
        support_pixel_values: torch.Tensor | None = None,
        support_masks: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        support_encoding: SupportEncoding | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> FewShotSegmentationOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): normalised query images.
                Every tensor input must be on the model's device, and every image at least `min_input_size()`
                (height, width). Pixels of any float dtype (float64, float16,
                bfloat16) are cast to the model's dtype; integer pixels (raw uint8 images) are refused, as they are
                not normalised: the image processor prepares them.
            support_pixel_values (`torch.FloatTensor` of shape `(batch_size, shot, 3, height, width)`):
                normalised support images.
            support_masks (`torch.LongTensor` of shape `(batch_size, shot, height, width)`):
                1 = target class, 0 = background, 255 = ignore (padding); any integer, bool or whole-valued float
                dtype, cast to int64. Other values (e.g. -1 for ignore) are refused.
            labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
                query target masks in {0, 1, 255} (dtypes as `support_masks`); when given, `loss` is computed.
            support_encoding (`SupportEncoding`, *optional*):
                the result of `encode_support`, used instead of support images and masks.
            kwargs: the extra inputs the model declares in `query_inputs` / `support_inputs` (e.g. `class_ids`).

        Returns:
            `FewShotSegmentationOutput` (or a tuple if `return_dict=False`).

        Raises:
            `ValueError`: malformed inputs (naming the argument), a keyword input the model does not declare, or (in
                eval mode) logits that are not finite, naming the likely cause (see `_check_finite_logits`).
        """
        check_query_inputs(pixel_values, labels, device=self.device, min_size=self.min_input_size())
        query_inputs, support_inputs = self._route_inputs(kwargs, encoding_given=support_encoding is not None)
        batch_size = pixel_values.shape[0]
        pixel_values, labels = self._cast_inputs(pixel_values, labels)
        if support_encoding is None:
            check_support_inputs(
                support_pixel_values,
                support_masks,
                batch_size=batch_size,
                require_target=not self.training,
                device=self.device,
                min_size=self.min_input_size(),
            )
            support_pixel_values, support_masks = self._cast_inputs(support_pixel_values, support_masks)
            support_encoding = self._encode_support(support_pixel_values, support_masks, **support_inputs)
        else:
            if support_pixel_values is not None or support_masks is not None:
                raise ValueError("give either support_encoding or support_pixel_values/support_masks, not both")
            if not isinstance(support_encoding, SupportEncoding):
                raise ValueError(
                    f"support_encoding must come from model.encode_support(...), got {type(support_encoding).__name__}"
                )
            if not isinstance(support_encoding, self.support_encoding_class):
                expected = self.support_encoding_class.__name__
                article = "an" if expected[0] in "AEFHILMNORSX" else "a"  # as the letter's name is spoken
                raise ValueError(
                    f"support_encoding must be {article} {expected}, got {type(support_encoding).__name__}"
                )
            support_encoding = support_encoding.expand_batch(batch_size)
        outputs = self._segment(pixel_values, support_encoding, labels=labels, **query_inputs)
        self._logits_in_model_dtype(outputs)
        if not self.training:  # in training the loop's non-finite loss check names the step instead
            self._check_finite_logits(outputs.logits)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return outputs if return_dict else outputs.to_tuple()

    def _logits_in_model_dtype(self, outputs: FewShotSegmentationOutput) -> None:
        """Logits (and support logits) in the model's dtype: float32 for a float32 model run under a caller's
        bfloat16 / float16 `torch.autocast`, whose last convolution leaves them in the autocast dtype."""
        for name in ("logits", "support_logits"):
            value = getattr(outputs, name, None)
            if value is not None and value.is_floating_point() and value.dtype != self.dtype:
                setattr(outputs, name, value.to(self.dtype))

    def _check_finite_logits(self, logits: torch.Tensor | None) -> None:
        """
        Raise a `ValueError` when logits are not finite, naming the model and the likely cause: the inputs were
        checked finite, so either the weights are not finite or an intermediate overflowed (float16's range ends at
        65504).
        """
        if logits is None or bool(torch.isfinite(logits).all()):
            return
        dtype = str(self.dtype).removeprefix("torch.")
        broken = next(
            (n for n, t in self.state_dict().items() if t.is_floating_point() and not t.isfinite().all()), None
        )
        if broken is not None:
            cause = f"its weights are not finite ({broken}): the checkpoint is damaged or its training diverged"
        elif self.dtype in (torch.float16, torch.bfloat16):
            wider = "bfloat16 or float32" if self.dtype == torch.float16 else "float32"
            cause = f"an intermediate overflowed in {dtype} (reduced precision): run the model in {wider}"
        else:
            cause = f"an intermediate overflowed in {dtype}: check the input normalisation and the config"
        raise ValueError(f"{type(self).__name__} produced non-finite logits from finite inputs; {cause}")

    def _encode_support(self, support_pixel_values: torch.Tensor, support_masks: torch.Tensor) -> SupportEncoding:
        raise NotImplementedError(f"{type(self).__name__} must implement _encode_support")

    def _segment(self, pixel_values, support_encoding, labels=None) -> FewShotSegmentationOutput:
        r"""
        Segment checked queries with a support encoding; a method documents only what it adds (its declared
        `query_inputs`, its loss terms and maps).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): the query images.
            support_encoding (`SupportEncoding`): of the method's `support_encoding_class`, batch `batch_size`.
            labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*): {0, 1, 255}; when given,
                the output's `loss` and `losses` are set.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement _segment")
