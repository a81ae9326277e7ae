"""
Writing files and folders so that readers never see a half-written one, and so that a failing command changes
nothing on disk:

- `atomic_write_text` / `write_json_atomic`: a file through a temporary sibling and a rename;
- `make_staging_dir` / `remove_stale_staging`: a hidden staging sibling folder of an output, named after its writer
  (`.{target.name}.{tag}.{host}.{pid}.{random}`, a plain mkdir's mode: `tempfile.mkdtemp` would give 0700, which a
  folder renamed into place keeps), so that the next run removes what a killed one left behind (its pid is dead on
  this host) and never what a live run is still writing. Folders of other hosts are left alone unless untouched
  for a day; folders in an older naming (`legacy` patterns, no pid) are removed when nothing in them changed since
  this process started;
- `replace_folder`: a complete staging folder put in place of an output folder (renames only, portable);
- `check_output_path`: an output path checked before the work starts;
- `OutputLock` / `hold_on_main_process`: an output held so that two runs never write into it.

Used by every command that writes (training checkpoints, `save_pretrained_with_card`, `prepare_dataset.py`,
`evaluate.py`, `compare.py`, `benchmark.py`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import filelock

from hf_fss.cli import os_error_line

__all__ = [
    "LOCK_NAME",
    "OutputLock",
    "atomic_write_text",
    "check_output_path",
    "give_plain_file_modes",
    "hold_on_main_process",
    "make_staging_dir",
    "remove_stale_staging",
    "replace_folder",
    "write_json_atomic",
]

logger = logging.getLogger(__name__)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and a rename (parents are created)."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a folder, a device (`/dev/null`), a fifo: never replaced by a file
        raise OSError(errno.EEXIST, "exists and is not a regular file, so it is not replaced", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(data: Any, path: str | os.PathLike) -> Path:
    """Write `data` as indented JSON to `path` atomically (temporary file in the same folder, then a rename)."""
    # NaN (an undefined IoU) is written as NaN, which Python's json reads back.
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


# ----------------------------------------------------------------------------------------------- staging folders

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


def replace_folder(
    new: str | os.PathLike,
    target: str | os.PathLike,
    carry: Callable[[str], bool] | None = None,
    backup: str | os.PathLike | None = None,
) -> None:
    """
    Put the complete folder `new` at `target` with renames only (`new` must be beside `target`, on its file system).

    An existing `target` is first renamed to `backup` (default: a fresh `make_staging_dir(target, "old")` name, which
    `remove_stale_staging(target, "old")` cleans up if this process dies in between), then `new` takes its place and
    the backup is removed. Entries of the old `target` for which `carry(name)` is true are moved into `new` first.
    Anything that fails puts the old folder back as it was (carried entries included) and re-raises. Between the two
    renames `target` is missing for an instant; readers that need it meanwhile must hold the output's lock.
    """
    new, target = Path(new), Path(target)
    if not target.exists():
        os.rename(new, target)
        return
    carried: list[str] = []
    moved = False
    if backup is None:
        backup = make_staging_dir(target, "old")
        backup.rmdir()  # only the unique name is wanted: the old folder is renamed to it
    backup = Path(backup)
    try:
        for entry in sorted(os.listdir(target)) if carry is not None else []:
            if carry(entry):
                os.rename(target / entry, new / entry)
                carried.append(entry)
        os.rename(target, backup)
        moved = True
        os.rename(new, target)
    except BaseException:
        if moved and not target.exists():
            os.rename(backup, target)
        for entry in carried:  # give the old folder back what was moved out of it
            if (new / entry).exists() and not (target / entry).exists():
                os.rename(new / entry, target / entry)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _holder_alive(holder: dict) -> bool:
    """Whether the process a lock record names (`pid`, on this host) is alive; False for a record without one."""
    try:
        pid = int(holder["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    return _pid_alive(pid)


# ------------------------------------------------------------------------------------------------ output folders


def check_output_path(path: str | os.PathLike, flag: str, folder: bool = True, needed_bytes: int = 0) -> None:
    """
    Check, before any work starts, that `path` (the value of `flag`) can be written: a folder (`folder=True`) or a
    file whose parents are folders, none of them a file, the nearest existing one writable, with `needed_bytes` free
    there (0: not checked). Nothing is created.

    Raises:
        `ValueError`: one line naming `flag`, the path and what to do.
    """
    path = Path(path)
    if path.exists() and not (path.is_dir() or path.is_file()):
        # A device, fifo or socket (`--output /dev/null`): the atomic rename would replace it with a plain file.
        raise ValueError(f"{flag} {str(path)!r} is not a regular file or folder; give a file or folder path")
    if path.exists() and path.is_dir() != folder:
        kind = "a file" if folder else "a folder"
        raise ValueError(f"{flag} {str(path)!r} is {kind}; give a {'folder' if folder else 'file'} path")
    existing = path if folder and path.exists() else path.parent  # a file is replaced by a rename in its folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: {str(existing)!r} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"{flag} {str(path)!r}: {str(existing)!r} is not writable by you; choose a folder you may write"
        )
    free = shutil.disk_usage(existing).free
    if needed_bytes and free < needed_bytes:
        raise ValueError(
            f"{flag} {str(path)!r}: {free / 2**20:.0f} MiB free there, about {needed_bytes / 2**20:.0f} MiB needed for "
            "its checkpoints and models; free some space or choose another folder"
        )


LOCK_NAME = ".hf_fss.lock"
# A taken lock file can vanish before flock is granted (its holder removed it on release): try again this often.
_LOCK_TRIES = 5


class OutputLock:
    """
    A run's hold on its output, so that two runs never write into the same one.

    The lock sits inside the output folder (`<folder>/.hf_fss.lock`), or with `beside=True` next to an output that
    is a file or a folder replaced whole (`<parent>/.<name>.hf_fss.lock`). The atomic part is `filelock.FileLock`
    (an `flock`, which the kernel releases when the process dies, however it dies); `<lock>.json` records the
    holder (host, pid, start, command) so a refused run can name it. Finding that record while getting the lock
    means its run died without releasing: the lock is taken over with a line saying so. Release removes the record
    and the lock file (the file while still locked: a run that opened it just before finds it gone once it gets the
    flock, and tries again on a new file), and the folders `acquire` created if they are still empty, so a finished
    run leaves nothing extra and a failed one nothing at all.
    """

    def __init__(self, target: str | os.PathLike, flag: str = "--output-dir", beside: bool = False):
        self.target, self.flag = Path(target), flag
        self.folder = self.target.parent if beside else self.target
        name = f".{self.target.name}{LOCK_NAME}" if beside else LOCK_NAME
        self.path = self.folder / name
        self.record = self.folder / f"{name}.json"
        self._lock = filelock.FileLock(str(self.path), timeout=0)
        self._created: list[Path] = []

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    @staticmethod
    def _describe(holder: dict | None) -> str:
        if not holder:
            return "holder unknown"
        return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"

    def _in_use(self, holder: dict | None) -> ValueError:
        return ValueError(
            f"{self.flag} {str(self.target)!r} is in use by another run ({self._describe(holder)}); "
            f"wait for it to finish or choose another {self.flag}"
        )

    def _native(self) -> tuple[bool, int | None]:
        """Whether the lock is an flock (not filelock's soft fallback), and the locked descriptor where known."""
        context = getattr(self._lock, "_context", None)
        return not getattr(context, "soft_fallback", False), getattr(context, "lock_file_fd", None)

    def _holds_current_file(self) -> bool:
        """Whether the file this process locked is still the one at the lock path (not removed by its last holder)."""
        native, fd = self._native()
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return not native
        return not native or fd is None or os.path.samestat(os.fstat(fd), current)

    def _make_folder(self) -> None:
        """Create the lock's folder and its missing parents, remembered (deepest first) to be removed if empty."""
        self._created = []
        for folder in [self.folder, *self.folder.parents]:
            if folder.exists():
                break
            self._created.append(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def acquire(self, say: Callable[[str], None] = print) -> OutputLock:
        """
        Hold the output (creating the lock's folder and its parents if missing); `say` reports a stale lock taken
        over. Holding already: nothing happens.

        Raises:
            `ValueError`: another live run holds it (named, with what to do).
            `OSError`: the folder cannot be created or written.
        """
        if self._lock.is_locked:
            return self
        self._make_folder()
        for attempt in range(_LOCK_TRIES):
            try:
                self._lock.acquire()
            except filelock.Timeout:  # filelock also says Timeout when it cannot create the lock file at all
                self._check_writable()
                holder = self._holder()
                if holder is None and attempt + 1 < _LOCK_TRIES:  # its holder may be releasing it right now
                    time.sleep(0.05)
                    continue
                self._remove_created()
                raise self._in_use(holder) from None
            if self._holds_current_file():
                break
            self._lock.release(force=True)
        else:
            self._remove_created()
            raise self._in_use(self._holder())
        holder = self._holder()
        if holder is not None:
            if (
                holder.get("host") == socket.gethostname()
                and holder.get("pid") != os.getpid()
                and _holder_alive(holder)
            ):
                self._lock.release()  # a file system without flock: the record is all there is
                raise self._in_use(holder)
            say(f"{self.flag} {self.target}: taking over the lock of a run that ended without releasing it "
                f"({self._describe(holder)})")  # fmt: skip
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "command": sys.argv}
        try:
            atomic_write_text(self.record, json.dumps(record))
        except OSError:  # a full disk has room for the empty lock file, not for the record: leave neither
            self.release()
            raise
        return self

    def _check_writable(self) -> None:
        """Raise the `OSError` of opening the lock file (an unwritable place, not a lock held by another run)."""
        try:
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644))  # a held lock's file exists: nothing made
        except OSError as err:
            self._remove_created()
            # Not a hint os_error_line knows (a /proc or sysfs folder says ENOENT): say what it means for the user.
            what = f"{err.strerror}: no file can be created there; choose a folder you may write"
            raise OSError(err.errno, what, str(self.path)) from None

    def release(self) -> None:
        """Remove the holder record and the lock file, release the lock and the empty folders it made (idempotent)."""
        if self._lock.is_locked:
            self.record.unlink(missing_ok=True)
            if self._native()[0]:  # (a soft lock's file is removed by its own release)
                self.path.unlink(missing_ok=True)  # while still locked: see the class docstring
            self._lock.release(force=True)
            self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote its output there
                break
        self._created = []

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def hold_on_main_process(lock: OutputLock, accelerator, held: contextlib.ExitStack) -> None:
    """
    Hold `lock` in the main process of `accelerate`'s `accelerator` only (released when `held` closes); a refusal
    there is raised in every process, so no process goes on alone.

    Raises:
        `ValueError`: another run holds the output, or its folder cannot be made (one line).
    """
    refused = [None]
    if accelerator.is_main_process:
        try:
            lock.acquire(say=accelerator.print)
            held.callback(lock.release)
        except ValueError as err:
            refused = [str(err)]
        except OSError as err:
            refused = [f"{lock.flag} {str(lock.target)!r}: {os_error_line(err)}"]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refused = broadcast_object_list(refused)
    if refused[0] is not None:
        raise ValueError(refused[0])
