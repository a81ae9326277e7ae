"""
What every command line of hf_fss shares: the `hf-fss <verb>` console command (`COMMANDS`, `main`; the same
commands as `scripts/*.py`), the allowed range of each numeric argument (`Range`, one declaration per flag, checked
in one place), argparse parsers whose errors are one line, JSON-object flags, and the one-line wording of
operating-system errors.

A `Range` serves both kinds of parser: as argparse's `type=` (`--shot` converted and checked as it is read) and as
the `"range"` metadata of a dataclass field (`check_ranges(group)` in the group's `__post_init__`, so a value from a
`--config` recipe is checked exactly as the same flag on the command line).
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import errno
import importlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

__all__ = [
    "COMMANDS",
    "IMAGE_SIDE",
    "NON_NEGATIVE",
    "NON_NEGATIVE_INT",
    "POSITIVE",
    "POSITIVE_INT",
    "SEED",
    "OneLineErrors",
    "Range",
    "ScriptArgumentParser",
    "check_ranges",
    "main",
    "json_object",
    "os_error_line",
]


@dataclass(frozen=True)
class Range:
    """
    An allowed interval of a numeric argument: `low` / `high` bounds (None: unbounded), `low_open` / `high_open`
    exclude them, `integer` asks for an int. NaN and infinities are never in a range.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def describe(self) -> str:
        """The range in words, e.g. 'an integer >= 1', 'a number in [0, 1)', 'a finite number > 0'."""
        kind = "an integer" if self.integer else "a finite number"
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{kind} in {left}{low}, {high}{right}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {high}"
        return kind

    def contains(self, value: Any) -> bool:
        """Whether `value` is a number of the right kind (bool is not) inside the range."""
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def __call__(self, text: str) -> int | float:
        """argparse `type=`: the number `text` spells, or `ArgumentTypeError` stating the range."""
        try:
            value = int(text) if self.integer else float(text)
        except ValueError:
            value = None
        if not self.contains(value):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return value

    @property
    def __name__(self) -> str:  # argparse names the type in some messages
        return self.describe()


def _number(value: float | None) -> str:
    return str(int(value)) if value is not None and float(value).is_integer() else str(value)


POSITIVE_INT = Range(1, integer=True)
NON_NEGATIVE_INT = Range(0, integer=True)
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
# numpy's generators take seeds in [0, 2**32 - 1]; torch.manual_seed would accept more, the data sampling would not.
SEED = Range(0, 2**32 - 1, integer=True)
# The models' config validator refuses image_size < 32 (a dilated backbone's stride-8 features need some pixels).
IMAGE_SIDE = Range(32, integer=True)


def _refusal(allowed: Range, value: Any, unset: str = "") -> str:
    """'must be <range>, got <value>'; a NaN or an infinity is named as such first (it passes every comparison)."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value!r} (allowed: {allowed.describe()}{unset})"
    return f"must be {allowed.describe()}{unset}, got {value!r}"


def check_ranges(group: Any) -> None:
    """
    Check every field of the dataclass instance `group` whose metadata holds a `"range"`; a field whose default is
    None may also be None (unset).

    Raises:
        `ValueError`: one line naming the flag and the recipe key, the allowed range and the value seen.
    """
    for spec in dataclasses.fields(group):
        allowed = spec.metadata.get("range")
        if allowed is None:
            continue
        value = getattr(group, spec.name)
        if value is None and spec.default is None:
            continue
        if not allowed.contains(value):
            unset = " (or unset)" if spec.default is None else ""
            flag = "--" + spec.name.replace("_", "-")
            raise ValueError(f"{flag}: {spec.name} {_refusal(allowed, value, unset)}")


def json_object(text: str) -> dict[str, Any]:
    """argparse `type=` of a flag taking a JSON object (`'{"reduce_dim": 64}'`); anything else is refused."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(
            f"must be a JSON object such as '{{\"key\": 1}}', got {text!r} ({err})"
        ) from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"must be a JSON object of config fields such as '{{\"key\": 1}}', got {type(value).__name__} {text!r}"
        )
    return value


# (script name, "hf-fss <verb>") while `main` runs a verb: every command's parser then names itself as it was called.
_VERB_PROG: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("hf_fss_verb_prog", default=None)


def command_prog(script: str) -> str:
    """How the running command names itself in its messages: `hf-fss <verb>` under `hf-fss`, else `script`."""
    verb = _VERB_PROG.get()
    return verb[1] if verb is not None and verb[0] == script else script


class OneLineErrors:
    """
    Mixin for `argparse.ArgumentParser` subclasses: a usage error is one line `<prog>: error: ...`, exit 2. Under
    `hf-fss <verb>` a prog starting with the verb's script name (`release.py`, `prepare_dataset.py synthetic`) reads
    `hf-fss <verb> ...`, in the usage line, `--help` and errors alike.
    """

    @property
    def prog(self) -> str:
        prog, verb = self.__dict__.get("_script_prog", ""), _VERB_PROG.get()
        if verb is not None and (prog == verb[0] or prog.startswith(verb[0] + " ")):
            return verb[1] + prog[len(verb[0]) :]
        return prog

    @prog.setter
    def prog(self, value: str) -> None:
        self.__dict__["_script_prog"] = value

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class ScriptArgumentParser(OneLineErrors, argparse.ArgumentParser):
    """
    The scripts' `argparse.ArgumentParser`: usage errors are one line, and `add_argument(..., allowed=Range(...))`
    declares a numeric flag's range (its `type` and a note in `--help` follow from it), which `check_ranges(args)`
    checks after parsing, for this parser, its parents and its sub-commands at once.
    """

    def add_argument(self, *args: Any, allowed: Range | None = None, **kwargs: Any) -> argparse.Action:
        if allowed is None:
            return super().add_argument(*args, **kwargs)
        kwargs.setdefault("type", int if allowed.integer else float)
        kwargs["help"] = f"{kwargs.get('help') or ''} ({allowed.describe()})".lstrip()
        action = super().add_argument(*args, **kwargs)
        action.allowed = allowed  # read by check_ranges; shared with the parsers this one is a parent of
        return action

    def parse_checked(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """`parse_args`, then `check_ranges`: a value out of range is a usage error (one line, exit status 2)."""
        args = self.parse_args(argv)
        try:
            self.check_ranges(args)
        except ValueError as err:
            self.error(str(err))
        return args

    def check_ranges(self, args: argparse.Namespace) -> None:
        """
        Check every ranged flag `args` holds (each item of a list-valued one); unset (None) passes.

        Raises:
            `ValueError`: one line naming the flag, its range and the value given.
        """
        for action in _actions(self):
            allowed = getattr(action, "allowed", None)
            value = getattr(args, action.dest, None) if allowed is not None else None
            for item in value if isinstance(value, list) else [value]:
                if item is not None and not allowed.contains(item):
                    raise ValueError(f"{action.option_strings[-1]} {_refusal(allowed, item)}")


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The actions of `parser` and of its sub-commands' parsers."""
    found = []
    for action in parser._actions:
        found.append(action)
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found.extend(_actions(sub))
    return found


_OS_ERROR_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or choose another folder",
    errno.EDQUOT: "the disk quota is exceeded: free some space or choose another folder",
    errno.EACCES: "permission denied: choose a folder you may write",
    errno.EPERM: "operation not permitted: choose a folder you may write",
    errno.EROFS: "the file system is read-only: choose another folder",
    errno.ENOTDIR: "a file stands where a folder is needed: remove it or choose another path",
    errno.EEXIST: "a file of that name already exists: remove it or choose another path",
    errno.EISDIR: "a folder stands where a file is needed: choose a file path",
}


def os_error_line(err: OSError) -> str:
    """One line for an operating-system error: the path(s) involved, what happened, and what to do."""
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    what = _OS_ERROR_HINTS.get(err.errno) or (err.strerror or " ".join(str(err).splitlines()))
    return f"{paths}: {what}" if paths else what


# ------------------------------------------------------------------------------------------------ hf-fss <verb>

# verb -> (the `main(argv)` behind it, its script): `hf-fss train ...` is `python scripts/train.py ...`, and under
# `accelerate launch` the same. One console command with verbs, as `transformers` and `accelerate` have.
COMMANDS = {
    "train": ("hf_fss.training:main", "train.py"),
    "evaluate": ("hf_fss.evaluation.runner:main", "evaluate.py"),
    "compare": ("hf_fss.evaluation.compare:main", "compare.py"),
    "prepare": ("hf_fss.data.builders.prepare:main", "prepare_dataset.py"),
    "pretrain": ("hf_fss.pretraining.training:main", "pretrain_prior.py"),
    "convert": ("hf_fss.models.conversion:main", "convert_original_checkpoint.py"),
    "push": ("hf_fss.hub.upload:main", "push_to_hub.py"),
    "release": ("hf_fss.hub.release:main", "release.py"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """
    `hf-fss <verb> [flags]` (`python -m hf_fss <verb>`): run the command `verb` of `COMMANDS` with the flags that
    follow; `hf-fss <verb> --help` lists them. Returns the command's exit status; a missing or unknown verb is a
    usage error (one line, exit status 2).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ScriptArgumentParser(prog="hf-fss", description="Few-shot semantic segmentation: the commands of hf_fss.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for verb, (_, script) in COMMANDS.items():
        verbs.add_parser(verb, help=f"scripts/{script} (hf-fss {verb} --help)", add_help=False)
    parser.parse_args(argv[:1])  # the verb alone: its own flags are the command's to parse
    module_name, function_name = COMMANDS[argv[0]][0].split(":")
    command = getattr(importlib.import_module(module_name), function_name)
    # The commands read sys.argv when given no argv, as from their script: threads follow the command line then.
    sys.argv = [f"hf-fss {argv[0]}", *argv[1:]]
    token = _VERB_PROG.set((COMMANDS[argv[0]][1], f"hf-fss {argv[0]}"))
    try:
        return command()
    finally:
        _VERB_PROG.reset(token)
