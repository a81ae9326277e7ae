"""
The release manifest (`model_cards/manifest.json`) and the curated card of each release (`model_cards/<repo>.md`).

The manifest lists every official checkpoint hf_fss can convert, one row per future Hub repo, with the facts the
official READMEs and the papers give (and their source): the file name where the official release names one,
method, backbone, benchmark, fold, shot, the target repo name and the paper's reported mIoU with its table. A card is
a pure function of its row, its method's facts and what a release measured (`model_cards/measured/<repo>.json`:
parity with the official code, evaluation runs): rendered with `render_model_card` (the method's template), the
release section `hf_fss/model_cards/release/section.md` placed before "How to use". Nothing measured, nothing
claimed: the paper's number is "reported by the authors" and the reproduced line says "not yet reproduced".
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .model_card import CARD_MARKER, render_model_card

__all__ = [
    "MANIFEST_NAME",
    "ReleaseEntry",
    "default_cards_dir",
    "load_manifest",
    "read_measured",
    "release_config",
    "render_release_card",
    "space_metadata",
]

MANIFEST_NAME = "manifest.json"
_ROW_FIELDS = {"repo", "method", "backbone", "benchmark", "fold", "shot", "image_size", "protocol", "official_file"}
_ROW_FIELDS |= {"paper_miou", "paper_table", "source"}
_METHOD_FIELDS = {"paper", "paper_url", "code", "commit", "license", "license_note", "parity", "config"}
_WEIGHT_SUFFIXES = (".pth", ".pth.tar", ".pt", ".tar")
# The protocol settings a card names (those that change a number, CONTRACT.md section 5).
_PROTOCOL_FIELDS = ("label_size", "ignore_boundary", "iou_aggregation", "num_episodes", "seeds", "fold_convention")


@dataclass(frozen=True)
class ReleaseEntry:
    """
    One manifest row: a checkpoint of the official code and the Hub repo it becomes.

    Args:
        repo (`str`): the repo name, e.g. `"ntrenet-r50-pascal5i-fold0"` (the organization comes from `--push`).
        method (`str`): model type (`ntrenet`, `qgnet`, `smcp`).
        backbone (`str`): hf_fss backbone name (`resnet50`, `resnet101`, `vgg16_bn`, `vgg16_dilated`).
        benchmark (`str`), fold (`int` or None), shot (`int` or None), image_size (`int` or None), protocol (`str` or
            None): what the checkpoint was trained / is tested on; None where it does not apply (a prior extractor).
        official_file (`str` or None): the file name as the official release names it; None when it names none.
        paper_miou (`float` or None) and paper_table (`str` or None): the paper's reported mIoU (percent), its table.
        source (`str`): where the row's facts come from (official README / paper table).
        artifact (`str`): `"model"`, or `"prior_extractor"` (QGNet's MoCo extractor, converted to a backbone folder).
        facts (`dict`): the method's paper, official code, commit, licence and converter parity.
    """

    repo: str
    method: str
    backbone: str
    benchmark: str
    fold: int | None
    shot: int | None
    image_size: int | None
    protocol: str | None
    official_file: str | None
    paper_miou: float | None
    paper_table: str | None
    source: str
    artifact: str = "model"
    facts: Mapping[str, Any] = field(default_factory=dict)

    def file_names(self) -> tuple[str, ...]:
        """The names under which a release folder's file is this row: the official name, or `<repo>.pth` etc."""
        names = tuple(self.repo + suffix for suffix in _WEIGHT_SUFFIXES)
        return ((self.official_file,) if self.official_file else ()) + names


def default_cards_dir() -> Path:
    """The checkout's `model_cards/` (beside the `hf_fss` package); a wheel install has none: pass `--cards`."""
    return Path(str(resources.files("hf_fss"))).parent / "model_cards"


def load_manifest(cards_dir: str | os.PathLike) -> tuple[dict[str, Any], list[ReleaseEntry]]:
    """
    Read `<cards_dir>/manifest.json`.

    Returns:
        `(header, entries)`: the header (`hub_organization`, `methods`) and one `ReleaseEntry` per row.

    Raises:
        `ValueError`: a missing / malformed manifest, a row without a field, an unknown method, a repeated repo or
            official file name (each named).
    """
    path = Path(cards_dir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(
            f"release manifest {path} cannot be read ({err}); give --cards the model_cards folder"
        ) from None
    methods = data.get("methods", {})
    entries, seen = [], set()
    for row in data.get("releases", []):
        missing = sorted(_ROW_FIELDS - set(row))
        if missing or row.get("method") not in methods:
            raise ValueError(f"{path}: row {row.get('repo')!r} lacks {missing} or names an unknown method")
        facts = methods[row["method"]]
        if _METHOD_FIELDS - set(facts):
            raise ValueError(f"{path}: method {row['method']!r} lacks {sorted(_METHOD_FIELDS - set(facts))}")
        entry = ReleaseEntry(**row, facts=facts)
        for name in (entry.repo, entry.official_file):
            if name in seen:
                raise ValueError(f"{path}: {name!r} appears in two rows; repo and file names must be unique")
            seen.add(name) if name else None
        entries.append(entry)
    return data, entries


def space_metadata(cards_dir: str | os.PathLike) -> dict[str, list[str]]:
    """
    The Space's `models:` and `datasets:` front matter (spaces_app/README.md): every released model repo of the
    manifest (the prior extractor is no model the Space runs) and the Hub builds of their benchmarks
    (`hub_datasets`, pushed with `prepare_dataset.py --push-to-hub`).
    """
    header, entries = load_manifest(cards_dir)
    organization = header["hub_organization"]
    models = [f"{organization}/{e.repo}" for e in entries if e.artifact == "model"]
    benchmarks = {e.benchmark for e in entries if e.artifact == "model"}
    datasets = sorted(repo for name, repo in header.get("hub_datasets", {}).items() if name in benchmarks)
    return {"models": models, "datasets": datasets}


def read_measured(cards_dir: str | os.PathLike, repo: str) -> dict[str, Any]:
    """What a release measured for `repo` (`model_cards/measured/<repo>.json`), `{}` before anything was."""
    path = Path(cards_dir) / "measured" / f"{repo}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def release_config(entry: ReleaseEntry):
    """The config of the official architecture the row names (what the converter infers from such a file)."""
    from ..models import MODEL_CLASSES

    config_class = MODEL_CLASSES[entry.method][0]
    options = dict(
        entry.facts.get("config") or {}
    )  # fields the converter sets for every official file (SMCP's branch)
    return config_class(backbone=entry.backbone, image_size=entry.image_size, shot=entry.shot, **options)


def _protocol_text(entry: ReleaseEntry) -> tuple[dict | None, str | None]:
    if entry.protocol is None:
        return None, None
    from ..evaluation.protocols import get_protocol

    protocol = get_protocol(entry.protocol, benchmark=entry.benchmark).to_dict()
    return protocol, ", ".join(f"{k}={protocol[k]}" for k in _PROTOCOL_FIELDS)


def _reproduced(runs: Sequence[Mapping[str, Any]], preset: Mapping[str, Any] | None) -> str | None:
    """`mean +- std` mIoU (percent) over the measured seeds, with protocol, hardware and date; None when unmeasured."""
    values = [
        100 * run["miou"] for run in runs if isinstance(run.get("miou"), (int, float)) and math.isfinite(run["miou"])
    ]
    if not values:
        return None
    spread = f" +- {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    first = runs[0]
    protocol = first.get("protocol") if isinstance(first.get("protocol"), Mapping) else {"name": first.get("protocol")}
    # What the run changed from the row's preset (seeds are listed anyway): a number is comparable only under both.
    changed = sorted(
        k for k in _PROTOCOL_FIELDS if k != "seeds" and k in protocol and protocol[k] != (preset or {}).get(k)
    )
    overridden = f" with {', '.join(changed)} changed from the preset" if changed else ""
    return (
        f"{statistics.mean(values):.1f}{spread} mIoU over {len(values)} seed(s) {[run.get('seed') for run in runs]}, "
        f"{first.get('num_episodes', 'an unrecorded number of')} episode(s) per seed, protocol `{protocol.get('name')}`"
        f"{overridden}, on {first.get('dataset', 'an unrecorded dataset')}, {first.get('hardware', 'hardware not recorded')}"
        f", {first.get('date', 'date not recorded')}"
    )


def _release_section(entry: ReleaseEntry, measured: Mapping[str, Any]) -> str:
    from jinja2 import Template

    facts = entry.facts
    protocol, protocol_text = _protocol_text(entry)
    provenance = (
        f"converted with `scripts/release.py` from `{entry.official_file}`, a file of the official release"
        if entry.official_file and entry.artifact == "model"
        else f"converted with `scripts/release.py` from a checkpoint of the official code given as `{entry.file_names()[0]}`"
        " (the official release publishes no file for this row)"
        if entry.artifact == "model"
        else f"converted with `scripts/release.py` from the MoCo checkpoint `{entry.official_file}` that the official code loads"
    )
    template = (resources.files("hf_fss") / "model_cards" / "release" / "section.md").read_text(encoding="utf-8")
    return Template(template, keep_trailing_newline=True).render(
        **{k: v for k, v in facts.items() if k not in ("parity", "config")},
        method_parity=facts.get("parity"),
        parity=measured.get("parity"),
        provenance=provenance,
        source=entry.source,
        protocol=protocol,
        protocol_text=protocol_text,
        paper_miou=entry.paper_miou,
        paper_table=entry.paper_table,
        artifact=entry.artifact,
        reproduced=_reproduced(measured.get("evaluation", []), protocol),
    )


def render_release_card(
    entry: ReleaseEntry, organization: str, measured: Mapping[str, Any] | None = None, config=None
) -> str:
    """
    The card of one release: the method's template rendered by `render_model_card` from the row's architecture
    (`config`: the converted model's, else `release_config(entry)`), with the release section before "How to use".

    Args:
        entry: the manifest row.
        organization (`str`): the Hub organization, so that the loading snippet names `organization/repo`.
        measured: `read_measured(...)` (parity, evaluation runs: metrics.json dicts); only these give `model-index`.
        config: the converted model's config, when the release has converted one.

    Returns:
        The card's text (front matter with `library_name: hf_fss`, `pipeline_tag`, and `model-index` only when measured).
    """
    measured = measured or {}
    repo_id = f"{organization}/{entry.repo}"
    section = _release_section(entry, measured)
    if entry.artifact == "prior_extractor":
        return _prior_extractor_card(entry, repo_id, section)
    runs = measured.get("evaluation") or None
    training = {"converted_from": entry.file_names()[0], "benchmark": entry.benchmark, "fold": entry.fold}
    training |= {"shot": entry.shot, "source": entry.facts["code"]}
    if entry.facts.get("license"):
        training["license"] = entry.facts["license"]
    dataset = next((run.get("dataset") for run in runs or [] if "/" in str(run.get("dataset", ""))), None)
    if dataset:
        training["dataset"] = dataset
    card = render_model_card(config or release_config(entry), metrics=runs, training=training, repo_id=repo_id)
    # Without the generated-card line, push_to_hub uploads the card as it is instead of re-rendering it unreleased.
    text = "\n".join(line for line in str(card).splitlines() if not line.startswith(CARD_MARKER)) + "\n"
    marker = "\n## How to use"
    if marker not in text:  # pragma: no cover - every method template has the section
        raise RuntimeError(f"the {entry.method} card template has no '## How to use' section")
    return text.replace(marker, "\n" + section + marker, 1)


def _prior_extractor_card(entry: ReleaseEntry, repo_id: str, section: str) -> str:
    template = resources.files("hf_fss") / "model_cards" / "release" / "prior_extractor.md"
    data = ModelCardData(
        library_name="hf_fss",
        license=entry.facts.get("license"),
        tags=["hf_fss", "few-shot-segmentation", entry.method, "prior-extractor", entry.benchmark],
        model_name=entry.repo,
    )
    card = ModelCard.from_template(
        data,
        template_str=template.read_text(encoding="utf-8"),
        repo_id=repo_id,
        model_name=entry.repo,
        release_section=section,
    )
    return str(card)
