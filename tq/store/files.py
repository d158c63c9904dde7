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
    with open(tmp, "wb") as f:  # a file object: no short write is left unfinished
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
