"""
A bounded LRU cache of frozen extractors' stage features per image, for evaluation over many episodes.

Under every protocol the same images recur across episodes (PANet's 5 x 1000 episodes come from a few hundred images
per fold), and a frozen extractor's features of an image at the test geometry do not depend on the episode. With a
`FeatureCache` attached to a model, `StagedBackbone.forward_stages(x, 0, end)` looks every image of `x` up by a key
the caller registered for it (`cache.images(...)`: the image's identity and geometry, e.g. the split fingerprint,
the image id and the processor settings) and runs the extractor only on the images it has not seen, so a fold costs
about one extractor pass per distinct image plus the decoders.

Correctness rules (why the cached run is bit-identical to the uncached one):
- only calls from the input image (`start == 0`) are cached; a call on masked features (PFENet's `layer4` on
  `layer3 * mask`) depends on the episode and always runs;
- only an extractor that is attached (`cache.attach(model)`, which goes through `model.feature_extractors()`, so
  every extractor of the model, QGNet's prior extractor included) and still the same object is served: a copy
  (test-time adaptation deep-copies the model) is not, and neither is one in training mode or building a graph;
- an image is served only through a registered tensor row whose address, shape, strides, dtype and device match;
  a tensor the model made itself (a resized or re-normalised copy) has another address and is computed as usual;
- entries remember the weights' and their own version counters: an extractor whose weights changed, or a cached
  feature that the model modified in place, is recomputed instead of being served;
- features are computed image by image exactly as at batch size 1 (the evaluation default); with several episodes
  per batch the misses run as one smaller batch, which on some kernels differs from the full batch in the last bits.

Besides stage features the same budget and LRU order hold other episode-independent work under their own key
namespaces (`get` / `put`): `hf_fss.evaluation.loop` stores one support encoding per (support image, class mask,
annotation), and a model's support-free query work (`query_encoding`: NTRENet's reduced features and background
logits, QGNet's prior region map) one per query image, each entry tagged with the model's state (`model_state()`:
the version counters of every parameter and buffer) so that an entry of other weights is never served.

Look-ups are cheap: `attach` lists each extractor's parameters and modules once, so a call compares version counters
over a flat list instead of walking the module tree.

Entries stay on the device where they were computed (GPU memory when there is one); the least recently used are
evicted beyond `max_bytes`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["FeatureCache", "autocast_state"]


def autocast_state(device: torch.device) -> tuple:
    """Part of every cache key: `()` without autocast on `device`, else `(device type, autocast dtype)`, so that
    values computed under bfloat16 autocast never serve a float32 run."""
    if not torch.is_autocast_enabled(device.type):
        return ()
    return (device.type, str(torch.get_autocast_dtype(device.type)))


def _row_signature(row: torch.Tensor) -> tuple:
    return (row.data_ptr(), tuple(row.shape), tuple(row.stride()), row.dtype, row.device)


class FeatureCache:
    """
    LRU cache of `StagedBackbone` stage outputs per (extractor name, image key).

    Args:
        max_bytes (`int`): bound on the bytes of the cached feature tensors; 0 disables caching.

    Attributes:
        hits / misses (`int`): images served from the cache / computed, over the cache's life.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.hits = 0
        self.misses = 0
        self.bytes = 0
        self._entries: OrderedDict[tuple, dict] = OrderedDict()
        self._rows: dict[tuple, Hashable] = {}
        self._registered: list[torch.Tensor] = []  # keeps registered tensors alive, so no address is reused
        self._owners: dict[str, weakref.ref] = {}
        self._model: weakref.ref | None = None
        # Flat lists made once per `attach`, so that no look-up walks the module tree.
        self._parameters: dict[str, list[torch.Tensor]] = {}
        self._modules: dict[str, list[nn.Module]] = {}
        self._state_tensors: list[torch.Tensor] = []
        self._detached_state: tuple | None = None
        self.support_hits = 0
        self.support_misses = 0
        self.query_hits = 0
        self.query_misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    # --- scope ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def attach(self, model: nn.Module) -> Iterator[FeatureCache]:
        """
        Serve every extractor of `model.feature_extractors()` from this cache inside the `with` block. Entries are
        keyed by extractor name: attaching another model than the last one, or the same model whose weights changed
        since the last block (a training step between two validations), first drops every entry.
        """
        self._state_tensors = [*model.parameters(), *model.buffers()]
        if self._model is None or self._model() is not model or self._detached_state != self._weights_identity():
            self.clear()
            self._model = weakref.ref(model)
        extractors = model.feature_extractors()
        previous = {name: getattr(extractor, "feature_cache", None) for name, extractor in extractors.items()}
        for name, extractor in extractors.items():
            extractor.feature_cache = self
            extractor.feature_cache_name = name
            self._owners[name] = weakref.ref(extractor)
            self._parameters[name] = list(extractor.parameters())
            self._modules[name] = list(extractor.modules())
        try:
            yield self
        finally:
            self._detached_state = self._weights_identity()
            for name, extractor in extractors.items():
                extractor.feature_cache = previous[name]
                self._owners.pop(name, None)
                self._parameters.pop(name, None)
                self._modules.pop(name, None)
            self._state_tensors = []

    def model_state(self) -> tuple:
        """
        The attached model's weights state within this `attach` block: the version counter of every parameter and
        buffer (an optimizer step, `load_state_dict` or any in-place edit changes it). Empty when none is attached.
        """
        return tuple(t._version for t in self._state_tensors)

    def _weights_identity(self) -> tuple:
        # Across blocks a parameter may also have been replaced by another tensor: its address is compared too.
        return tuple(t.data_ptr() for t in self._state_tensors), self.model_state()

    @contextlib.contextmanager
    def images(self, tensors_and_keys: Iterable[tuple[torch.Tensor, Sequence[Hashable]]]) -> Iterator[None]:
        """
        Register image keys for the rows of input tensors for the `with` block (one model call).

        Args:
            tensors_and_keys: pairs `(tensor, keys)`: a `(..., 3, height, width)` tensor (e.g. `pixel_values`
                `(B, 3, S, S)` or `support_pixel_values` `(B, K, 3, S, S)`) and one hashable key per image in
                row-major order (`B` or `B * K` keys). Keys must name the image and its geometry: equal keys must
                mean equal pixels.
        """
        for tensor, keys in tensors_and_keys:
            rows = tensor.reshape(-1, *tensor.shape[-3:]) if tensor.dim() > 4 else tensor
            if rows.data_ptr() != tensor.data_ptr():
                continue  # not a view (non-contiguous input): the model's rows cannot be recognised
            keys = list(keys)
            if len(keys) != rows.shape[0]:
                raise ValueError(f"{len(keys)} keys for {rows.shape[0]} images of a {tuple(tensor.shape)} tensor")
            self._registered.append(tensor)
            for row, key in zip(rows, keys):
                self._rows[_row_signature(row)] = key
        try:
            yield
        finally:
            self._rows.clear()
            self._registered.clear()

    # --- what StagedBackbone calls ----------------------------------------------------------------------------
    def serves(self, extractor: nn.Module) -> bool:
        """Whether `extractor` (the attached object itself, not a copy) may be served now."""
        name = getattr(extractor, "feature_cache_name", None)
        owner = self._owners.get(name)
        if self.max_bytes == 0 or owner is None or owner() is not extractor:
            return False
        if torch.is_grad_enabled() and not getattr(extractor, "frozen", False):
            return False
        return not any(module.training for module in self._modules[name])

    def keys_of(self, x: torch.Tensor) -> list[Hashable] | None:
        """The registered key of every row of `x`, or None when any row is not a registered image."""
        if x.dim() != 4 or not self._rows:
            return None
        keys = [self._rows.get(_row_signature(row)) for row in x]
        return None if any(key is None for key in keys) else keys

    def forward(self, extractor: nn.Module, x: torch.Tensor, end: int, keys: list[Hashable], run) -> list:
        """
        Stages `0 .. end - 1` of the images `x` (with registered `keys`): cached rows are served, the others run
        through `run(x_subset, start, end)` (the extractor's uncached `forward_stages`) and are stored.
        """
        name = extractor.feature_cache_name
        weights = tuple(p._version for p in self._parameters[name])
        rows: list[list[torch.Tensor] | None] = []
        for key in keys:
            entry = self._entries.get((name, key))
            if entry is not None and (
                entry["weights"] != weights or any(t._version != v for t, v in zip(entry["stages"], entry["versions"]))
            ):
                self._drop((name, key))  # stale: the weights changed, or a feature was modified in place
                entry = None
            rows.append(None if entry is None else self._extend(entry, (name, key), end, run))
        missing = [i for i, row in enumerate(rows) if row is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            computed = run(x[missing] if len(missing) < len(keys) else x, 0, end)
            for j, i in enumerate(missing):
                stages = [s[j : j + 1] if len(keys) == 1 else s[j : j + 1].clone() for s in computed]
                rows[i] = stages
                self._store((name, keys[i]), stages, weights)
        if len(keys) == 1:
            return list(rows[0][:end])
        return [torch.cat([row[index] for row in rows]) for index in range(end)]

    # --- other episode-independent work ------------------------------------------------------------------------
    def get(self, key: tuple, state: tuple) -> Any | None:
        """
        The value stored under `key` (a tuple whose first item names its kind, e.g. `("support", ...)`) for the
        model state `state`, or None: missing, stored for another state, or one of its tensors modified in place
        since (then the entry is dropped).
        """
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry["weights"] != state or any(t._version != v for t, v in zip(entry["stages"], entry["versions"])):
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry["value"]

    def put(self, key: tuple, value: Any, tensors: Sequence[torch.Tensor], state: tuple) -> None:
        """Store `value` under `key` for the model state `state`; `tensors` are what it holds (counted in bytes)."""
        self._store(key, list(tensors), state)
        self._entries[key]["value"] = value

    def query_encoding(self, model: nn.Module, pixel_values: torch.Tensor, encode) -> dict[str, torch.Tensor] | None:
        """
        `encode(pixel_values)` (a method's support-free query work, `FewShotSegmentationPreTrainedModel.
        _encode_query`) served per query image: rows computed at batch 1 as in the uncached evaluation and joined
        along the batch. None when this call may not be served: `model` is not the attached model (a copy), in
        training mode or building a graph, or a row of `pixel_values` is no registered image.
        """
        model_ref = self._model() if self._model is not None else None
        if self.max_bytes == 0 or model_ref is not model or model.training or torch.is_grad_enabled():
            return None
        keys = self.keys_of(pixel_values)
        if keys is None:
            return None
        state = self.model_state()
        context = (type(model).__name__, autocast_state(pixel_values.device))
        rows = []
        for i, key in enumerate(keys):
            entry_key = ("query", key, *context)
            value = self.get(entry_key, state)
            if value is None:
                self.query_misses += 1
                value = encode(pixel_values[i : i + 1])
                self.put(entry_key, value, list(value.values()), state)
            else:
                self.query_hits += 1
            rows.append(value)
        if len(rows) == 1:
            return dict(rows[0])
        return {name: torch.cat([row[name] for row in rows]) for name in rows[0]}

    # --- storage ----------------------------------------------------------------------------------------------
    def _extend(self, entry: dict, key: tuple, end: int, run) -> list[torch.Tensor]:
        """An entry's stages up to `end`, running (and storing) the stages it lacks from its last one."""
        self._entries.move_to_end(key)
        stages = entry["stages"]
        if len(stages) < end:
            more = run(stages[-1], len(stages), end)
            self.bytes += sum(t.numel() * t.element_size() for t in more)
            stages.extend(more)
            entry["versions"].extend(t._version for t in more)
            self._evict()
        return stages

    def _store(self, key: tuple, stages: list[torch.Tensor], weights: tuple) -> None:
        if key in self._entries:  # the same image twice in one batch
            self._drop(key)
        self._entries[key] = {"stages": stages, "versions": [t._version for t in stages], "weights": weights}
        self.bytes += sum(t.numel() * t.element_size() for t in stages)
        self._evict()

    def _drop(self, key: tuple) -> None:
        entry = self._entries.pop(key)
        self.bytes -= sum(t.numel() * t.element_size() for t in entry["stages"])

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self._entries:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        self._entries.clear()
        self.bytes = 0

    def stats(self) -> dict[str, int | float]:
        """hits, misses (extractor features per image), support_hits / support_misses (support encodings per
        shot), query_hits / query_misses (query encodings per image), entries, bytes and hit rate (of the
        features), for logs and results."""
        total = self.hits + self.misses
        return {
            "hits": self.hits,
            "misses": self.misses,
            "support_hits": self.support_hits,
            "support_misses": self.support_misses,
            "query_hits": self.query_hits,
            "query_misses": self.query_misses,
            "entries": len(self._entries),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "hit_rate": self.hits / total if total else 0.0,
        }
