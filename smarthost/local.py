"""Local delivery with qmail-local's semantics (qmail-local(8), dot-qmail(5), qmail-command(8)).

The spawner calls deliver() in a forked child that already runs as the
recipient, and turns the result into K/Z/D exactly as qmail-lspawn turns
qmail-local's exit status: 0 success, 100 permanent, 111 temporary. The text is
what qmail-local would have written to its output: program output first, then
its own line(s), each ending in LF (`did F+W+P` and `qp N` on success).

Order, as in qmail-local.c: chdir to the (absolute) home, refuse a writable or
sticky home, refuse a message that already has our Delivered-To line, find the
.qmail file, then run its lines in order. Mbox and maildir lines get
Return-Path and Delivered-To; programs get the bare message and the
qmail-command(8) environment; forwards are collected and injected once at the
end, with Delivered-To but no Return-Path. The first failure stops everything,
including the forwards.

The process working directory is restored before returning, so an in-process
caller is not left in the user's home.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator

from miniqmail import maildir, mbox
from miniqmail.exitcodes import is_permanent, report as qq_report
from miniqmail.fdio import why
from smarthost import dotqmail
from smarthost.errors import PermanentError, SmarthostError, TemporaryError

Inject = Callable[[bytes, BinaryIO, str, list[str]], tuple[int, str]]

OUTPUT_MAX = 3000  # program output kept for the report, like qmail-lspawn's cap
HARD_EXITS = frozenset({100, 64, 65, 70, 76, 77, 78, 112})  # qmail-command(8)
SPOOL_CHUNK = 64 * 1024

# .qmail open errors that mean "no such file"; anything else might go away: defer.
_ABSENT = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.ENXIO}


@dataclass(frozen=True)
class LocalRequest:
    user: str
    uid: int
    gid: int
    home: str
    local: str
    dash: str
    ext: str
    domain: str
    sender: str
    defaultdelivery: str = "./Mailbox"
    env: dict[str, str] = field(default_factory=dict)
    patrn: int = 0o022  # conf-patrn: mode bits on home or .qmail that make us defer
    lock_timeout: float = 30.0


@dataclass(frozen=True)
class LocalResult:
    code: int  # 0 delivered, 100 permanent failure, 111 temporary failure
    text: str


def _save_cwd() -> int | None:
    for flags in (os.O_RDONLY, getattr(os, "O_PATH", os.O_RDONLY)):
        try:
            return os.open(".", flags | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
    return None


class _Delivery:
    def __init__(self, req: LocalRequest, fd: int, inject: Inject, sync_new: maildir.Sync | None = None):
        self.req = req
        self.fd = fd
        self.inject = inject
        self.sync_new = sync_new
        self.started = time.time()
        self.output = bytearray()
        self.counts = [0, 0, 0]  # file, forward, program lines, as in `did F+W+P`
        self.qp = ""
        self.dtline = dotqmail.delivered_to(req.local, req.domain)
        self.rpline = dotqmail.return_path(req.sender)
        self.newsender = ""
        self.default: str | None = None
        self._env: dict[str, str] | None = None

    @property
    def env(self) -> dict[str, str]:
        """qmail-command's environment; built when a program line needs it, not for every delivery."""
        if self._env is None:
            req = self.req
            self._env = dotqmail.program_env(
                req.env, user=req.user, home=req.home, local=req.local, domain=req.domain,
                ext=req.ext, sender=req.sender, newsender=self.newsender, default=self.default,
                when=self.started)
        return self._env

    @contextmanager
    def _reader(self) -> Iterator[BinaryIO]:
        self._rewind()
        f = open(self.fd, "rb", closefd=False)
        try:
            yield f
        finally:
            f.close()

    def _rewind(self) -> None:
        try:
            os.lseek(self.fd, 0, os.SEEK_SET)
        except OSError:
            raise TemporaryError("Unable to rewind message. (#4.3.0)") from None

    def _check_home(self) -> None:
        try:
            st = os.stat(".")
        except OSError as e:
            raise TemporaryError(f"Unable to stat home directory: {why(e)}. (#4.3.0)") from None
        if st.st_mode & self.req.patrn:
            raise TemporaryError("Uh-oh: home directory is writable. (#4.7.0)")
        if st.st_mode & stat.S_ISVTX:
            raise TemporaryError("Home directory is sticky: user is editing his .qmail file. (#4.2.1)")

    def _loop_check(self) -> None:
        # Header lines only, a bounded piece at a time: a line longer than ours cannot match.
        limit = max(len(self.dtline), 8192)
        line_start = True
        with self._reader() as f:
            while True:
                try:
                    piece = f.readline(limit)
                except OSError as e:
                    raise TemporaryError(f"Unable to read message: {why(e)}. (#4.3.0)") from None
                if not piece:
                    return
                if line_start:
                    if piece == b"\n":
                        return
                    if piece == self.dtline:
                        raise PermanentError("This message is looping: it already has my "
                                             "Delivered-To line. (#5.4.6)")
                line_start = piece.endswith(b"\n")

    def _probe(self, name: str) -> tuple[bytes, bool] | None:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in _ABSENT:
                return None
            raise TemporaryError(f"Unable to open {name}: {why(e)}. (#4.3.0)") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None  # qmail-local treats a directory or device as no file
            if st.st_mode & self.req.patrn:
                raise TemporaryError("Uh-oh: .qmail file is writable. (#4.7.0)")
            with open(fd, "rb", closefd=False) as f:
                data = f.read(dotqmail.DOTQMAIL_MAX + 1)
            return data, bool(st.st_mode & stat.S_IXUSR)
        except OSError as e:
            raise TemporaryError(f"Unable to read {name}: {why(e)}. (#4.3.0)") from None
        finally:
            os.close(fd)

    def _exists(self, name: str) -> bool:
        try:
            os.stat(name)
            return True
        except OSError as e:
            if e.errno in _ABSENT or e.errno in (errno.EACCES, errno.EPERM):
                return False
            raise TemporaryError(f"Unable to open {name}: {why(e)}. (#4.3.0)") from None

    def run(self) -> str:
        req = self.req
        self._check_home()
        self._loop_check()
        found = dotqmail.search(req.dash, req.ext, self._probe)
        if found is None and req.dash:
            raise PermanentError("Sorry, no mailbox here by that name. (#5.1.1)")
        data, forward_only = found[1] if found else (b"", False)
        default = found[0].default if found else None
        newsender = dotqmail.new_sender(req.sender, req.local, req.domain, req.dash, req.ext,
                                        self._exists)
        if not data:
            data, forward_only = os.fsencode(req.defaultdelivery), False
        try:
            instructions = dotqmail.parse(data)
        except dotqmail.DotQmailError as e:
            raise TemporaryError(f"{e.text} (#{e.status})") from None
        self.newsender, self.default = newsender, default

        forwards: list[str] = []
        for ins in instructions:
            kind = ins.kind
            if kind is dotqmail.Kind.FORWARD_ONLY:
                forward_only = True
            elif kind is dotqmail.Kind.FORWARD:
                self.counts[1] += 1
                forwards.append(ins.value)
            elif kind in (dotqmail.Kind.MBOX, dotqmail.Kind.MAILDIR):
                self.counts[0] += 1
                if forward_only:
                    raise TemporaryError("Uh-oh: .qmail has file delivery but has x bit set. (#4.7.0)")
                if kind is dotqmail.Kind.MAILDIR:
                    self._maildir(ins.value)
                else:
                    self._mbox(ins.value)
            elif kind is dotqmail.Kind.PROGRAM:
                self.counts[2] += 1
                if forward_only:
                    raise TemporaryError("Uh-oh: .qmail has prog delivery but has x bit set. (#4.7.0)")
                if self._program(ins.value):
                    break  # exit 99: later lines are skipped, earlier forwards still go
        if forwards:
            self._forward(forwards, newsender)
        f, w, p = self.counts
        return f"did {f}+{w}+{p}\n" + (f"qp {self.qp}\n" if self.qp else "")

    def _maildir(self, path: str) -> None:
        with self._reader() as f:
            try:
                maildir.deliver(path, f, prefix=self.rpline + self.dtline, sync=self.sync_new)
            except maildir.MaildirMissing:
                raise TemporaryError("Unable to chdir to maildir. (#4.2.1)") from None
            except maildir.MaildirReadError:
                raise TemporaryError("Unable to read message. (#4.3.0)") from None
            except maildir.MaildirError:
                raise TemporaryError("Temporary error on maildir delivery. (#4.3.0)") from None

    def _mbox(self, path: str) -> None:
        with self._reader() as f:
            try:
                mbox.deliver(path, f, sender=self.req.sender, prefix=self.rpline + self.dtline,
                             lock_timeout=self.req.lock_timeout, now=self.started)
            except mbox.MboxOpenError as e:
                raise TemporaryError(f"{e} (#4.2.1)") from None
            except mbox.MboxError as e:
                raise TemporaryError(f"{e} (#4.3.0)") from None

    def _program(self, command: str) -> bool:
        """Run one `|command`; True when it exited 99 (stop processing later lines)."""
        self._rewind()
        # posix_spawn, not subprocess: subprocess brings threading, whose at-fork
        # hook would tax every delivery child the spawner forks.
        try:
            rfd, wfd = os.pipe()
        except OSError as e:
            raise TemporaryError(f"Unable to run /bin/sh: {why(e)}. (#4.3.0)") from None
        old_umask = os.umask(0o077)
        try:
            pid = os.posix_spawn("/bin/sh", ["/bin/sh", "-c", command], self.env, file_actions=[
                (os.POSIX_SPAWN_DUP2, self.fd, 0),
                (os.POSIX_SPAWN_DUP2, wfd, 1),
                (os.POSIX_SPAWN_DUP2, wfd, 2)])
        except (OSError, ValueError) as e:
            os.close(rfd)
            reason = why(e) if isinstance(e, OSError) else str(e)
            raise TemporaryError(f"Unable to run /bin/sh: {reason}. (#4.3.0)") from None
        finally:
            os.umask(old_umask)
            os.close(wfd)
        try:
            while chunk := os.read(rfd, SPOOL_CHUNK):
                # Keep the start of the output; drain the rest so the program never blocks.
                room = OUTPUT_MAX - len(self.output)
                if room > 0:
                    self.output += chunk[:room]
        finally:
            os.close(rfd)
        _, wstatus = os.waitpid(pid, 0)
        status = os.waitstatus_to_exitcode(wstatus)
        if status < 0:
            raise TemporaryError("Aack, child crashed. (#4.3.0)")
        if status in HARD_EXITS:
            raise PermanentError("")  # the program's own output is the whole report
        if status not in (0, 99):
            raise TemporaryError("")
        return status == 99

    def _forward(self, recipients: list[str], newsender: str) -> None:
        with self._reader() as f:
            try:
                code, text = self.inject(self.dtline, f, newsender, recipients)
            except Exception as e:
                raise TemporaryError(f"Unable to forward message: {str(e) or type(e).__name__}.") from None
        if code == 0:
            qp = text.strip()
            self.qp = qp[3:] if qp.startswith("qp ") else qp
            return
        reason = text.strip() or qq_report(code)[1:]
        error = PermanentError if is_permanent(code) else TemporaryError
        raise error(f"Unable to forward message: {reason}.")

    def compose(self, text: str) -> str:
        out = self.output.decode("utf-8", "replace")
        return out + (text if not text or text.endswith("\n") else text + "\n")


@contextmanager
def _message_fd(message: BinaryIO) -> Iterator[int]:
    """A seekable descriptor for the message; spool to a temporary file if there is none."""
    try:
        fd = message.fileno()
        os.lseek(fd, 0, os.SEEK_CUR)
    except (AttributeError, io.UnsupportedOperation, OSError):
        import tempfile  # rare path; random's reseed-at-fork hook would tax every delivery

        with tempfile.TemporaryFile() as spool:
            while chunk := message.read(SPOOL_CHUNK):
                spool.write(chunk)
            spool.flush()
            yield spool.fileno()
        return
    yield fd


def deliver(req: LocalRequest, message: BinaryIO, inject: Inject,
            sync_new: maildir.Sync | None = None) -> LocalResult:
    """Deliver `message` to one local recipient; never raises (Exception becomes 111).

    `inject(prefix, message, newsender, recipients)` queues the forwarded copy
    (`prefix` is the Delivered-To line, `message` is at offset 0) and returns
    (qmail-queue exit code, text): on success the text is the queue's id for
    `qp`; otherwise a reason without a D/Z letter (empty: qmail.c's wording).
    `sync_new` is maildir.deliver's `sync` for every maildir line.
    """
    if not req.local:
        return LocalResult(0, "did 0+0+0\n")  # qmail-lspawn: nothing to deliver to
    if not req.home.startswith("/"):
        return LocalResult(111, f"Home directory is not an absolute path: {req.home}. (#4.3.0)\n")
    saved = _save_cwd()
    delivery: _Delivery | None = None
    try:
        try:
            os.chdir(req.home)
        except OSError as e:
            raise TemporaryError(f"Unable to switch to {req.home}: {why(e)}. (#4.3.0)") from None
        with _message_fd(message) as fd:
            delivery = _Delivery(req, fd, inject, sync_new)
            return LocalResult(0, delivery.compose(delivery.run()))
    except SmarthostError as e:
        text = delivery.compose(e.text) if delivery else e.text + "\n"
        return LocalResult(100 if isinstance(e, PermanentError) else 111, text)
    except Exception as e:  # the spawner's child must always hand back a result
        text = f"Local delivery failed unexpectedly: {type(e).__name__}: {e}. (#4.3.0)\n"
        return LocalResult(111, delivery.compose(text) if delivery else text)
    finally:
        if saved is not None:
            try:
                os.fchdir(saved)
            except OSError:
                pass
            os.close(saved)
