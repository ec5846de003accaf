"""Files and directories that a crash, a ``kill -9`` or a full disk never leaves half-written.

Each is written to a hidden temporary sibling named after this host and process
(``.NAME.tmp-HOST-PID...``), flushed, and renamed into place (``os.replace`` / ``os.rename``,
atomic on POSIX). A killed writer leaves at most its temporary sibling, which nothing reads and
:func:`remove_stale_temp` removes once its process is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_directory", "atomic_write", "remove_stale_temp", "temp_sibling"]

_TMP_INFIX = ".tmp-"
# What follows the infix: the writer's host and pid, and a random suffix for unique names.
_OWNER = re.compile(r"^(?P<host>.+)-(?P<pid>\d+)(?:\.[0-9a-f]{8})?$")


def temp_sibling(path: str | os.PathLike, unique: bool = False) -> str:
    """A hidden sibling of ``path`` owned by this process: ``dir/.name.tmp-HOST-PID``
    (``.RANDOM`` appended when ``unique``, for several temporary files of one process)."""
    directory, name = os.path.split(os.fspath(path))
    suffix = f".{uuid.uuid4().hex[:8]}" if unique else ""
    return os.path.join(
        directory, f".{name}{_TMP_INFIX}{socket.gethostname()}-{os.getpid()}{suffix}"
    )


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO[Any]], Any], mode: str = "wb"
) -> None:
    """Create or replace the file ``path`` atomically: ``write(f)`` fills a temporary sibling,
    which is flushed to disk and renamed to ``path``. If anything fails (or the process is
    killed) ``path`` is unchanged; the temporary file is removed on failure."""
    tmp = temp_sibling(path)
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_directory(os.path.dirname(os.fspath(path)))


def atomic_directory(final: Path, fill: Callable[[Path], Any]) -> Path:
    """``final``, made by ``fill(directory)`` unless it exists: ``fill`` writes a temporary
    sibling directory, which is renamed to ``final`` when complete. Concurrent callers (e.g.
    several training processes) each write their own copy and the first rename wins."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp(final.parent, final.name)
    tmp = Path(temp_sibling(final, unique=True))
    try:
        fill(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another process: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp(directory: str | os.PathLike, name: str = "") -> list[str]:
    """Remove the temporary siblings (of ``name``, or of anything when empty) that processes of
    this host, now dead, left in ``directory``. Returns their paths."""
    host = socket.gethostname()
    removed = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return removed
    for entry in entries:
        if not entry.startswith(f".{name}") or _TMP_INFIX not in entry:
            continue
        owner = _OWNER.match(entry.rsplit(_TMP_INFIX, 1)[1])
        if not owner or owner["host"] != host or _pid_alive(int(owner["pid"])):
            continue
        path = os.path.join(os.fspath(directory), entry)
        try:
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except OSError:
            continue
        removed.append(path)
    return removed
