"""Maildir and mbox writers: one contract run against both, then each format's own rules."""

from __future__ import annotations

import errno
import fcntl
import io
import os
import re
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from miniqmail import maildir, mbox

MESSAGE = b"Received: from x\nSubject: hi\n\nbody line\nFrom me\n"


class FailingSource(io.RawIOBase):
    """A message that can be read for `good` bytes, then the disk under it fails."""

    def __init__(self, good: bytes):
        self.data = io.BytesIO(good)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        n = self.data.readinto(b)
        if n == 0:
            raise OSError(errno.EIO, "Input/output error")
        return n


class CountingSource(io.RawIOBase):
    """A large generated message that records every read request's size."""

    def __init__(self, size: int, line: bytes = b"x" * 99 + b"\n"):
        self.left = size
        self.line = line
        self.requests: list[int] = []

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        self.requests.append(n)
        assert 0 < n <= 1 << 20, "reads must be bounded"
        n = min(n, self.left)
        self.left -= n
        return (self.line * (n // len(self.line) + 1))[:n]

    def readline(self, n: int = -1) -> bytes:  # type: ignore[override]
        self.requests.append(n)
        assert 0 < n <= 1 << 20, "line reads must be bounded"
        n = min(n, len(self.line), self.left)
        self.left -= n
        return self.line[:n]


class MailboxContract:
    """What every writer promises: the message lands whole, or not at all."""

    def target(self, tmp_path) -> str:
        raise NotImplementedError

    def deliver(self, target: str, source, prefix: bytes = b"") -> None:
        raise NotImplementedError

    def messages(self, target: str) -> list[bytes]:
        """The delivered messages as a reader gets them back (prefix included)."""
        raise NotImplementedError

    def snapshot(self, target: str) -> object:
        raise NotImplementedError

    def test_prefix_then_message(self, tmp_path):
        t = self.target(tmp_path)
        self.deliver(t, io.BytesIO(MESSAGE), b"Return-Path: <a@b>\nDelivered-To: c@d\n")
        assert self.messages(t) == [b"Return-Path: <a@b>\nDelivered-To: c@d\n" + MESSAGE]

    def test_reads_from_current_position(self, tmp_path):
        t = self.target(tmp_path)
        src = io.BytesIO(b"SKIPPED\n" + MESSAGE)
        src.seek(8)
        self.deliver(t, src)
        assert self.messages(t) == [MESSAGE]

    def test_many_deliveries_all_kept(self, tmp_path):
        t = self.target(tmp_path)
        for i in range(200):
            self.deliver(t, io.BytesIO(b"Subject: %d\n\nbody\n" % i))
        got = self.messages(t)
        assert sorted(got) == sorted(b"Subject: %d\n\nbody\n" % i for i in range(200))

    def test_read_error_leaves_nothing(self, tmp_path):
        t = self.target(tmp_path)
        self.deliver(t, io.BytesIO(MESSAGE))
        before = self.snapshot(t)
        with pytest.raises(OSError):
            self.deliver(t, io.BufferedReader(FailingSource(MESSAGE * 100)), b"X: y\n")
        assert self.snapshot(t) == before
        assert self.messages(t) == [MESSAGE]

    def test_streams_in_bounded_reads(self, tmp_path):
        t = self.target(tmp_path)
        src = CountingSource(5_000_000)
        self.deliver(t, src)
        assert src.left == 0
        assert max(src.requests) <= 64 * 1024


class TestMaildirContract(MailboxContract):
    def target(self, tmp_path) -> str:
        path = str(tmp_path / "Maildir")
        maildir.make(path)
        return path

    def deliver(self, target, source, prefix=b""):
        maildir.deliver(target, source, prefix)

    def messages(self, target):
        new = os.path.join(target, "new")
        return [open(os.path.join(new, n), "rb").read() for n in os.listdir(new)]

    def snapshot(self, target):
        return {sub: sorted(os.listdir(os.path.join(target, sub))) for sub in ("tmp", "new", "cur")}

    def test_final_line_without_lf_kept_as_is(self, tmp_path):
        t = self.target(tmp_path)
        self.deliver(t, io.BytesIO(b"Subject: x\n\nno newline"))
        assert self.messages(t) == [b"Subject: x\n\nno newline"]


class TestNamedMaildirContract(TestMaildirContract):
    """The same promises where the system makes no unnamed files: qmail's tmp/NAME."""

    @pytest.fixture(autouse=True)
    def _named(self, monkeypatch):
        monkeypatch.setattr(maildir, "UNNAMED", False)


class TestMboxContract(MailboxContract):
    def target(self, tmp_path) -> str:
        return str(tmp_path / "Mailbox")

    def deliver(self, target, source, prefix=b""):
        mbox.deliver(target, source, sender="a@b", prefix=prefix, now=0)

    def messages(self, target):
        # A minimal mboxrd reader: split at From_ lines, unquote, drop the separator line.
        data = open(target, "rb").read()
        out = []
        for part in re.split(rb"(?m)^From [^\n]*\n", data)[1:]:
            assert part.endswith(b"\n\n")
            out.append(re.sub(rb"(?m)^>(>*From )", rb"\1", part[:-1]))
        return out

    def snapshot(self, target):
        return open(target, "rb").read()

    def test_final_line_without_lf_gets_one(self, tmp_path):
        t = self.target(tmp_path)
        self.deliver(t, io.BytesIO(b"Subject: x\n\nno newline"))
        assert open(t, "rb").read() == (b"From a@b Thu Jan 01 00:00:00 1970\n"
                                        b"Subject: x\n\nno newline\n\n")


# --- Maildir only ------------------------------------------------------------

NAME_RE = re.compile(r"^\d+\.M\d+P%dQ\d+\.[^/:]+$" % os.getpid())


@pytest.mark.parametrize("unnamed", [True, False])
def test_maildir_name_format_and_uniqueness(tmp_path, monkeypatch, unnamed):
    monkeypatch.setattr(maildir, "UNNAMED", unnamed and maildir.UNNAMED)
    path = str(tmp_path / "Maildir")
    maildir.make(path)
    names = [maildir.deliver(path, io.BytesIO(b"x\n")) for _ in range(500)]
    assert len(set(names)) == 500
    assert all(NAME_RE.match(n) for n in names)
    assert sorted(os.listdir(os.path.join(path, "new"))) == sorted(names)
    assert os.listdir(os.path.join(path, "tmp")) == []


def test_maildir_host_escaped(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "we/ird:host")
    assert maildir.unique_name().endswith(".we\\057ird\\072host")


def test_maildir_make_fails_if_exists(tmp_path):
    path = str(tmp_path / "M")
    maildir.make(path)
    assert sorted(os.listdir(path)) == ["cur", "new", "tmp"]
    assert os.stat(path).st_mode & 0o777 == 0o700
    with pytest.raises(FileExistsError):
        maildir.make(path)


def test_maildir_missing(tmp_path):
    with pytest.raises(maildir.MaildirMissing, match="maildir not found"):
        maildir.deliver(str(tmp_path / "nope"), io.BytesIO(b"x\n"))


def test_maildir_without_new_leaves_no_tmp_file(tmp_path):
    path = str(tmp_path / "M")
    maildir.make(path)
    os.rmdir(os.path.join(path, "new"))
    with pytest.raises(maildir.MaildirError) as info:
        maildir.deliver(path, io.BytesIO(b"x\n"))
    assert not isinstance(info.value, maildir.MaildirMissing)
    assert isinstance(info.value, OSError)
    assert os.listdir(os.path.join(path, "tmp")) == []


class WatchingSource(io.RawIOBase):
    """A message that lists `directory` each time it is read, as another reader would."""

    def __init__(self, data: bytes, directory: str):
        self.data = io.BytesIO(data)
        self.directory = directory
        self.seen: list[list[str]] = []

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        self.seen.append(sorted(os.listdir(self.directory)))
        return self.data.readinto(b)


@pytest.mark.skipif(not maildir.UNNAMED, reason="this system makes no unnamed files (O_TMPFILE)")
def test_maildir_file_unnamed_until_linked_into_new(tmp_path):
    path = str(tmp_path / "M")
    maildir.make(path)
    src = WatchingSource(MESSAGE * 3000, os.path.join(path, "tmp"))
    name = maildir.deliver(path, io.BufferedReader(src, 4096))
    assert len(src.seen) > 1 and all(seen == [] for seen in src.seen)
    st = os.stat(os.path.join(path, "new", name))
    assert st.st_nlink == 1 and st.st_mode & 0o777 == 0o600
    assert open(os.path.join(path, "new", name), "rb").read() == MESSAGE * 3000


@pytest.mark.skipif(not maildir.UNNAMED, reason="this system makes no unnamed files (O_TMPFILE)")
def test_maildir_where_proc_cannot_link_falls_back_to_named_files(tmp_path, monkeypatch):
    real_link = os.link

    def link(src, dst, **kw):
        if str(src).startswith("/proc/self/fd/"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_link(src, dst, **kw)

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(maildir, "_self_fd", None)  # restored afterwards
    path = str(tmp_path / "M")
    maildir.make(path)
    first = maildir.deliver(path, io.BytesIO(MESSAGE), b"X: 1\n")
    assert maildir._self_fd is False  # not tried again in this process
    src = WatchingSource(MESSAGE * 3000, os.path.join(path, "tmp"))
    second = maildir.deliver(path, io.BufferedReader(src, 4096))
    assert all(seen == [second] for seen in src.seen)
    assert open(os.path.join(path, "new", first), "rb").read() == b"X: 1\n" + MESSAGE
    assert open(os.path.join(path, "new", second), "rb").read() == MESSAGE * 3000
    assert os.listdir(os.path.join(path, "tmp")) == []


def test_maildir_named_tmp_file_while_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(maildir, "UNNAMED", False)
    path = str(tmp_path / "M")
    maildir.make(path)
    src = WatchingSource(MESSAGE * 3000, os.path.join(path, "tmp"))
    name = maildir.deliver(path, io.BufferedReader(src, 4096))
    assert all(seen == [name] for seen in src.seen)
    assert os.listdir(os.path.join(path, "tmp")) == []
    assert os.stat(os.path.join(path, "new", name)).st_nlink == 1


def test_maildir_rename_when_link_not_permitted(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(maildir, "UNNAMED", False)
    monkeypatch.setattr(os, "link", no_link)
    path = str(tmp_path / "M")
    maildir.make(path)
    name = maildir.deliver(path, io.BytesIO(b"hello\n"))
    assert open(os.path.join(path, "new", name), "rb").read() == b"hello\n"
    assert os.listdir(os.path.join(path, "tmp")) == []


# --- mbox only ---------------------------------------------------------------

def _body(tmp_path, message: bytes) -> bytes:
    path = str(tmp_path / "mbox")
    mbox.deliver(path, io.BytesIO(message), sender="s@h", now=0)
    data = open(path, "rb").read()
    head = b"From s@h Thu Jan 01 00:00:00 1970\n"
    assert data.startswith(head) and data.endswith(b"\n\n")
    return data[len(head):-1]


def test_mbox_from_quoting(tmp_path):
    msg = (b"From a\nFrom: header\n>From b\n>>From c\n From d\nFromage\n>>>\n"
           b"x From e\n>From\nFrom \n")
    assert _body(tmp_path, msg) == (b">From a\nFrom: header\n>>From b\n>>>From c\n From d\n"
                                    b"Fromage\n>>>\n" b"x From e\n>From\n>From \n")


def test_mbox_long_line_quoted_once(tmp_path):
    limit = mbox.READ_LIMIT
    line = b"From " + b"y" * (limit - 5) + b"From not-a-line-start " + b"z" * (limit * 2) + b"\n"
    assert _body(tmp_path, line + b"From next\n") == b">" + line + b">From next\n"


def test_mbox_quote_decision_across_read_boundary(tmp_path):
    # `>` run longer than the read limit, then `From `: still one line start.
    limit = mbox.READ_LIMIT
    msg = b">" * (limit + 3) + b"From x\n" + b">" * (limit - 3) + b"Fro" + b"m y\n"
    assert _body(tmp_path, msg) == b">" + msg.split(b"\n")[0] + b"\n>" + msg.split(b"\n")[1] + b"\n"


def _reference_quote(data: bytes) -> bytes:
    return re.sub(rb"(?m)^(>*From )", rb">\1", data)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"From ", b">", b"F", b"rom", b" ", b"x", b"\n", b"From"]),
                max_size=40).map(b"".join), st.integers(1, 9))
def test_quote_from_matches_reference_at_any_read_limit(data, limit):
    assert b"".join(mbox.quote_from(io.BytesIO(data), limit)) == _reference_quote(data)


def test_mbox_from_line():
    assert mbox.from_line("", 0) == b"From MAILER-DAEMON Thu Jan 01 00:00:00 1970\n"
    assert mbox.from_line("a b\tc\nd@e", 86400 * 4) == b"From a-b-c-d@e Mon Jan 05 00:00:00 1970\n"


def test_mbox_created_0600_and_appends(tmp_path):
    path = str(tmp_path / "mbox")
    mbox.deliver(path, io.BytesIO(b"one\n"), sender="", now=0)
    mbox.deliver(path, io.BytesIO(b"two"), sender="x@y", now=0)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert open(path, "rb").read() == (b"From MAILER-DAEMON Thu Jan 01 00:00:00 1970\none\n\n"
                                       b"From x@y Thu Jan 01 00:00:00 1970\ntwo\n\n")


def test_mbox_locked_times_out_and_is_untouched(tmp_path):
    path = str(tmp_path / "mbox")
    mbox.deliver(path, io.BytesIO(b"first\n"), sender="a@b", now=0)
    before = open(path, "rb").read()
    with open(path, "ab") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(mbox.MboxLockTimeout, match=r"locked for 0.5 seconds straight"):
            mbox.deliver(path, io.BytesIO(b"second\n"), sender="a@b", lock_timeout=0.5)
    assert open(path, "rb").read() == before


def test_mbox_unopenable(tmp_path):
    with pytest.raises(mbox.MboxOpenError, match="Unable to open"):
        mbox.deliver(str(tmp_path / "no" / "such"), io.BytesIO(b"x\n"), sender="a@b")


@pytest.mark.parametrize("unnamed", [True, False])
def test_maildir_sync_is_given_new_once_the_message_is_linked_there(tmp_path, monkeypatch, unnamed):
    """A caller's `sync` replaces the fsync of new/: it gets new/'s descriptor after
    the link, once; a `sync` that fails withdraws the message, as a failed fsync does."""
    monkeypatch.setattr(maildir, "UNNAMED", unnamed and maildir.UNNAMED)
    path = str(tmp_path / "M")
    maildir.make(path)
    new = os.path.join(path, "new")
    calls = []

    def sync(dfd):
        st = os.fstat(dfd)
        calls.append(((st.st_dev, st.st_ino), sorted(os.listdir(new))))

    name = maildir.deliver(path, io.BytesIO(b"x\n"), sync=sync)
    here = os.stat(new)
    assert calls == [((here.st_dev, here.st_ino), [name])]

    def broken(dfd):
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(maildir.MaildirError, match="unable to sync"):
        maildir.deliver(path, io.BytesIO(b"y\n"), sync=broken)
    assert os.listdir(new) == [name]
    assert os.listdir(os.path.join(path, "tmp")) == []
