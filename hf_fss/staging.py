"""
Staging folders for atomic saves: a hidden sibling of the output that is renamed into place when complete.

`make_staging_dir(target, tag)` creates `.{target.name}.{tag}.{host}.{pid}.{random}` beside `target` with the
mode a plain `mkdir` gives (0777 minus the umask; `tempfile.mkdtemp` would give 0700, which a folder renamed into
place keeps, so other users could not read the output). The writer's host and pid in the name let
`remove_stale_staging(target, tag)` tell a folder a killed run left behind (its pid is dead on this host) from one a
live run is still writing, and remove only the former. Folders of other hosts are left alone unless untouched for
a day; folders in an older naming (`legacy` patterns, no pid) are removed when nothing in them changed since this
process started.

Used by `scripts/prepare_dataset.py` (`hf_fss.data.builders.prepare`) and `hf_fss.hub.save_pretrained_with_card`.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["make_staging_dir", "remove_stale_staging"]

logger = logging.getLogger(__name__)

_PROCESS_STARTED = time.time()
_OTHER_HOST_IDLE_SECONDS = 24 * 3600


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname() or "host")


def make_staging_dir(target: str | os.PathLike, tag: str) -> Path:
    """A new empty staging folder beside `target` (whose parent must exist), named after this host and pid."""
    target = Path(target)
    for _ in range(100):
        path = target.parent / f".{target.name}.{tag}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            os.mkdir(path)  # mode 0o777 & ~umask, as a plain mkdir
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"cannot create a staging folder beside {target}")


def give_plain_file_modes(folder: str | os.PathLike) -> None:
    """
    Give every file under `folder` the mode a plain `open(..., "w")` would (0666 minus the umask): some writers
    (transformers' `save_pretrained` writes `model.safetensors` 0600) leave files other users cannot read.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return True  # cannot tell: keep the folder
    return True


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except OSError:
                continue
    return newest


def _is_stale(path: Path, rest: str) -> bool:
    """Whether the staging folder `path` (name tail `host.pid.random`) belongs to no live writer."""
    parts = rest.split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    host, pid = parts[0], int(parts[1])
    if host == _host():
        return not _pid_alive(pid)
    return time.time() - _newest_mtime(path) > _OTHER_HOST_IDLE_SECONDS


def remove_stale_staging(target: str | os.PathLike, tag: str, legacy: Iterable[str] = ()) -> list[Path]:
    """
    Remove the staging folders of `target` (made by `make_staging_dir(target, tag)`) whose writer is gone, and
    those matching a `legacy` regex (full name) untouched since this process started. Returns what was removed.
    """
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    prefix = f".{target.name}.{tag}."
    legacy_res = [re.compile(p) for p in legacy]
    removed = []
    for entry in parent.iterdir():
        name = entry.name
        try:
            if not entry.is_dir() or entry.is_symlink():
                continue
            if name.startswith(prefix):
                stale = _is_stale(entry, name[len(prefix) :])
            elif any(r.fullmatch(name) for r in legacy_res):
                stale = _newest_mtime(entry) < _PROCESS_STARTED
            else:
                continue
        except OSError:
            continue
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                logger.warning("removed %s, left behind by an interrupted run", entry)
                removed.append(entry)
    return removed
