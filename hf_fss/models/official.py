"""
Official implementations built from their own checkouts, next to the hf_fss model holding the same weights.

hf_fss never ships or imports official code by itself: `scripts/benchmark.py --official METHOD=DIR` times the
official module of a checkout the user built out of tree (with only the fixes it needs to run on their device)
against the hf_fss model converted from the same weights. A method supports this when its converter module
(`hf_fss.models.<method>.convert_<method>`) defines `build_official_model(source_dir, shot, image_size)` returning an
[`OfficialModel`], built with `build_official` (or `build_pfenet_official` for the PFENet lineage).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import MODEL_CLASSES
from .conversion import PFENET_PYRAMID_BINS, OfficialFormat, convert_state_dict

__all__ = ["OfficialModel", "build_official", "build_pfenet_official", "import_from_checkout", "official_builder"]


@dataclass
class OfficialModel:
    """
    An official model and the hf_fss model converted from its weights, both in eval mode.

    Args:
        module (`nn.Module`): the official model.
        forward (`Callable`): `(query (B, 3, H, W), support (B, K, 3, H, W), support_masks (B, K, H, W) in {0, 1})
            -> logits (B, 2, H, W)` through the official module's own forward signature.
        ours (`nn.Module`): the hf_fss model holding the same weights (through the method's converter).
        source (`str`): the checkout and class it was built from.
    """

    module: nn.Module
    forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    ours: nn.Module
    source: str


@contextlib.contextmanager
def _isolated_package(source_dir: Path, package: str) -> Iterator[None]:
    # Official repositories reuse top-level names (`model`, `util`): import from this checkout only, and leave no
    # entry behind that a second checkout would pick up.
    def purge():
        for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
            del sys.modules[name]

    purge()
    sys.path.insert(0, str(source_dir))
    try:
        yield
    finally:
        sys.path.remove(str(source_dir))
        purge()


def import_from_checkout(
    source_dir: str | Path, module: str, attribute: str, source_edits: Mapping[str, str] | None = None
) -> object:
    """
    `attribute` of `module` (e.g. `"model.ourmodel"`, `"NTRENet"`) imported from the checkout `source_dir` alone.

    Args:
        source_edits (`Mapping[str, str]`, *optional*): exact text replacements `{old: new}` made in memory in
            `module`'s source before it runs, for the fixes a checkout needs to run here (e.g. a `.cuda()` call);
            the checkout's file is left unchanged. Each `old` must occur exactly once.

    Raises:
        `FileNotFoundError`: `source_dir` is not a folder or lacks the module's file (both are named).
        `ValueError`: an `old` of `source_edits` does not occur exactly once in the module's file (both named).
    """
    source_dir = Path(source_dir).expanduser().resolve()
    relative = Path(*module.split("."))
    if not (source_dir / relative.with_suffix(".py")).is_file() and not (source_dir / relative).is_dir():
        raise FileNotFoundError(
            f"{source_dir} does not hold {relative.with_suffix('.py')}: give the root of the official checkout "
            "(built out of tree, with the fixes it needs to run here)"
        )
    with _isolated_package(source_dir, module.split(".")[0]):
        if source_edits:
            return getattr(_import_edited(source_dir / relative.with_suffix(".py"), module, source_edits), attribute)
        return getattr(importlib.import_module(module), attribute)


def _import_edited(file: Path, module: str, source_edits: Mapping[str, str]) -> object:
    source = file.read_text(encoding="utf-8")
    for old, new in source_edits.items():
        count = source.count(old)
        if count != 1:
            raise ValueError(
                f"{file} holds {old!r} {count} times, not once: it is not the official code this fix was written "
                "for (give an unmodified checkout of the official repository)"
            )
        source = source.replace(old, new)
    parent = module.rpartition(".")[0]
    if parent and (file.parent / "__init__.py").is_file():
        importlib.import_module(parent)  # a regular package's __init__ runs first, as in a plain import
    spec = importlib.util.spec_from_file_location(module, file)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded  # purged with the package when the import is done
    exec(compile(source, str(file), "exec"), loaded.__dict__)  # the checkout's own code, as a plain import runs it
    return loaded


def official_builder(model_type: str) -> Callable[..., OfficialModel]:
    """
    `build_official_model` of a method's converter module.

    Raises:
        `ValueError`: the method has no official-code builder (the methods that have one are named).
    """
    supported = []
    for name in sorted(MODEL_CLASSES):
        with contextlib.suppress(ImportError):
            if hasattr(importlib.import_module(f"hf_fss.models.{name}.convert_{name}"), "build_official_model"):
                supported.append(name)
    if model_type not in supported:
        raise ValueError(f"no official-code builder for {model_type!r}; methods with one: {supported}")
    return importlib.import_module(f"hf_fss.models.{model_type}.convert_{model_type}").build_official_model


def build_official(
    official_format: OfficialFormat,
    official_class: Callable[..., nn.Module],
    constructor_kwargs: Mapping,
    forward: Callable[..., torch.Tensor],
    source: str,
    shot: int,
    image_size: int,
    seed: int = 0,
) -> OfficialModel:
    """
    The official model `official_class(**constructor_kwargs)` with the seeded random weights of its own
    initialisation, and the hf_fss model converted from them (`convert_state_dict` with `image_size` and `shot`).

    Args:
        forward (`Callable`): `(official module, query, support, support_masks) -> logits`; see
            [`OfficialModel`].
        source (`str`): the checkout and class, for the record.
        seed (`int`): seed of the official model's own initialisation.
    """
    torch.manual_seed(seed)
    official = official_class(**constructor_kwargs).eval()
    ours, _ = convert_state_dict(official_format, official.state_dict(), image_size=image_size, shot=shot)
    return OfficialModel(official, functools.partial(forward, official), ours, source)


def build_pfenet_official(
    official_format: OfficialFormat,
    source_dir: str | Path,
    module: str,
    attribute: str,
    forward: Callable[..., torch.Tensor],
    shot: int = 1,
    image_size: int = 473,
    seed: int = 0,
) -> OfficialModel:
    """
    A PFENet-lineage official model (NTRENet, QGNet) of the official PASCAL config, `attribute(layers=50, classes=2,
    zoom_factor=8, pretrained=False, shot=shot, ppm_scales=[60, 30, 15, 8])` of `module` in the checkout
    `source_dir`, through `build_official`.

    Raises:
        `FileNotFoundError`: `source_dir` lacks the module's file.
        `ValueError`: an image size the official forward refuses (it asserts `(size - 1) % 8 == 0`, e.g. 473).
    """
    if (image_size - 1) % 8:
        raise ValueError(
            f"the official {official_format.method} needs (image_size - 1) % 8 == 0 (e.g. 473), got {image_size}"
        )
    official_class = import_from_checkout(source_dir, module, attribute)
    constructor_kwargs = {
        "layers": 50,
        "classes": 2,
        "zoom_factor": 8,
        "pretrained": False,
        "shot": shot,
        "ppm_scales": list(PFENET_PYRAMID_BINS),
    }
    source = f"{source_dir}: {module.replace('.', '/')}.py {attribute}"
    return build_official(official_format, official_class, constructor_kwargs, forward, source, shot, image_size, seed)
