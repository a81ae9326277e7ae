"""
Where each method's paper, its official code and hf_fss part ways: prose kept out of the code, as package data beside
the card templates (`hf_fss/model_cards/differences/<model_type>.md`, a Markdown list). The model cards and the docs
render it from there; each method's package exposes it as `DIFFERENCES_FROM_OFFICIAL_CODE` (or, for a method without
official code, `DIFFERENCES_FROM_PAPER`).
"""

from __future__ import annotations

from importlib import resources

__all__ = ["read_differences"]


def read_differences(model_type: str) -> tuple[str, ...]:
    """
    The items of `hf_fss/model_cards/differences/<model_type>.md`, one string per item: a line starting with `- `
    opens an item, an indented line continues it (joined with a space); anything else (the heading comment) is skipped.

    Returns:
        `tuple[str, ...]`: empty when the method has no such file (the cosine prior baseline).
    """
    path = resources.files(__package__) / "model_cards" / "differences" / f"{model_type}.md"
    if not path.is_file():
        return ()
    items: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("- "):
            items.append(line[2:].strip())
        elif line.startswith("  ") and items:
            items[-1] += " " + line.strip()
    return tuple(items)
