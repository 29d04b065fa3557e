"""Output folders of batch commands (``predict``, ``visualize``, ``preprocess``): one writer, our files only.

:class:`OutputFolder` claims an ``--out`` folder for one command run:

* **One writer.** An advisory lock (``fcntl.flock``) on ``OUT/.mammogmic.lock`` is held for the whole run.
  A second run into the same folder fails at once with :class:`OutputFolderError` (the CLI exits with
  status 2), or waits for the first with ``wait=True`` (``--wait``).
* **Our folder or a new one.** ``OUT/.mammogmic-out.json`` (the marker) names the command that owns the
  folder and every top-level file or folder it has written there. A folder holding anything else is
  refused unless ``force=True`` (``--force``); a file or folder that has an output's name but that the
  marker does not list (a user's own ``errors.csv``) is never overwritten, not even with ``force``. A
  folder owned by another command (``preprocess`` vs ``predict``) is refused too.
* **Atomic writes.** :func:`atomic_write_text` / :func:`atomic_write_bytes` write through a temporary file
  in the same folder and rename it, so a crash never leaves half a file. Temporary files left by a crash
  (``.<name>.XXXXXXXX.tmp``, ``.<name>.tmp``, ``<name>.tmp``) are recognised as ours and removed when the folder is claimed.

* **No empty folder from a failed start.** A folder that this run created and that holds nothing but the
  lock and the marker when the run ends (an error before any output) is removed again, with the parent
  folders created for it; :func:`removed_if_unused` does the same for commands without an ``OutputFolder``.

Operating-system litter (``.DS_Store``, ``Thumbs.db``, ``desktop.ini``) is ignored. On file systems that do
not support locks the run goes on with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from mammogmic.errors import MammogmicError

logger = logging.getLogger(__name__)

__all__ = [
    "LOCK_NAME",
    "MARKER_NAME",
    "OutputFolder",
    "OutputFolderError",
    "OutputLayout",
    "atomic_write_bytes",
    "atomic_write_text",
    "removed_if_unused",
]

MARKER_NAME = ".mammogmic-out.json"
LOCK_NAME = ".mammogmic.lock"
_IGNORED = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
_SHOWN = 5  # foreign names quoted in a message


class OutputFolderError(MammogmicError):
    """An output folder cannot be used: busy (another run writes there) or holding files we did not write."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder (no half-written files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


@dataclass(frozen=True)
class OutputLayout:
    """What one command may write at the top of its output folder.

    Attributes:
        command: command name recorded in the marker (``predict``, ``visualize``, ``preprocess``).
        files: output file names.
        dirs: output folder names.
    """

    command: str
    files: frozenset[str]
    dirs: frozenset[str] = frozenset()

    @property
    def names(self) -> frozenset[str]:
        return self.files | self.dirs


def _is_our_temp(name: str, layout: OutputLayout) -> bool:
    """A temporary file one of our atomic writers leaves behind when killed mid-write: ``.<name>.XXXXXXXX.tmp``
    (:func:`atomic_write_bytes`), ``.<name>.tmp`` (``write_json``) or ``<name>.tmp`` (``save_manifest``)."""
    return any(
        re.fullmatch(rf"\.?{re.escape(known)}(\.[a-z0-9_]{{8}})?\.tmp", name)
        for known in (*layout.names, MARKER_NAME.lstrip("."))
    )


def _first_missing(path: Path) -> Path | None:
    """The topmost folder that ``path.mkdir(parents=True)`` would create, or ``None`` when ``path`` exists."""
    path = Path(os.path.abspath(path))
    if os.path.lexists(path):
        return None
    top = path
    while not os.path.lexists(top.parent) and top.parent != top:
        top = top.parent
    return top


def _remove_if_unused(path: Path, created: Path, ours: Collection[str] = ()) -> bool:
    """Remove ``path`` and the parents up to ``created`` when it holds nothing but the files ``ours`` and empty
    folders; returns whether it did. Anything else in it (an output, a user's file) keeps everything."""
    path = Path(os.path.abspath(path))
    try:
        entries = list(os.scandir(path))
    except OSError:
        return False
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if not _empty_dir(entry.path):
                return False
        elif entry.name not in ours:
            return False
    try:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                os.rmdir(entry.path)
            else:
                os.unlink(entry.path)
        folder = path
        while True:
            os.rmdir(folder)  # fails (and stops) on a folder that is not empty
            if folder == created or not folder.is_relative_to(created):
                break
            folder = folder.parent
    except OSError:
        return False
    return True


@contextlib.contextmanager
def removed_if_unused(path: Path) -> Iterator[None]:
    """Remove ``path`` on leaving the block when the block created it and left it empty (so that a command that
    fails before writing anything leaves no empty ``--out`` behind). A folder that existed is never removed."""
    created = _first_missing(path)
    try:
        yield
    finally:
        if created is not None:
            _remove_if_unused(path, created)


def _empty_dir(path: str) -> bool:
    with os.scandir(path) as entries:
        return next(entries, None) is None


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock without waiting; False when another process holds it."""
    if sys.platform == "win32":
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


class OutputFolder:
    """A claimed output folder: locked for this run, checked to hold only our files, marked as ours.

    Use as a context manager; the lock is released on exit.

    Args:
        path: the folder (created with its parents).
        layout: what the command writes there.
        force: accept files we did not write beside ours (never overwriting any of them).
        wait: wait for another run holding the folder instead of failing.
        poll_s: seconds between lock attempts while waiting.
        option: the command-line option that named the folder, for messages (``--out``, ``--dicom-out``).

    Raises:
        OutputFolderError: (on enter) the folder is busy, owned by another command, or holds files we did
            not write (see the module docstring).
    """

    def __init__(
        self,
        path: Path,
        layout: OutputLayout,
        *,
        force: bool = False,
        wait: bool = False,
        poll_s: float = 0.2,
        option: str = "--out",
    ) -> None:
        self.path = Path(path)
        self.option = option
        self.layout = layout
        self.force = force
        self.wait = wait
        self.poll_s = poll_s
        self._fd: int | None = None
        self._owned: set[str] = set()
        self._created: Path | None = None  # the topmost folder this run created, removed again if left unused

    def __enter__(self) -> OutputFolder:
        if self.path.exists() and not self.path.is_dir():
            raise OutputFolderError(f"{self.path}: the output folder is an existing file")
        while True:
            self._open()
            try:
                self._lock()
                if self._lock_is_current():
                    self._check()
                    self._write_marker()
                    return self
            except BaseException:
                self._release()
                raise
            # The run we waited for failed to start and removed the folder it had created: start again.
            self._release()

    def _open(self) -> None:
        self._created = _first_missing(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputFolderError(
                f"{self.path}: cannot create the output folder ({exc.strerror or exc})"
            ) from exc
        lock = self.path / LOCK_NAME
        try:
            # Never through a link: the lock file is truncated, and a link could point at a user's file.
            self._fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as exc:
            self._release()
            raise OutputFolderError(
                f"{lock}: cannot open the lock file ({exc.strerror or exc}); choose another {self.option}"
            ) from exc

    def _lock_is_current(self) -> bool:
        """Whether the lock file we hold is still the folder's (not one removed while we waited for it)."""
        assert self._fd is not None
        try:
            on_disk = os.stat(self.path / LOCK_NAME, follow_symlinks=False)
        except FileNotFoundError:
            return False
        held = os.fstat(self._fd)
        return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._release()

    def _lock(self) -> None:
        assert self._fd is not None
        waited = False
        while True:
            try:
                taken = _try_lock(self._fd)
            except OSError as exc:  # e.g. ENOLCK: a network file system without lock support
                logger.warning(
                    "%s: cannot lock the output folder (%s); concurrent runs into it are not detected",
                    self.path,
                    exc.strerror or exc,
                )
                return
            if taken:
                os.ftruncate(self._fd, 0)
                os.lseek(self._fd, 0, os.SEEK_SET)
                os.write(self._fd, f"{os.getpid()} {self.layout.command}\n".encode())
                return
            holder = self._holder()
            if not self.wait:
                raise OutputFolderError(
                    f"{self.path}: another mammogmic run{holder} is writing into this folder; wait for it to "
                    f"finish (or pass --wait), or choose another {self.option}"
                )
            if not waited:
                print(f"{self.path}: waiting for another mammogmic run{holder} to finish...", file=sys.stderr)
                waited = True
            time.sleep(self.poll_s)

    def _holder(self) -> str:
        """`` (pid 123, predict)`` from the lock file, best effort."""
        try:
            pid, _, command = (self.path / LOCK_NAME).read_text(encoding="utf-8").strip().partition(" ")
        except (OSError, UnicodeDecodeError):
            return ""
        return f" (pid {pid}, {command})" if pid.isdigit() else ""

    def _release(self) -> None:
        if self._created is not None:
            # A folder this run created and wrote nothing into goes again, removed while we still hold the
            # lock: a run waiting for it then finds its lock file gone and starts again (_lock_is_current).
            _remove_if_unused(self.path, self._created, (LOCK_NAME, MARKER_NAME))
            self._created = None
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def _read_marker(self) -> dict[str, Any] | None:
        marker = self.path / MARKER_NAME
        if not marker.exists():
            return None
        try:
            data = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise OutputFolderError(
                f"{marker}: not a mammogmic output marker ({exc}); choose another {self.option}"
            ) from None
        if not (isinstance(data, dict) and isinstance(data.get("files"), list) and "command" in data):
            raise OutputFolderError(f"{marker}: not a mammogmic output marker; choose another {self.option}")
        return data

    def _check(self) -> None:
        marker = self._read_marker()
        command = self.layout.command
        if marker is not None and marker["command"] != command:
            raise OutputFolderError(
                f"{self.path} holds the outputs of 'mammogmic {marker['command']}'; 'mammogmic {command}' "
                f"writes into its own folder: choose another {self.option}"
            )
        self._owned = {str(name) for name in marker["files"]} if marker else set()
        clashes: list[str] = []
        foreign: list[str] = []
        for entry in sorted(os.scandir(self.path), key=lambda e: e.name):
            name = entry.name
            if name in (LOCK_NAME, MARKER_NAME) or name in _IGNORED:
                continue
            if _is_our_temp(name, self.layout):
                Path(entry.path).unlink(missing_ok=True)  # left by a killed run; we hold the lock
                continue
            if name in self._owned:
                continue
            if (
                name in self.layout.dirs
                and entry.is_dir(follow_symlinks=False)
                and not any(os.scandir(entry))
            ):
                continue  # an empty folder of ours-to-be holds nothing to lose
            (clashes if name in self.layout.names else foreign).append(name)
        if clashes:
            raise OutputFolderError(
                f"{self.path}: {_names(clashes)} {'was' if len(clashes) == 1 else 'were'} not written by "
                f"'mammogmic {command}' here and would be overwritten; files that are not ours are never "
                f"overwritten: choose another {self.option} (or move them away)"
            )
        if foreign and not self.force:
            raise OutputFolderError(
                f"{self.path} holds {len(foreign)} file(s) or folder(s) that 'mammogmic {command}' did not "
                f"write ({_names(foreign)}); choose a new or empty {self.option}, or pass --force to write beside them "
                "(they are never overwritten)"
            )
        if foreign:
            logger.warning(
                "%s: writing beside %d file(s) we did not write (--force)", self.path, len(foreign)
            )

    def _write_marker(self) -> None:
        content = {
            "written_by": "mammogmic",
            "command": self.layout.command,
            "files": sorted(self._owned),
        }
        atomic_write_text(self.path / MARKER_NAME, json.dumps(content, indent=1) + "\n")

    def owns(self, name: str) -> bool:
        """Whether the top-level entry ``name`` was written by this command (now or in an earlier run)."""
        return name in self._owned

    def claim(self, *names: str) -> None:
        """Record top-level outputs as ours before writing them (the marker lists them from then on).

        Raises:
            ValueError: a name that is not part of the command's layout.
        """
        new = [n for n in names if n not in self._owned]
        for name in new:
            if name not in self.layout.names:
                raise ValueError(f"{name!r} is not an output of 'mammogmic {self.layout.command}'")
        if new:
            self._owned.update(new)
            self._write_marker()

    def remove(self, *names: str) -> None:
        """Delete outputs of an earlier run (only those this command wrote)."""
        for name in names:
            if not self.owns(name):
                continue
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")
