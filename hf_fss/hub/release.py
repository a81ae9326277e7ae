"""
Release day in one command (`scripts/release.py`, `hf-fss release`): every official checkpoint found in a folder is
converted, verified, optionally compared with the official code and evaluated, its card in `model_cards/` updated,
and its Hub-ready folder written (and pushed with `--push ORG`).

A file is matched to a manifest row (`hf_fss.hub.release_manifest`) by its name: the official file name where the
official release names one (SMCP's `25000.pth`, the MoCo `checkpoint_2000.pth.tar`), else `<repo>.pth` (also
`.pth.tar`, `.pt`, `.tar`). Checks, in order, each one a reason to skip the file and report it: the manifest knows the
name; the converter reads it safely and matches every key (strict); the inferred architecture is the row's (method,
backbone); the written folder loads back and runs a forward pass with finite logits of the right shape; with
`--official METHOD=DIR`, the official model of that checkout holding the same weights gives the same logits. A failed
file leaves nothing on disk: its folder is staged beside the target and renamed into place only once complete.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..cli import ScriptArgumentParser, command_prog, os_error_line
from ..utils.io import atomic_write_text, make_staging_dir, replace_folder, write_json_atomic
from .release_manifest import ReleaseEntry, default_cards_dir, load_manifest, read_measured, render_release_card

__all__ = ["ReleaseOutcome", "main", "parse_args", "release_checkpoints", "render_cards"]

PROG = "release.py"
# The verification episode's side: (side - 1) % 8 == 0, as the official PFENet-lineage forward asserts.
CHECK_SIZE = 97
# Logit parity with the official code: float32 rounding of two orderings of the same sums (the parity tests measured
# <= 4.2e-5 on logits of magnitude ~10), scaled by the logits' magnitude.
PARITY_ATOL = 1e-4
# The official PFENet-lineage builders make the official PASCAL config's ResNet-50 only.
_OFFICIAL_BACKBONES = {"ntrenet": ("resnet50",), "qgnet": ("resnet50",), "smcp": ("vgg16_dilated",)}


@dataclass
class ReleaseOutcome:
    """What happened to one file: `status` is `"released"`, `"written"` (dry run), `"failed"` or `"unknown"`."""

    file: str
    status: str
    repo: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("released", "written")


def _episode(size: int = CHECK_SIZE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A seeded 1-shot episode: query (1, 3, S, S), support (1, 1, 3, S, S), support mask (1, 1, S, S), a square."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(1, 3, size, size, generator=generator)
    support = torch.randn(1, 1, 3, size, size, generator=generator)
    masks = torch.zeros(1, 1, size, size, dtype=torch.long)
    masks[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    return query, support, masks


def _convert(path: Path, entry: ReleaseEntry, folder: Path):
    """Convert with the method's converter into `folder`; the model (or prior extractor) it returns."""
    from ..models.conversion import CONVERTERS, _load_converter

    if entry.method not in CONVERTERS:
        raise ValueError(f"no converter for method {entry.method!r}")
    options = {} if entry.artifact == "prior_extractor" else {"image_size": entry.image_size, "shot": entry.shot}
    return _load_converter(entry.method)(path, folder, **options)


def _verify_model(model, entry: ReleaseEntry, folder: Path):
    """The row's architecture, the folder loads back strictly, a forward pass gives finite (1, 2, S, S) logits."""
    from transformers import AutoModel

    found = (getattr(model.config, "model_type", None), getattr(model.config, "backbone", None))
    if found != (entry.method, entry.backbone):
        raise ValueError(
            f"the weights are model type {found[0]} with backbone {found[1]}, the manifest row says {entry.method} "
            f"with {entry.backbone}: rename the file to its row's name"
        )
    reloaded = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = reloaded(*_episode()).logits
    if logits.shape != (1, 2, CHECK_SIZE, CHECK_SIZE) or not torch.isfinite(logits).all():
        raise ValueError(
            f"the forward pass gave logits of shape {tuple(logits.shape)}, finite: {bool(torch.isfinite(logits).all())}"
        )
    return reloaded


def _verify_prior_extractor(extractor, entry: ReleaseEntry, folder: Path) -> None:
    """A MoCo extractor: the row's ResNet, its folder's weights are exactly the extractor's, finite features."""
    from safetensors.torch import load_file

    record = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if record.get("hf_fss_artifact") != "prior_extractor" or record.get("backbone") != entry.backbone:
        raise ValueError(
            f"not a {entry.backbone} prior extractor (a MoCo checkpoint is expected): {record.get('backbone')}"
        )
    saved, expected = load_file(folder / "model.safetensors"), extractor.state_dict()
    if set(saved) != set(expected) or any(not torch.equal(saved[k], expected[k]) for k in expected):
        raise ValueError("the written prior-extractor weights differ from the converted ones")
    with torch.no_grad():
        features = extractor.eval()(_episode()[0])
    features = (
        [features] if isinstance(features, torch.Tensor) else list(getattr(features, "values", lambda: features)())
    )
    if not all(torch.isfinite(f).all() for f in features):
        raise ValueError("the prior extractor's forward pass gave non-finite features")


def _parity(model, entry: ReleaseEntry, path: Path, checkout: Path) -> dict[str, Any] | None:
    """
    The max |official - converted| logit difference on the verification episode, the official model of `checkout`
    (`hf_fss.models.official` builders) holding this file's weights (strict load); None where no builder makes this
    architecture (the PFENet-lineage builders make ResNet-50 only).

    Raises:
        `ValueError`: the official model refuses the weights, or the logits differ beyond the tolerance.
    """
    from ..models.conversion import load_original_state_dict
    from ..models.official import official_builder

    if entry.backbone not in _OFFICIAL_BACKBONES.get(entry.method, ()):
        return None
    built = official_builder(entry.method)(checkout, shot=1, image_size=CHECK_SIZE)
    try:
        built.module.load_state_dict(load_original_state_dict(path), strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"the official model of {checkout} refuses these weights: {str(err).splitlines()[0]}"
        ) from None
    query, support, masks = _episode()
    with torch.no_grad():
        official = built.forward(query, support, masks).float()
        ours = model(query, support, masks).logits.float()
    difference = float((official - ours).abs().max())
    tolerance = PARITY_ATOL * max(1.0, float(official.abs().max()) / 10)
    if not difference <= tolerance:
        raise ValueError(f"logits differ from the official code's by {difference:.3g} (tolerance {tolerance:.3g})")
    today = datetime.date.today().isoformat()
    return {
        "max_abs_logit_difference": f"{difference:.2g}",
        "image_size": CHECK_SIZE,
        "official": built.source,
        "date": today,
    }


def _evaluate(folder: Path, entry: ReleaseEntry, args: argparse.Namespace) -> list[dict[str, Any]]:
    """`scripts/evaluate.py` on the folder under the row's protocol (and `--seeds`); one metrics dict per seed."""
    from ..evaluation.cli import main as evaluate_main

    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "metrics.json"
        argv = [
            "--model",
            str(folder),
            "--dataset",
            args.dataset,
            "--fold",
            str(entry.fold),
            "--shot",
            str(entry.shot),
        ]
        argv += ["--benchmark", entry.benchmark, "--protocol", entry.protocol, "--output", str(output)]
        argv += ["--seeds", *map(str, args.seeds)] if args.seeds else []
        argv += ["--num-episodes", str(args.num_episodes)] if args.num_episodes else []
        if evaluate_main(argv) != 0:
            raise ValueError(f"evaluation on {args.dataset} failed (see the evaluate.py error above)")
        metrics = json.loads(output.read_text(encoding="utf-8"))
    hardware = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    stamp = {"hardware": hardware, "date": datetime.date.today().isoformat(), "dataset": args.dataset}
    return [{**run, **stamp} for run in metrics.get("runs", [metrics])]


def _benchmark_of(dataset: str) -> str | None:
    """The benchmark a prepared dataset recorded when it was built (None: a Hub id or a folder that recorded none)."""
    from ..data.loading import infer_benchmark

    try:
        return infer_benchmark(dataset)
    except (ValueError, OSError):
        return None


def _check_and_measure(
    path: Path, entry: ReleaseEntry, work: Path, args: argparse.Namespace
) -> tuple[Any, dict, list[str]]:
    """
    Convert into `work`, verify, compare and evaluate: `(config or None, measured, notes)`, the notes saying what was
    not measured and why; raises on a failed check.
    """
    converted = _convert(path, entry, work)
    measured, notes = dict(read_measured(args.cards, entry.repo)), []
    if entry.artifact == "prior_extractor":
        _verify_prior_extractor(converted, entry, work)
        return None, measured, notes
    model = _verify_model(converted, entry, work)
    checkout = args.official.get(entry.method)
    if checkout is not None:
        parity = _parity(model, entry, path, checkout)
        if parity is None:
            notes.append(f"parity not measured: the official {entry.method} builder makes no {entry.backbone}")
        else:
            measured["parity"] = parity
    if args.dataset:
        recorded = _benchmark_of(args.dataset)
        if recorded not in (None, entry.benchmark):  # a number on another benchmark reproduces nothing
            notes.append(f"not evaluated: --dataset is {recorded}, the row {entry.benchmark}")
        else:
            measured["evaluation"] = _evaluate(work, entry, args)
    return model.config, measured, notes


def _release_one(
    path: Path, entry: ReleaseEntry, args: argparse.Namespace, organization: str, api=None
) -> ReleaseOutcome:
    target = args.output_dir / entry.repo
    work = make_staging_dir(target, "tmp")
    try:
        config, measured, notes = _check_and_measure(path, entry, work, args)
        card = render_release_card(entry, organization, measured, config)
        atomic_write_text(work / "README.md", card)
        replace_folder(work, target)
    except (ValueError, OSError, RuntimeError) as err:
        shutil.rmtree(work, ignore_errors=True)
        detail = os_error_line(err) if isinstance(err, OSError) and err.errno else " ".join(str(err).split())
        return ReleaseOutcome(path.name, "failed", entry.repo, detail)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if measured.get("parity") or measured.get("evaluation"):
        write_json_atomic(measured, args.cards / "measured" / f"{entry.repo}.json")
    atomic_write_text(args.cards / f"{entry.repo}.md", card)
    if args.dry_run:
        return ReleaseOutcome(path.name, "written", entry.repo, "; ".join([str(target), *notes]))
    return _push(path, entry, target, organization, api, notes)


def _push(path: Path, entry: ReleaseEntry, folder: Path, organization: str, api, notes: list[str]) -> ReleaseOutcome:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from .upload import HubUploadError, push_to_hub

    repo_id = f"{organization}/{entry.repo}"
    message = f"Release {entry.repo} with hf_fss"
    try:  # the card is the release's own: uploaded as written, never re-rendered
        if entry.artifact == "prior_extractor":  # a backbone folder: no image processor, not a model push_to_hub takes
            api = api or HfApi()
            api.create_repo(repo_id, exist_ok=True)
            files = ["model.safetensors", "config.json", "README.md"]
            api.upload_folder(folder_path=str(folder), repo_id=repo_id, allow_patterns=files, commit_message=message)
        else:
            push_to_hub(folder, repo_id, update_card=False, api=api, commit_message=message)
    except (HubUploadError, HfHubHTTPError, ValueError, OSError) as err:
        return ReleaseOutcome(path.name, "failed", entry.repo, f"written to {folder} but not pushed: {err}")
    return ReleaseOutcome(path.name, "released", entry.repo, "; ".join([repo_id, *notes]))


def _match(folder: Path, entries: list[ReleaseEntry]) -> tuple[list[tuple[Path, ReleaseEntry]], list[Path]]:
    by_name = {name: entry for entry in entries for name in entry.file_names()}
    matched, unknown = [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        (matched.append((path, by_name[path.name])) if path.name in by_name else unknown.append(path))
    return matched, unknown


def _nothing_to_release(folder: Path, entries: list[ReleaseEntry], found: int, cards_dir: Path) -> str:
    """The one-line error for a `--checkpoints` folder without a single file the manifest names."""
    official = sorted({e.official_file for e in entries if e.official_file})
    example = entries[0].repo + ".pth" if entries else "<repo>.pth"
    holds = (
        "is empty" if found == 0 else f"holds {found} file(s), none of them a checkpoint the release manifest names"
    )
    return (
        f"--checkpoints {folder} {holds}: expected the official names ({', '.join(official) or 'none'}) or <repo>.pth such as {example} "
        f"(the rows of {Path(cards_dir) / 'manifest.json'}); check the path"
    )


def render_cards(cards_dir: Path, organization: str | None = None) -> list[Path]:
    """
    Re-render every `model_cards/<repo>.md` from the manifest and what was measured (after an edit of the manifest
    or of a template); the cards name `organization` (default: the manifest's `hub_organization`).
    """
    header, entries = load_manifest(cards_dir)
    organization = organization or header.get("hub_organization")
    written = []
    for entry in entries:
        card = render_release_card(entry, organization, read_measured(cards_dir, entry.repo))
        written.append(atomic_write_text(Path(cards_dir) / f"{entry.repo}.md", card))
    return written


def release_checkpoints(args: argparse.Namespace, api=None) -> list[ReleaseOutcome]:
    """
    Release every file of `args.checkpoints` (see the module docstring); one outcome per file, unknown ones included.

    Raises:
        `ValueError`: the manifest cannot be read (named), or the folder holds no file the manifest names (an empty
            folder is most likely a wrong path); nothing is written then.
    """
    header, entries = load_manifest(args.cards)
    organization = args.push or header.get("hub_organization")
    matched, unknown = _match(args.checkpoints, entries)
    if not matched:  # an empty folder, or none of its files a release: most likely a wrong path
        raise ValueError(_nothing_to_release(args.checkpoints, entries, len(unknown), args.cards))
    outcomes = [
        ReleaseOutcome(p.name, "unknown", None, "not in the release manifest; nothing written") for p in unknown
    ]
    created = not args.output_dir.exists()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for path, entry in matched:
        outcomes.append(_release_one(path, entry, args, organization, api))
    if created and not any(args.output_dir.iterdir()):  # nothing released: the run leaves no trace
        args.output_dir.rmdir()
    return outcomes


# ------------------------------------------------------------------------------------------------ command line

USAGE = """
Convert, verify, evaluate, card and push every official checkpoint in a folder (release day in one command).

    python scripts/release.py --checkpoints official/ --output-dir release/ --dry-run
    python scripts/release.py --checkpoints official/ --output-dir release/ --official ntrenet=NERTNet/ --push ORG

Files are matched to `model_cards/manifest.json` by name (the official name, else `<repo>.pth`); each is converted,
checked (strict keys, architecture, reload, forward pass; logit parity with `--official METHOD=DIR`), evaluated with
`--dataset` (the row's protocol, `--seeds`), its card `model_cards/<repo>.md` re-rendered and its folder
`<output-dir>/<repo>` written; `--push ORG` uploads it. Exit status 0: every file released; 1: a file was unknown or
failed a check (reported, not pushed, nothing written for it); 2: a usage error (a folder with no file the manifest
names included).
"""


def _official(value: str) -> tuple[str, Path]:
    method, sep, folder = value.partition("=")
    if not sep or not method or not folder:
        raise argparse.ArgumentTypeError(f"expected METHOD=DIR (e.g. ntrenet=NERTNet/), got {value!r}")
    if not Path(folder).is_dir():
        raise argparse.ArgumentTypeError(f"{folder} is not a folder (the official checkout of {method})")
    return method, Path(folder)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ScriptArgumentParser(prog=PROG, description=USAGE, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--checkpoints", type=Path, help="folder holding official files (any subset)")
    parser.add_argument("--output-dir", type=Path, help="where the Hub-ready folders <repo>/ go")
    parser.add_argument("--cards", type=Path, default=default_cards_dir(), help="the model_cards folder (manifest)")
    parser.add_argument("--official", type=_official, action="append", default=[], help="METHOD=DIR official checkout")
    parser.add_argument("--dataset", default=None, help="prepared benchmark to evaluate on (as evaluate.py --dataset)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="episode seeds (default: the protocol's)")
    parser.add_argument("--num-episodes", type=int, default=None, help="episodes per seed (default: the protocol's)")
    parser.add_argument("--push", metavar="ORG", default=None, help="Hub organization to push to")
    parser.add_argument("--dry-run", action="store_true", help="write the folders and cards, push nothing")
    parser.add_argument(
        "--render-cards", action="store_true", help="only re-render every model_cards/<repo>.md from the manifest"
    )
    args = parser.parse_args(argv)
    args.official = dict(args.official)
    if args.render_cards:
        return args
    if args.checkpoints is None or args.output_dir is None:
        parser.error("--checkpoints and --output-dir are required (or --render-cards alone)")
    if not args.checkpoints.is_dir():
        parser.error(f"--checkpoints {args.checkpoints} is not a folder")
    if args.push is None and not args.dry_run:
        parser.error("give --push ORG, or --dry-run to write the folders only")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        parser.error(f"--output-dir {args.output_dir} exists and is not a folder")
    return args


def main(argv=None, api=None) -> int:
    """Run the release; print one line per file; 0 when every file was released, 1 when one failed, 2 on misuse."""
    args = parse_args(argv)
    try:
        if args.render_cards:
            print(f"rendered {len(render_cards(args.cards, args.push))} card(s) into {args.cards}")
            return 0
        outcomes = release_checkpoints(args, api=api)
    except (ValueError, OSError) as err:
        print(f"{command_prog(PROG)}: error: {err}", file=sys.stderr)
        return 2
    for outcome in outcomes:
        where = f" -> {outcome.repo}" if outcome.repo else ""
        print(f"{outcome.status:8} {outcome.file}{where}: {outcome.detail}")
    failed = [o for o in outcomes if not o.ok]
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} file(s) {'written' if args.dry_run else 'released'}")
    return 1 if failed else 0
