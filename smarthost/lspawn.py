"""qmail-lspawn: the long-lived local delivery spawner.

Started once by the scheduler (`python -m smarthost.lspawn ROOT`), it loads the
delivery code and then forks children for the deliveries, so a delivery never
runs in the scheduler or the spawner and never pays for a fresh interpreter.
A child makes one delivery at a time: it finds the user (users/cdb, else the
alias user), runs qmail-local's logic and reports. Like Postfix's local(8), and
unlike qmail-lspawn, a child that has reported may then take another delivery
for the same user (see Pool), since a fork costs more than the delivery.

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
import time
from typing import BinaryIO

from miniqmail import netstring
from miniqmail.fdio import write_all
from smarthost import local, users
from smarthost.chain import Chain
from smarthost.queue import Queue, invoked_by_uid, received_line
from smarthost.root import Root

REPORT_MAX = 3000
#: bytes of a child's report netstring: clean_text() keeps it well below
RESULT_LIMIT = 4 * REPORT_MAX + 100
#: qmail-local's own suicide alarm.
DEATH = 86400
TEMP_CODES = (111, 71, 74, 75)
#: deliveries into a scratch Maildir before the first fork (see Spawner.warm_up)
WARM_UP_ROUNDS = 20
#: deliveries one child makes at most, one after another. Postfix's local stops at
#: 100 (max_use); a child of ours costs far more to start (a fork of the spawner, then
#: a copy of every page either touches), so it is spread over more deliveries.
REUSE = 1000
#: seconds a child that has reported waits for another delivery
IDLE = 2.0


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
        self.switched: tuple[int, int] | None = None  # in a system-mode child: the ids it took

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
            if self.switched is None:
                try:
                    os.setgroups([])
                    os.setgid(user.gid)
                    os.setuid(user.uid)
                except OSError as e:
                    return 111, f"Unable to switch to user {user.user}: {e.strerror} (#4.3.0)"
                self.switched = (user.uid, user.gid)
            elif self.switched != (user.uid, user.gid):  # the spawner's key_for() prevents it
                return 111, f"Unable to switch to user {user.user}: this child serves another. (#4.3.0)"
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

    def worker(self, cmd: int, res: int) -> None:
        """The child: deliveries one after another until its command pipe closes; never returns."""
        gc.disable()
        try:
            for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE, signal.SIGALRM):
                signal.signal(sig, signal.SIG_DFL)  # as programs run by a delivery expect them
            pending = b""
            while True:
                while pending.count(b"\0") < 3:
                    data = os.read(cmd, 65536)
                    if not data:
                        return
                    pending += data
                messid, sender, rcpt, pending = pending.split(b"\0", 3)
                signal.alarm(DEATH)
                try:
                    code, text = self.deliver(int(messid), sender.decode("utf-8", "surrogateescape"),
                                              rcpt.decode("utf-8", "surrogateescape"))
                except Exception as e:
                    code, text = 111, f"Delivery failed unexpectedly: {type(e).__name__}. (#4.3.0)"
                signal.alarm(0)
                report = f"{code}\0{clean_text(text)}".encode("utf-8", "surrogateescape")
                write_all(res, netstring.encode(report))
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

    def key_for(self, rcpt: bytes) -> object:
        """Which children may take this delivery: any in user mode, else one of the same user."""
        if not self.system_mode:
            return None
        localpart = rcpt.decode("utf-8", "surrogateescape").rpartition("@")[0]
        try:
            user = users.resolve(self.root.path, localpart, system_mode=True)
        except Exception:
            return object()  # a child of its own, which reports the trouble
        return (user.uid, user.gid)

    def serve(self, cmd_in: int, out: int) -> None:
        # Children would otherwise copy every page the collector touches: keep
        # what is loaded now out of its sight, and let children skip it entirely.
        users.preload(self.root.path)
        self.warm_up()
        gc.collect()
        gc.freeze()
        Pool(self, cmd_in, out).run()


class Worker:
    """A delivery child as the spawner sees it."""

    __slots__ = ("pid", "cmd", "res", "key", "served", "did", "frame", "idle_since")

    def __init__(self, pid: int, cmd: int, res: int, key: object):
        self.pid, self.cmd, self.res, self.key = pid, cmd, res, key
        self.served = 0
        self.did: bytes | None = None   # the delivery it is on; None when idle
        self.frame = netstring.Decoder(RESULT_LIMIT)  # its report under way
        self.idle_since = 0.0


class Pool:
    """The spawner's loop: requests in, each to a child with nothing else to do, reports out.

    A child that has reported waits up to IDLE seconds for another delivery of
    the same user and serves at most REUSE; forking and first touching the
    interpreter's pages cost several times more than a Maildir delivery itself.
    A child that dies costs only the delivery it was on.
    """

    def __init__(self, spawner: Spawner, cmd_in: int, out: int):
        self.spawner = spawner
        self.cmd_in = cmd_in
        self.out = out
        self.sel = selectors.DefaultSelector()
        self.workers: dict[int, Worker] = {}       # res fd -> worker
        self.idle: dict[object, list[Worker]] = {}
        self.closing = False

    def fork(self, key: object) -> Worker:
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                for fd in (cmd_w, res_r, self.cmd_in, self.out):
                    os.close(fd)
                for w in self.workers.values():
                    if w.cmd >= 0:
                        os.close(w.cmd)
                    os.close(w.res)
                self.sel.close()
                # Nothing a delivery runs may touch the protocol pipes.
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, 0)
                os.dup2(null, 1)
                os.close(null)
                self.spawner.worker(cmd_r, res_w)
            finally:
                os._exit(111)
        os.close(cmd_r)
        os.close(res_w)
        w = Worker(pid, cmd_w, res_r, key)
        self.workers[res_r] = w
        self.sel.register(res_r, selectors.EVENT_READ, None)
        return w

    def dispatch(self, did: bytes, messid: bytes, sender: bytes, rcpt: bytes) -> None:
        key = self.spawner.key_for(rcpt)
        request = b"%s\0%s\0%s\0" % (messid, sender, rcpt)
        idle = self.idle.get(key)
        while idle:
            w = idle.pop()
            try:
                write_all(w.cmd, request)
                break
            except OSError:
                self.retire(w)  # it died while idle; its end of file is reaped as usual
        else:
            w = self.fork(key)
            try:
                write_all(w.cmd, request)
            except OSError:
                pass  # a fresh child that died at once: its end of file reports the delivery crashed
        w.did = did
        w.served += 1

    def retire(self, w: Worker) -> None:
        """Tell a child to exit (its command pipe closes); it is reaped at its end of file."""
        if w.cmd >= 0:
            os.close(w.cmd)
            w.cmd = -1

    def report(self, did: bytes, report: str) -> None:
        try:
            write_all(self.out, did + b"\0" + report.encode("utf-8", "surrogateescape") + b"\0")
        except OSError:
            raise SystemExit(0) from None  # the scheduler is gone; children see their pipes close

    def result(self, w: Worker) -> None:
        data = os.read(w.res, 65536)
        if not data:
            self.gone(w)
            return
        try:
            while data:
                data = data[w.frame.feed(data):]
                if w.frame.done:
                    payload = b"".join(w.frame.take())
                    w.frame = netstring.Decoder(RESULT_LIMIT)
                    self.reported(w, payload)
        except netstring.NetstringError:
            self.kill(w)

    def reported(self, w: Worker, payload: bytes) -> None:
        """A child's `CODE NUL TEXT`: pass it on; the child waits for more, or is retired."""
        code_s, sep, text = payload.partition(b"\0")
        if w.did is None or not sep or not code_s.lstrip(b"-").isdigit():
            self.kill(w)
            return
        self.report(w.did, letter_for(int(code_s)) + clean_text(text.decode("utf-8", "surrogateescape")))
        w.did = None
        if w.served >= REUSE or self.closing:
            self.retire(w)
        else:
            w.idle_since = time.monotonic()
            self.idle.setdefault(w.key, []).append(w)

    def gone(self, w: Worker) -> None:
        """End of file from a child: reap it; a delivery it was on is reported crashed."""
        self.sel.unregister(w.res)
        os.close(w.res)
        del self.workers[w.res]
        self.retire(w)
        idle = self.idle.get(w.key)
        if idle and w in idle:
            idle.remove(w)
        os.waitpid(w.pid, 0)
        if w.did is not None:
            self.report(w.did, "ZDelivery process crashed. (#4.3.0)")

    def kill(self, w: Worker) -> None:
        """A child that breaks the protocol: stop it; its end of file reports the delivery."""
        try:
            os.kill(w.pid, signal.SIGKILL)
        except OSError:
            pass

    def expire(self, now: float) -> float | None:
        """Retire children idle too long; seconds until the next one is due, if any."""
        soonest = None
        for key, idle in list(self.idle.items()):
            keep = []
            for w in idle:
                left = w.idle_since + IDLE - now
                if left <= 0:
                    self.retire(w)
                else:
                    keep.append(w)
                    soonest = left if soonest is None else min(soonest, left)
            if keep:
                self.idle[key] = keep
            else:
                del self.idle[key]
        return soonest

    def run(self) -> None:
        self.sel.register(self.cmd_in, selectors.EVENT_READ, None)
        pending = b""
        os.write(self.out, b"+")
        eof = False
        timeout = None
        while not eof or self.workers:
            for key, _ in self.sel.select(timeout):
                if key.fd != self.cmd_in:
                    self.result(self.workers[key.fd])
                    continue
                data = os.read(self.cmd_in, 65536)
                if not data:
                    eof = self.closing = True
                    self.sel.unregister(self.cmd_in)
                    continue
                pending += data
                while pending.count(b"\0") >= 4:
                    did, messid, sender, rcpt, pending = pending.split(b"\0", 4)
                    self.dispatch(did, messid, sender, rcpt)
            if eof:
                for w in self.workers.values():
                    if w.did is None:
                        self.retire(w)
                self.idle.clear()
            timeout = self.expire(time.monotonic())


def main() -> None:
    # Only fds 0, 1 and 2 are ours: whatever else the scheduler's event loop let
    # through (uvloop's spawn leaves its copies of the pipes open) would reach
    # every delivery and every program a .qmail runs.
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    root = Root(sys.argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the scheduler decides when we stop
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_IGN)  # the scheduler's; children take it back for DEATH
    # A child may die while idle: writing to its pipe must fail, not kill the spawner.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    Spawner(root).serve(0, 1)


if __name__ == "__main__":
    main()
