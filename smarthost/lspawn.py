"""qmail-lspawn: the long-lived local delivery spawner.

Started once by the scheduler (`python -m smarthost.lspawn ROOT`), it loads the
delivery code and then forks one child per delivery, so a delivery never runs
in the scheduler and never pays for a fresh interpreter. Each child finds the
user (users/cdb, else the alias user), runs qmail-local's logic and reports.

Protocol (pipes): the scheduler writes `ID NUL MESSID NUL SENDER NUL RECIPIENT NUL`
on fd 0; the spawner answers `ID NUL LETTER TEXT NUL` on fd 1 with LETTER K, Z
or D (qmail-lspawn's mapping of qmail-local's exit codes). It first writes a
hello byte `+` once it is ready.
"""

from __future__ import annotations

import gc
import os
import selectors
import signal
import sys
from typing import BinaryIO

from miniqmail.fdio import write_all
from smarthost import local, users
from smarthost.chain import Chain
from smarthost.queue import Queue, invoked_by_uid, received_line
from smarthost.root import Root

REPORT_MAX = 3000
#: qmail-local's own suicide alarm.
DEATH = 86400
TEMP_CODES = (111, 71, 74, 75)
#: deliveries into a scratch Maildir before the first fork (see Spawner.warm_up)
WARM_UP_ROUNDS = 20


def letter_for(code: int) -> str:
    """qmail-lspawn: 0 -> K; 111, 71, 74, 75 -> Z; everything else -> D."""
    if code == 0:
        return "K"
    if code in TEMP_CODES:
        return "Z"
    return "D"


def clean_text(text: str) -> str:
    text = text.replace("\0", "_")
    if len(text) > REPORT_MAX:
        text = text[:REPORT_MAX] + "\n[report too long; truncated]"
    return text


class Spawner:
    def __init__(self, root: Root):
        self.root = root
        self.queue = Queue(root.queue_dir)
        ctl = root.control
        self.defaultdelivery = ctl.line("defaultdelivery") or "./Maildir/"
        self.system_mode = root.mode == "system"
        self.env = dict(os.environ)

    def inject_forward(self, uid: int):
        def inject(prefix: bytes, message: BinaryIO, sender: str, recipients: list[str]):
            try:
                done = self.queue.inject(Chain(prefix, message), sender, recipients,
                                         received=received_line(invoked_by_uid(uid)))
            except Exception as e:  # turned into qmail-queue's exit code, as qmail.c does
                return getattr(e, "exit_code", 81), str(e)
            return 0, f"qp {done.qp}"
        return inject

    def deliver(self, messid: int, sender: str, recipient: str) -> tuple[int, str]:
        """Runs in the child: one delivery, returned as qmail-local's (exit code, report)."""
        localpart, _, domain = recipient.rpartition("@")
        if not localpart:
            return 0, "Nothing to deliver for an empty local part."
        try:
            user = users.resolve(self.root.path, localpart, system_mode=self.system_mode)
        except Exception as e:
            return 111, f"Unable to find the user for {localpart}: {e} (#4.3.0)"
        if self.system_mode:
            if user.uid == 0:
                return 111, "Refusing to deliver as root. (#4.3.0)"
            try:
                os.setgroups([])
                os.setgid(user.gid)
                os.setuid(user.uid)
            except OSError as e:
                return 111, f"Unable to switch to user {user.user}: {e.strerror} (#4.3.0)"
        try:
            message = open(self.queue.mess(messid), "rb")
        except OSError as e:
            return 111, f"Unable to open the queued message: {e.strerror} (#4.3.0)"
        req = local.LocalRequest(user=user.user, uid=user.uid, gid=user.gid, home=user.home,
                                 local=localpart, dash=user.dash, ext=user.ext, domain=domain,
                                 sender=sender, defaultdelivery=self.defaultdelivery, env=self.env)
        with message:
            res = local.deliver(req, message, self.inject_forward(user.uid))
        return res.code, res.text

    def child(self, wfd: int, messid: int, sender: str, recipient: str) -> None:
        code, text = 111, "Delivery crashed. (#4.3.0)"
        gc.disable()
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.alarm(DEATH)
            code, text = self.deliver(messid, sender, recipient)
        except BaseException as e:
            code, text = 111, f"Delivery failed unexpectedly: {type(e).__name__}. (#4.3.0)"
        finally:
            try:
                os.write(wfd, f"{code}\0{text}".encode("utf-8", "surrogateescape"))
            finally:
                os._exit(0)

    def warm_up(self, rounds: int = WARM_UP_ROUNDS) -> None:
        """Deliver a few messages into a scratch Maildir before the first fork.

        The interpreter specialises bytecode and fills caches the first times code
        runs; done here, once, children inherit the result instead of each writing
        (and so copying) those pages again. Failures here change nothing.
        """
        import shutil

        scratch = os.path.join(os.environ.get("TMPDIR") or "/tmp", f"smarthost-warm-up.{os.getpid()}")
        try:
            os.mkdir(scratch, 0o700)
            local_maildir = os.path.join(scratch, "Maildir")
            for sub in ("", "tmp", "new", "cur"):
                os.makedirs(os.path.join(local_maildir, sub), mode=0o700, exist_ok=True)
            path = os.path.join(scratch, "message")
            with open(path, "wb") as f:
                f.write(b"Received: (warm-up)\nSubject: warm-up\n\nwarm-up\n")
            req = local.LocalRequest(user="warm-up", uid=os.getuid(), gid=os.getgid(), home=scratch,
                                     local="warm-up", dash="", ext="", domain="warm-up.invalid",
                                     sender="warm-up@warm-up.invalid", defaultdelivery="./Maildir/",
                                     env=self.env)
            for _ in range(rounds):
                try:
                    users.resolve(self.root.path, "warm-up", system_mode=self.system_mode)
                except Exception:
                    pass
                with open(path, "rb") as message:
                    local.deliver(req, message, self.inject_forward(os.getuid()))
        except OSError:
            pass
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def serve(self, cmd_in: int, out: int) -> None:
        # Children would otherwise copy every page the collector touches: keep
        # what is loaded now out of its sight, and let children skip it entirely.
        users.preload(self.root.path)
        self.warm_up()
        gc.collect()
        gc.freeze()
        sel = selectors.DefaultSelector()
        sel.register(cmd_in, selectors.EVENT_READ, None)
        pending = b""
        children: dict[int, tuple[int, bytes, bytearray]] = {}  # rfd -> (pid, id, output)
        os.write(out, b"+")
        eof = False
        while not eof or children:
            for key, _ in sel.select():
                fd = key.fd
                if fd == cmd_in:
                    data = os.read(cmd_in, 65536)
                    if not data:
                        eof = True
                        sel.unregister(cmd_in)
                        continue
                    pending += data
                    while pending.count(b"\0") >= 4:
                        did, messid, sender, rcpt, pending = pending.split(b"\0", 4)
                        rfd, wfd = os.pipe()
                        pid = os.fork()
                        if pid == 0:
                            os.close(rfd)
                            for other in children:
                                os.close(other)
                            sel.close()
                            # Nothing a delivery runs may touch the protocol pipes.
                            null = os.open(os.devnull, os.O_RDWR)
                            os.dup2(null, 0)
                            os.dup2(null, 1)
                            os.close(null)
                            self.child(wfd, int(messid), sender.decode("utf-8", "surrogateescape"),
                                       rcpt.decode("utf-8", "surrogateescape"))
                        os.close(wfd)
                        children[rfd] = (pid, did, bytearray())
                        sel.register(rfd, selectors.EVENT_READ, None)
                    continue
                pid, did, buf = children[fd]
                data = os.read(fd, 65536)
                if data:
                    if len(buf) < 2 * REPORT_MAX:
                        buf += data
                    continue
                sel.unregister(fd)
                os.close(fd)
                del children[fd]
                _, status = os.waitpid(pid, 0)
                code_s, sep, text = bytes(buf).partition(b"\0")
                if sep and code_s.isdigit() and os.waitstatus_to_exitcode(status) == 0:
                    code = int(code_s)
                    report = letter_for(code) + clean_text(text.decode("utf-8", "surrogateescape"))
                else:
                    report = "ZDelivery process crashed. (#4.3.0)"
                write_all(out, did + b"\0" + report.encode("utf-8", "surrogateescape") + b"\0")


def main() -> None:
    root = Root(sys.argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the scheduler decides when we stop
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    Spawner(root).serve(0, 1)


if __name__ == "__main__":
    main()
