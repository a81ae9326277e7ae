"""
Writing files so that readers never see a half-written one (`atomic_write_text`); checking an output path before
the work starts (`check_output_path`); holding an output folder so that two runs never write into it (`OutputLock`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import filelock

from hf_fss.cli import os_error_line


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and a rename (parents are created)."""
    path = Path(path)
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
            except filelock.Timeout:
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
            if holder.get("host") == socket.gethostname() and holder.get("pid") != os.getpid() and _pid_alive(holder):
                self._lock.release()  # a file system without flock: the record is all there is
                raise self._in_use(holder)
            say(f"{self.flag} {self.target}: taking over the lock of a run that ended without releasing it "
                f"({self._describe(holder)})")  # fmt: skip
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "command": sys.argv}
        atomic_write_text(self.record, json.dumps(record))
        return self

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


def _pid_alive(holder: dict) -> bool:
    try:
        os.kill(int(holder["pid"]), 0)
    except (ProcessLookupError, KeyError, TypeError, ValueError):
        return False
    except OSError:  # another user's process (EPERM): alive
        return True
    return True
