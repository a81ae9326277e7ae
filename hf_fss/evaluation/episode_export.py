"""
The fixed test episode lists of each protocol, exported beside a prepared benchmark so that others score exactly the
same episodes: one JSON Lines file per protocol, fold, shot and seed (`{"query": id, "supports": [ids], "class_id":
c}`, as `evaluate.py --save-episodes` writes and `--episodes-file` reads) and `index.json` with the sha256 of each
list (`episodes_sha256`, the hash of its JSON Lines text), so a re-imported list can be checked to be the same.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hf_fss.data import fold_classes, make_test_episodes, save_episodes_jsonl
from hf_fss.data.folds import has_class_split, num_folds
from hf_fss.data.sampling import Episode, episodes_jsonl_text
from hf_fss.evaluation.arguments import default_test_split
from hf_fss.evaluation.protocols import get_protocol
from hf_fss.utils.io import atomic_write_text

__all__ = ["INDEX_NAME", "episodes_sha256", "export_test_episodes"]

INDEX_NAME = "index.json"


def episodes_sha256(episodes: Iterable[Episode]) -> str:
    """sha256 of an episode list's JSON Lines text (the file `save_episodes_jsonl` writes): equal lists, equal hash."""
    return hashlib.sha256(episodes_jsonl_text(episodes).encode("utf-8")).hexdigest()


def export_test_episodes(
    dataset: Mapping[str, Any],
    benchmark: str,
    folder: str | Path,
    protocols: Sequence[str] = ("pfenet", "hsnet", "panet"),
    shots: Sequence[int] = (1, 5),
) -> list[dict[str, Any]]:
    """
    Write the test episodes of every protocol, fold, shot and seed of `benchmark` into `folder`
    (`<protocol>/fold<f>_<k>shot_seed<s>.jsonl`, drawn by `make_test_episodes` as `evaluate.py` draws them: the
    protocol's test split, fold convention, episode count and seeds) and `folder/index.json` listing them.

    Returns:
        The index: one dict per file (`file`, `protocol`, `benchmark`, `split`, `fold_convention`, `fold`, `shot`,
        `seed`, `num_episodes`, `sha256`).

    Raises:
        `ValueError`: an unknown protocol, or a dataset without the protocol's test split.
    """
    folder = Path(folder)
    split_name = default_test_split(dataset, benchmark)
    index = []
    for name in protocols:
        protocol = get_protocol(name, benchmark=benchmark)
        # Only COCO-20i has two fold conventions; the other benchmarks take none.
        convention = protocol.fold_convention if benchmark == "coco20i" else None
        for fold in range(num_folds(benchmark, convention)):
            classes = fold_classes(
                benchmark, fold, convention, dataset=dataset if has_class_split(benchmark) else None
            )
            for shot in shots:
                for seed in protocol.seeds:
                    episodes = make_test_episodes(
                        dataset[split_name], classes.novel, protocol.num_episodes, shot, seed
                    )
                    file = f"{protocol.name}/fold{fold}_{shot}shot_seed{seed}.jsonl"
                    (folder / file).parent.mkdir(parents=True, exist_ok=True)
                    save_episodes_jsonl(episodes, folder / file)
                    index.append(
                        {"file": file, "protocol": protocol.name, "benchmark": benchmark, "split": split_name}
                        | {"fold_convention": protocol.fold_convention, "fold": fold, "shot": shot, "seed": seed}
                        | {"num_episodes": len(episodes), "sha256": episodes_sha256(episodes)}
                    )
    atomic_write_text(folder / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    return index
