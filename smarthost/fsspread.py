"""Spread a directory's subdirectories over the filesystem (ext4's TOPDIR attribute, `chattr +T`).

ext4 places a new file's inode in its directory's block group, and a new
subdirectory near its parent's, so a root made in one go keeps the queue's
directories and the Maildirs in one group. Where ext4 runs without a journal
(some virtual machines' disks), it will not reuse an inode freed in the last
few seconds, or minutes while that inode's table block is unwritten, and every
new inode in the group starts its search by stepping past all of those: the
queue's churn of two inodes a message then slows every file created near it,
Maildir deliveries included, to the order of a millisecond of CPU each.
TOPDIR makes the allocator place each new subdirectory in a group of its own
choosing (one with few directories and many free inodes), so the queue's
pid/, intd/ and info/ churn in groups apart from each other and from the
homes. With a journal the attribute changes nothing that matters. It is a
hint: elsewhere (tmpfs, XFS, no permission) it is quietly not set.
"""

from __future__ import annotations

import fcntl
import os
import struct
from typing import Callable, TypeVar

T = TypeVar("T")

#: <linux/fs.h>: FS_IOC_GETFLAGS and FS_IOC_SETFLAGS are _IOR/_IOW('f', 1|2, long),
#: though the kernel reads and writes an int through them.
_LONG = struct.calcsize("l")
FS_IOC_GETFLAGS = 0x80006601 | (_LONG << 16)
FS_IOC_SETFLAGS = 0x40006602 | (_LONG << 16)
FS_TOPDIR_FL = 0x00020000


def flags(path: str) -> int | None:
    """The inode flags of directory `path` (chattr's), or None where the filesystem has none."""
    return _on_dir(path, _get)


def spread_subdirs(path: str) -> bool:
    """Mark directory `path` TOPDIR for subdirectories made from now on; True if it is."""
    def mark(fd: int) -> bool:
        current = _get(fd)
        if not current & FS_TOPDIR_FL:
            _set(fd, current | FS_TOPDIR_FL)
        return True
    return bool(_on_dir(path, mark))


def _on_dir(path: str, fn: Callable[[int], T]) -> T | None:
    """fn(descriptor of directory `path`), or None on any OSError (not a directory, no flags)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return fn(fd)
    except OSError:
        return None
    finally:
        os.close(fd)


def _get(fd: int) -> int:
    buf = bytearray(_LONG)
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
    return struct.unpack_from("i", buf)[0]


def _set(fd: int, value: int) -> None:
    buf = bytearray(_LONG)
    struct.pack_into("i", buf, 0, value)
    fcntl.ioctl(fd, FS_IOC_SETFLAGS, buf)
