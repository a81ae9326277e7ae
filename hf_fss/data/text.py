"""
Text files that users write (id lists, class-name lists, split lists, episode files), read as editors save them:
UTF-8 with or without a byte-order mark, UTF-16 / UTF-32 with one (Windows "Unicode"), LF, CRLF or CR line ends.
Anything else is a ValueError naming the file, never a codec traceback or a first id that silently carries a BOM.
"""

from __future__ import annotations

import codecs
import os
import unicodedata
from pathlib import Path

__all__ = ["normalize_name", "read_text_lines", "read_user_text"]

# Longest marks first: UTF-32-LE's mark begins with UTF-16-LE's.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_FIX = "save it as UTF-8 (or UTF-16 with a byte-order mark)"


def read_user_text(path: str | os.PathLike, what: str, notes: list | None = None) -> str:
    """
    The text of the file at `path` (`what` names it in errors, e.g. "VOC segmentation list"), with the BOM removed
    and every line end turned into "\\n". With `notes`, what was normalised (a BOM, UTF-16 / UTF-32, CRLF or CR
    line ends) is appended there as one sentence naming the file, so a build report can count it.

    Raises:
        FileNotFoundError: `path` is not a file.
        ValueError: the bytes are not UTF-8 and carry no byte-order mark, or hold NUL characters (UTF-16 saved
            without a mark); one line naming the file and how to fix it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    data = path.read_bytes()
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path} is not {encoding} text ({err.reason} at byte {err.start}); {_FIX}") from None
    if "\x00" in text:
        raise ValueError(f"{what} {path} holds NUL characters (UTF-16 without a byte-order mark?); {_FIX}")
    changed = _normalised(encoding, text)
    if changed and notes is not None:
        notes.append(f"{what} {path} is saved {' and '.join(changed)}: read as text")
    # str.splitlines also splits at form feeds and Unicode separators; only real line ends count here.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _normalised(encoding: str, text: str) -> list[str]:
    """What `read_user_text` changes in a file's bytes: its byte-order mark / encoding and its line ends."""
    changed = []
    if encoding != "utf-8":
        changed.append("with a UTF-8 byte-order mark" if encoding == "utf-8-sig" else f"as {encoding.upper()}")
    if "\r\n" in text:
        changed.append("with CRLF line ends")
    elif "\r" in text:
        changed.append("with CR line ends")
    return changed


def read_text_lines(path: str | os.PathLike, what: str, notes: list | None = None) -> list[str]:
    """The lines of `read_user_text(path, what, notes)`, each stripped of surrounding whitespace (tabs, trailing
    blanks)."""
    return [line.strip() for line in read_user_text(path, what, notes).split("\n")]


def normalize_name(name: str) -> str:
    """A class name in Unicode NFC, so that a folder name macOS stored decomposed (NFD) equals its typed form."""
    return unicodedata.normalize("NFC", name)
