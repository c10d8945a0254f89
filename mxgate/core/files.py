"""Private state: the state directory is 0700 and every file mxgate writes is 0600, whatever the umask.

Mail (queue), senders and subjects (tracking log), TLS-RPT counts and users' password hashes are nobody else's
business. ``mxgate run`` sets the process umask to 077 (so anything created later, by us or a plugin, is private),
and each store creates its file through :func:`private_file` first, so the modes hold when mxgate is used as a
library too. SQLite gives a database's ``-wal``, ``-shm`` and ``-journal`` files the mode of the database file.
Files left group/world-readable by an older version are tightened when opened; a state directory that others can
enter is the operator's choice, named in a start-up warning (:func:`state_dir_problem`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

__all__ = ["PRIVATE_UMASK", "SQLITE_COMPANIONS", "open_private", "private_dir", "private_file", "state_dir_problem"]

PRIVATE_UMASK: Final = 0o077
SQLITE_COMPANIONS: Final = ("-wal", "-shm", "-journal")


def private_dir(path: Path) -> Path:
    """``mkdir -p``; the directories it creates are 0700. An existing directory is left as it is."""
    missing: list[Path] = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for created in reversed(missing):
        os.chmod(created, 0o700)  # mkdir's mode passes through the umask, which may take the owner's bits
    return path


def _tighten(fd: int) -> None:
    st = os.fstat(fd)
    if st.st_mode & 0o077 and st.st_uid == os.geteuid():
        os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o600 or 0o600)


def private_file(path: Path, *, companions: tuple[str, ...] = ()) -> Path:
    """Create ``path`` 0600 when it does not exist (its parent 0700 likewise); remove group and world bits from it
    and from existing ``path + suffix`` companions (``SQLITE_COMPANIONS`` for a database) when it does."""
    private_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        _tighten(fd)
    finally:
        os.close(fd)
    for suffix in companions:
        try:
            fd = os.open(f"{path}{suffix}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            _tighten(fd)
        finally:
            os.close(fd)
    return path


def open_private(path: Path) -> int:
    """A descriptor for ``path`` opened for appending (created 0600), for :func:`os.fdopen`."""
    private_dir(path.parent)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    _tighten(fd)
    return fd


def state_dir_problem(path: Path) -> str | None:
    """A warning when users other than mxgate's may enter or list the state directory."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    if not mode & 0o077:
        return None
    return (
        f"state directory {str(path)!r} is group- or world-accessible (mode {mode:04o}): queued mail, senders and "
        f"subjects may be readable by other users; chmod 700 it"
    )
