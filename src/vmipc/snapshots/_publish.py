"""Publishing a file atomically: written under a temporary name beside its final one
(``O_EXCL``), then fsynced, renamed into place and the directory fsynced. The final name
holds the previous file or the complete new one, never a part of one."""

from __future__ import annotations

import contextlib
import os
import secrets


def temp_path_for(path: str) -> str:
    """A temporary name in the same directory as ``path`` (so the rename is atomic)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{secrets.token_hex(4)}.partial")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class PendingFile:
    """A file on its way to ``path``: :meth:`create` it under :attr:`temp`, write it
    through :attr:`fd`, then :meth:`publish` it — or :meth:`discard` it, which removes the
    temporary file only if this object created it and has not renamed it (whatever else
    is at that name belongs to someone else). Blocking; use it from a thread in trio."""

    def __init__(self, path: str, temp: str | None = None) -> None:
        self.path = path
        self.temp = temp_path_for(path) if temp is None else temp
        self.fd = -1
        #: this object created :attr:`temp` (``O_EXCL``) and has not renamed it
        self.created = False

    def create(self) -> int:
        """Create the temporary file (read-write, mode 0600); raises FileExistsError if
        something is at its name already. Returns the fd."""
        self.fd = os.open(self.temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.created = True
        return self.fd

    def publish(self) -> int:
        """fsync the file, rename it to :attr:`path`, fsync the directory; returns the
        file's size. The fd stays open (:meth:`close`)."""
        os.fsync(self.fd)
        size = os.fstat(self.fd).st_size
        os.rename(self.temp, self.path)
        self.created = False  # the file is the final name's now
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        return size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Close, and remove the temporary file if it is ours."""
        self.close()
        if self.created:
            unlink_quietly(self.temp)
            self.created = False
