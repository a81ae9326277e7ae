"""Resolve the `--dataset` argument every script takes: `synthetic`, a `save_to_disk` folder, or a Hub dataset id."""

from __future__ import annotations

from pathlib import Path

import datasets


def load_benchmark(dataset: str, *, synthetic_seed: int = 0, **synthetic_kwargs) -> datasets.DatasetDict:
    """
    The benchmark as a `DatasetDict`.

    Args:
        dataset: `"synthetic"` builds the embedded benchmark on the fly (seconds, no files); a folder written by
            `scripts/prepare_dataset.py` is read with `datasets.load_from_disk`; anything else is taken as a Hub
            dataset id for `datasets.load_dataset`.
        synthetic_seed, synthetic_kwargs: passed to `build_synthetic` for `"synthetic"`.
    """
    if dataset == "synthetic":
        from .synthetic import build_synthetic

        return build_synthetic(seed=synthetic_seed, **synthetic_kwargs)
    path = Path(dataset)
    if path.exists():
        if not (path / "dataset_dict.json").is_file():
            raise ValueError(
                f"--dataset {dataset!r} is a path but not a DatasetDict written by save_to_disk "
                "(no dataset_dict.json); build one with scripts/prepare_dataset.py"
            )
        return datasets.load_from_disk(str(path))
    if dataset.count("/") != 1:
        raise ValueError(
            f"--dataset {dataset!r} is neither 'synthetic', an existing folder, nor a Hub dataset id (org/name)"
        )
    return datasets.load_dataset(dataset)
