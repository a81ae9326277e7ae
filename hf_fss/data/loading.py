"""
Resolve the `--dataset` argument every script takes: `synthetic`, a `save_to_disk` folder, or a Hub dataset id;
and name the benchmark a dataset is (`infer_benchmark`), so `--benchmark` can be left out for a folder written by
`scripts/prepare_dataset.py`.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import datasets

from ..utils import looks_local
from .folds import BENCHMARKS, normalize_benchmark_name

# looks_local: hf_fss.utils, re-exported
__all__ = [
    "check_hub_dataset",
    "infer_benchmark",
    "load_benchmark",
    "looks_local",
    "refuse_benchmark_name",
    "resolve_benchmark",
]

# How each builder's DatasetInfo.description starts (see hf_fss.data.builders and hf_fss.data.synthetic).
_DESCRIPTION_PREFIXES = {
    "hf_fss synthetic": "synthetic",
    "PASCAL-5i": "pascal5i",
    "COCO-20i": "coco20i",
    "FSS-1000": "fss1000",
    "Custom folder": "folder",  # hf_fss.data.builders.folder.DESCRIPTION_PREFIX
}


def _folder_not_found(dataset: str, path: Path) -> str:
    return (
        f"--dataset {dataset!r}: folder not found ({path.absolute()} does not exist); build it with "
        "scripts/prepare_dataset.py, or pass 'synthetic' or a Hub dataset id (org/name)"
    )


def refuse_benchmark_name(dataset: str) -> None:
    """
    ValueError when `dataset` names a benchmark to build (`pascal5i`, `COCO-20i`, `fss1000`, `folder`, any spelling
    `normalize_benchmark_name` accepts) rather than a dataset: called only when no such folder exists. The message
    says how to build it and what to pass then. `synthetic` itself is a dataset (built on the fly), not refused.
    """
    if dataset == "synthetic" or "/" in dataset or "\\" in dataset:
        return
    try:
        kind = normalize_benchmark_name(dataset)
    except ValueError:
        return
    raise ValueError(
        f"--dataset {dataset!r} is a benchmark name, not a dataset: build it with scripts/prepare_dataset.py {kind} "
        f"... --output-dir data/{kind}, then pass --dataset data/{kind}"
        + (" (or --dataset synthetic, built on the fly)" if kind == "synthetic" else "")
    )


HUB_TIMEOUT_S = 10.0  # one probe of a Hub dataset id, instead of datasets' retries (about a minute offline)


def _in_hub_cache(dataset: str) -> bool:
    """Whether `dataset` was downloaded before (then datasets may load it offline)."""
    import huggingface_hub

    hub = Path(huggingface_hub.constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}"
    return hub.is_dir() or (Path(datasets.config.HF_DATASETS_CACHE) / dataset.replace("/", "___")).is_dir()


@functools.lru_cache(maxsize=8)  # infer_benchmark and load_benchmark ask for the same id
def check_hub_dataset(dataset: str) -> None:
    """
    An `org/name` `--dataset` that is not a local folder must be a Hub dataset: one probe with a timeout, unless it is
    cached, so `data/pascal5i` missing in a folder without `data/` is not reported as minutes of Hub retries.

    Raises:
        `FileNotFoundError`: neither the folder nor a reachable Hub dataset; the message names both and the fix.
    """
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    if _in_hub_cache(dataset):
        return
    try:
        huggingface_hub.dataset_info(dataset, timeout=HUB_TIMEOUT_S)
        return
    except RepositoryNotFoundError:
        why = "no such Hub dataset (or a private one: set HF_TOKEN)"
    except Exception as err:  # noqa: BLE001 - offline, DNS, timeout: the Hub cannot tell
        why = f"the Hub cannot be reached: {type(err).__name__}"
    raise FileNotFoundError(
        f"--dataset {dataset!r}: neither a local folder ({Path(dataset).absolute()} does not exist) nor a Hub dataset "
        f"({why}); build the folder with scripts/prepare_dataset.py KIND --output-dir {dataset}, or pass 'synthetic'"
    )


def load_benchmark(dataset: str, *, synthetic_seed: int = 0, **synthetic_kwargs) -> datasets.DatasetDict:
    """
    The benchmark as a `DatasetDict`.

    Args:
        dataset: `"synthetic"` builds the embedded benchmark on the fly (seconds, no files); a folder written by
            `scripts/prepare_dataset.py` (any of its kinds, `synthetic` included) is read with
            `datasets.load_from_disk`; an `org/name` that is not a local path is a Hub dataset id for
            `datasets.load_dataset`. A path that looks local (see `looks_local`) and does not exist raises
            FileNotFoundError at once, without touching the network; an `org/name` that is neither a folder nor a
            cached or reachable Hub dataset raises it after one probe (`check_hub_dataset`).
        synthetic_seed, synthetic_kwargs: passed to `build_synthetic` for `"synthetic"`.
    """
    if dataset == "synthetic":
        from .synthetic import build_synthetic

        return build_synthetic(seed=synthetic_seed, **synthetic_kwargs)
    path = Path(dataset).expanduser()
    if path.exists():
        if not (path / "dataset_dict.json").is_file():
            raise ValueError(
                f"--dataset {dataset!r} is a path but not a DatasetDict written by save_to_disk "
                "(no dataset_dict.json); build one with scripts/prepare_dataset.py"
            )
        return datasets.load_from_disk(str(path))
    if looks_local(dataset):
        raise FileNotFoundError(_folder_not_found(dataset, path))
    refuse_benchmark_name(dataset)
    if dataset.count("/") != 1:
        raise ValueError(
            f"--dataset {dataset!r} is neither 'synthetic', an existing folder, nor a Hub dataset id (org/name)"
        )
    check_hub_dataset(dataset)
    return datasets.load_dataset(dataset)


def _saved_descriptions(path: Path) -> list[str]:
    """The DatasetInfo descriptions of a `save_to_disk` DatasetDict folder's splits (no data is read)."""
    try:
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    found = []
    for split in splits:
        try:
            found.append(json.loads((path / split / "dataset_info.json").read_text()).get("description") or "")
        except (OSError, ValueError, AttributeError):
            continue
    return found


def infer_benchmark(dataset: str | os.PathLike | datasets.DatasetDict) -> str | None:
    """
    Which of `BENCHMARKS` a `--dataset` is: `"synthetic"` for the name `synthetic`; for a folder written by
    `scripts/prepare_dataset.py` (or a loaded DatasetDict) the kind its builder recorded at the start of
    `DatasetInfo.description`. None when it cannot be told (a Hub id, a foreign folder): then `--benchmark`
    must be given, one of `BENCHMARKS`. A path that looks local and does not exist, or an `org/name` that is neither
    a folder nor a Hub dataset, is a FileNotFoundError, so a typo is not reported as a missing `--benchmark`; a
    benchmark's name that is no folder (`pascal5i`) is a ValueError saying how to build it (`refuse_benchmark_name`).
    """
    if isinstance(dataset, datasets.DatasetDict):
        descriptions = [split.info.description or "" for split in dataset.values()]
    elif str(dataset) == "synthetic":
        return "synthetic"
    else:
        path = Path(dataset).expanduser()
        if not path.exists() and looks_local(str(dataset)):
            raise FileNotFoundError(_folder_not_found(str(dataset), path))
        if not path.exists():
            refuse_benchmark_name(str(dataset))
        if not path.exists() and str(dataset).count("/") == 1:  # a Hub id, or a folder under a missing parent
            check_hub_dataset(str(dataset))
        descriptions = _saved_descriptions(path) if path.is_dir() else []
    kinds = {
        kind for text in descriptions for prefix, kind in _DESCRIPTION_PREFIXES.items() if text.startswith(prefix)
    }
    return kinds.pop() if len(kinds) == 1 else None


def benchmark_required_message(dataset: str) -> str:
    """The error for a `--dataset` whose benchmark cannot be inferred, listing every valid `--benchmark`."""
    return (
        f"--benchmark is required with --dataset {dataset!r} (its kind cannot be read from it); "
        f"one of {', '.join(BENCHMARKS)}"
    )


def resolve_benchmark(dataset: str | os.PathLike | datasets.DatasetDict, benchmark: str | None) -> str:
    """
    The benchmark a run on `dataset` uses: `benchmark` (any spelling `normalize_benchmark_name` accepts) checked
    against the one the dataset recorded when it was built (`infer_benchmark`), or that one when `benchmark` is
    None. A dataset that recorded none (a Hub id, an older or foreign folder) takes `benchmark` as given.

    Raises:
        ValueError: `benchmark` contradicts the recorded one (naming both), is unknown, or is None while nothing
            is recorded (`benchmark_required_message`); `dataset` is a benchmark's name, no folder
            (`refuse_benchmark_name`); one line each.
        FileNotFoundError: `benchmark` is None and `dataset` looks like a local path that does not exist.
    """
    name = dataset if isinstance(dataset, str) else "the dataset"
    if benchmark is None:
        recorded = infer_benchmark(dataset)
        if recorded is None:
            raise ValueError(benchmark_required_message(str(name)))
        return recorded
    given = normalize_benchmark_name(benchmark)
    try:
        recorded = infer_benchmark(dataset)
    except FileNotFoundError:
        return given  # nothing recorded to contradict; loading the dataset reports the missing folder
    if recorded is not None and given != recorded:
        # Training or scoring one benchmark under another's folds would label the results with the wrong classes.
        what = (
            "the embedded synthetic benchmark" if name == "synthetic" else f"{recorded} (recorded when it was built)"
        )
        raise ValueError(
            f"--benchmark {benchmark} contradicts --dataset {name!r}, which is {what}; give a {given} dataset "
            f"(scripts/prepare_dataset.py {given}) or pass --benchmark {recorded}"
        )
    return given
