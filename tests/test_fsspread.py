"""The root and the queue spread their subdirectories over ext4's block groups (fsspread)."""

import os

import pytest

from smarthost import fsspread
from smarthost.init import init
from smarthost.queue import filesystem_type


@pytest.fixture
def ext4_dir(tmp_path):
    if filesystem_type(str(tmp_path)) not in ("ext2", "ext3", "ext4"):
        pytest.skip(f"TOPDIR is an ext2/3/4 attribute; {tmp_path} is on {filesystem_type(str(tmp_path)) or 'unknown'}")
    return tmp_path


def test_init_marks_root_and_queue_topdir(ext4_dir):
    root = init(str(ext4_dir / "root"), me="example.invalid")
    for path in (root.path, root.queue_dir):
        assert fsspread.flags(path) & fsspread.FS_TOPDIR_FL, path
    # an ordinary directory below is not marked: only the tops spread their children
    assert not fsspread.flags(root.sub("control")) & fsspread.FS_TOPDIR_FL
    # idempotent, and the other flags are kept
    before = fsspread.flags(root.path)
    init(root.path, me="example.invalid")
    assert fsspread.flags(root.path) == before


def test_queue_dirs_leave_the_parents_block_group(ext4_dir):
    """What the attribute is for: the queue's busy directories get inodes in other groups."""
    root = init(str(ext4_dir / "root"), me="example.invalid")
    ipg = _inodes_per_group(str(ext4_dir))
    groups = {os.stat(root.sub("queue", d)).st_ino // ipg for d in ("pid", "intd", "info", "todo")}
    groups.add(os.stat(root.sub("home")).st_ino // ipg)
    assert len(groups) >= 3, groups


def _inodes_per_group(path: str) -> int:
    # ext4 has 8 * block size blocks a group; statvfs gives the totals of both
    s = os.statvfs(path)
    blocks_per_group = 8 * s.f_frsize
    groups = -(-s.f_blocks // blocks_per_group)
    return max(1, s.f_files // groups)


def test_not_a_directory_or_missing_is_quietly_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert fsspread.spread_subdirs(str(f)) is False
    assert fsspread.spread_subdirs(str(tmp_path / "missing")) is False
    assert fsspread.flags(str(tmp_path / "missing")) is None
