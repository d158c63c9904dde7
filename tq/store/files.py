"""Small durable-file helpers shared by the journals (single node and Raft)."""

from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """Make a rename or a new file in ``path`` durable (the directory entry is data too)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str, data: bytes) -> None:
    """Write a small file atomically and durably: tmp, fsync, rename, fsync dir."""
    tmp = path + ".tmp"
    # owner-only: these files hold task payloads (the Raft journal) or cluster state
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:  # a file object: no short write is left unfinished
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
