"""
Class folders and files as users lay them out, shared by the FSS-1000 and the own-folder builders.

Symlinks are not followed into duplicates: a symlinked class folder that resolves into the tree is not a class (a
link to a sibling or to the root would make a class of another's images), one whose target lies outside the tree is
a class (followed); a symlinked file whose target is a real file of the tree (or the target of an earlier link) is
left out, one to a file outside the tree is an image. Class names are compared in Unicode NFC, so a name macOS
stored decomposed (NFD) equals its typed form; names equal up to normalisation are a ValueError. What was skipped or
normalised is returned as `report_entry`s ("symlink_followed", "symlink_skipped", "name_normalised") for the build
report.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..text import normalize_name, read_text_lines
from ._common import report_entry


def refuse_duplicate_names(raw_names: Sequence[str], where: str) -> None:
    """ValueError naming the names of `raw_names` that are equal in NFC; written with ascii() escapes when they
    differ only in their Unicode form (NFC vs NFD), so the two do not print identically."""
    by_form: dict[str, list[str]] = {}
    for raw in raw_names:
        by_form.setdefault(normalize_name(raw), []).append(raw)
    repeated = {form: spellings for form, spellings in by_form.items() if len(spellings) > 1}
    if not repeated:
        return
    shown = [
        repr(form) if len(set(spellings)) == 1 else " and ".join(ascii(s) for s in sorted(set(spellings)))
        for form, spellings in sorted(repeated.items())
    ]
    raise ValueError(
        f"{where}: {'; '.join(shown)} name one class more than once (class names are compared in Unicode NFC); "
        "rename or remove one"
    )


def normalized_names(raw_names: Sequence[str], where: str, listing: list) -> list[str]:
    """`raw_names` in NFC; each name that changed is reported in `listing` ("name_normalised", `where` naming the
    file or folder it came from)."""
    names = []
    for raw in raw_names:
        name = normalize_name(raw)
        if name != raw:
            problem = f"{where}: class name {ascii(raw)} is not in Unicode NFC: read as {ascii(name)}"
            listing.append(report_entry(name, "name_normalised", problem))
        names.append(name)
    return names


def _inside(path: Path, root: Path) -> bool:
    """Whether the resolved `path` is `root` (resolved) or lies under it."""
    return path == root or root in path.parents


def _followed_links(root: Path, links: list[Path], listing: list) -> list[Path]:
    """
    The symlinked class folders of `links` to follow: those whose target lies outside `root` (a real class kept
    elsewhere, reported "symlink_followed"). A link into the tree, or to a folder an earlier link already took,
    would repeat another class's images: reported "symlink_skipped" and left out.
    """
    tree, taken, followed = root.resolve(), set(), []
    for link in links:
        target = link.resolve()
        if _inside(target, tree) or target in taken:
            problem = (
                f"{link} is a symlinked folder: not a class (it resolves to {target}, inside the tree or linked "
                "already: its images would repeat another's)"
            )
            listing.append(report_entry(link.name, "symlink_skipped", problem))
            continue
        taken.add(target)
        followed.append(link)
        problem = f"{link} is a symlink to {target}, outside the tree: followed, a class"
        listing.append(report_entry(link.name, "symlink_followed", problem))
    return followed


def class_folders(root: Path, where: str, listing: list) -> dict[str, Path]:
    """
    {NFC name: folder} of the class folders directly in `root`, by name (hidden and `__*` entries, e.g. __MACOSX,
    ignored). A symlinked folder is a class when its target lies outside the tree (reported "symlink_followed"),
    and not when it resolves into the tree or to another link's target (a duplicate, reported "symlink_skipped");
    each name normalised to NFC is reported in `listing` too.

    Raises:
        ValueError: two folder names equal up to Unicode normalisation (`where` names the folder in the message).
    """
    candidates = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))
    followed = _followed_links(root, [p for p in candidates if p.is_symlink()], listing)
    folders = [p for p in candidates if not p.is_symlink() or p in followed]
    refuse_duplicate_names([p.name for p in folders], where)
    names = normalized_names([p.name for p in folders], where, listing)
    return dict(zip(names, folders))


def real_files(root: Path) -> dict[Path, Path]:
    """{resolved path: path} of the files under `root` that are not symlinks (they own their content)."""
    return {path.resolve(): path for path in root.rglob("*") if path.is_file() and not path.is_symlink()}


def is_duplicate_link(path: Path, targets: dict[Path, Path], listing: list, entry_id: str) -> bool:
    """
    True when `path` is a symlink to a file that `targets` ({resolved path: owner}, from `real_files`, shared
    across calls) already owns: it is reported in `listing` ("symlink_skipped") and must be left out. A link to a
    file not seen before becomes that file's owner, so a second link to it is a duplicate too.
    """
    owner = targets.setdefault(path.resolve(), path)
    if owner == path:
        return False
    problem = f"{path} is a symlink to {owner}, listed already: left out as a duplicate"
    listing.append(report_entry(entry_id, "symlink_skipped", problem))
    return True


def read_name_list(path: Path, notes: list, what: str = "class list") -> list[str]:
    """
    The class names listed one per line in `path` (a split list), in NFC, each once, in file order. Read as editors
    save it (`read_text_lines`: BOM, CRLF, UTF-16 with a BOM; blank lines, tabs and trailing blanks ignored); a
    file so normalised ("list_normalised"), names not in NFC ("name_normalised") and names listed again
    ("duplicate_id") are noted in `notes` as report entries.

    Raises:
        ValueError: the file is in another encoding (one line naming it, see `read_user_text`).
    """
    texts: list[str] = []
    lines = [line for line in read_text_lines(path, what, texts) if line]
    notes.extend(report_entry(path.name, "list_normalised", text) for text in texts)
    listed: list[str] = []
    for name in normalized_names(lines, str(path), notes):
        if name in listed:
            notes.append(report_entry(name, "duplicate_id", f"{path} lists class {name!r} again: listed once"))
        else:
            listed.append(name)
    return listed
