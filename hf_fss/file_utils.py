"""
Writing files so that readers never see a half-written one (`atomic_write_text`); checking an output path before
the work starts (`check_output_path`); holding an output folder so that two runs never write into it (`OutputLock`).
"""

from __future__ import annotations

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
    existing = path if path.exists() else path.parent
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


class OutputLock:
    """
    A run's hold on its output folder, so that two runs never write into the same one.

    The atomic part is `filelock.FileLock` (an `flock` on `<folder>/.hf_fss.lock`, which the kernel releases when
    the process dies, however it dies); `<folder>/.hf_fss.lock.json` records the holder (host, pid, start, command)
    so a refused run can name it, and is removed on release. Finding that record while getting the lock means its
    run died without releasing: the lock is taken over with a line saying so. The lock file itself stays (removing
    it would let a waiter lock a deleted file while a third run locks a new one).
    """

    def __init__(self, folder: str | os.PathLike, flag: str = "--output-dir"):
        self.folder, self.flag = Path(folder), flag
        self.record = self.folder / f"{LOCK_NAME}.json"
        self._lock = filelock.FileLock(str(self.folder / LOCK_NAME), timeout=0)

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

    def acquire(self, say: Callable[[str], None] = print) -> OutputLock:
        """
        Hold the folder (which must exist). `say` reports a stale lock taken over.

        Raises:
            `ValueError`: another live run holds it (named, with what to do).
        """
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise ValueError(
                f"{self.flag} {str(self.folder)!r} is in use by another run ({self._describe(self._holder())}); "
                f"wait for it to finish or choose another {self.flag}"
            ) from None
        holder = self._holder()
        if holder is not None:
            if holder.get("host") == socket.gethostname() and holder.get("pid") != os.getpid() and _pid_alive(holder):
                self._lock.release()  # a file system without flock: the record is all there is
                raise ValueError(
                    f"{self.flag} {str(self.folder)!r} is in use by another run ({self._describe(holder)}); "
                    f"wait for it to finish or choose another {self.flag}"
                )
            say(f"{self.flag} {self.folder}: taking over the lock of a run that ended without releasing it "
                f"({self._describe(holder)})")  # fmt: skip
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "command": sys.argv}
        atomic_write_text(self.record, json.dumps(record))
        return self

    def release(self) -> None:
        """Remove the holder record and release the lock (idempotent)."""
        if self._lock.is_locked:
            self.record.unlink(missing_ok=True)
            self._lock.release()

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _pid_alive(holder: dict) -> bool:
    try:
        os.kill(int(holder["pid"]), 0)
    except (ProcessLookupError, KeyError, TypeError, ValueError):
        return False
    except OSError:  # another user's process (EPERM): alive
        return True
    return True
