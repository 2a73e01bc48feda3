"""qmail-lspawn: the long-lived local delivery spawner.

Started once by the scheduler (`python -m smarthost.lspawn ROOT`), it loads the
delivery code and then forks children for the deliveries, so a delivery never
runs in the scheduler or the spawner and never pays for a fresh interpreter.
A child makes one delivery at a time: it finds the user (users/cdb, else the
alias user), runs qmail-local's logic and reports. Like Postfix's local(8), and
unlike qmail-lspawn, a child that has reported may then take another delivery
for the same user, since a fork costs more than the delivery.

The spawner only forks. Its fd 0 is a SOCK_SEQPACKET socket from the scheduler,
on which it first writes a hello byte `+` once it is ready. Each message from
the scheduler is the byte `F` with one descriptor (SCM_RIGHTS): the child's end
of a SOCK_SEQPACKET pair whose other end the scheduler keeps, to talk to the
child itself (smarthost.spawnclient). A request and its report so cross one
socket, not two pipes and a relay, and a spawner that dies costs no delivery
under way.

A request is `MESSID NUL SENDER NUL RECIPIENT`. In system mode it carries the
queued message's open descriptor too, as qmail-lspawn gives qmail-local the
message on fd 0: a child that has switched to its user could not open the queue.
The report is `CODE NUL TEXT`, qmail-local's exit code and output; the scheduler
maps the code to K, Z or D as qmail-lspawn does (letter_for). A child exits when
the scheduler closes its end.

A child does not fsync the `new/` directories it links messages into: the report
carries their descriptors (up to NEW_DIRS_MAX, beyond that the child syncs
itself), and the scheduler counts it only once it has fsynced each directory, one
fsync for all the deliveries of a turn (spawnclient.NewDirSync). A child is free
for the next delivery meanwhile, and ten children delivering to one Maildir no
longer fsync its new/ ten times.
"""

from __future__ import annotations

import array
import gc
import os
import signal
import socket
import sys
from typing import BinaryIO

from miniqmail import maildir
from smarthost import local, users
from smarthost.chain import Chain
from smarthost.queue import Queue, invoked_by_uid, received_line
from smarthost.root import Root

REPORT_MAX = 3000
#: bytes of a child's report: clean_text() keeps it well below
RESULT_LIMIT = 4 * REPORT_MAX + 100
#: bytes of a request, `MESSID NUL SENDER NUL RECIPIENT`: the queue takes no address over 1002
REQUEST_MAX = 4096
#: qmail-local's own suicide alarm.
DEATH = 86400
TEMP_CODES = (111, 71, 74, 75)
#: deliveries into a scratch Maildir before the first fork (see Spawner.warm_up)
WARM_UP_ROUNDS = 20
#: new/ directories one report hands the scheduler to fsync at most
NEW_DIRS_MAX = 16


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


_INT = array.array("i").itemsize
_CUT = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)


def receive(sock: socket.socket, size: int, fds_max: int = 4) -> tuple[bytes, list[int], bool]:
    """One message, the descriptors it carries (up to `fds_max`; close-on-exec: a
    program a child runs must not inherit them; socket.recv_fds drops its flags),
    and whether it was cut (more bytes or descriptors than that)."""
    data, ancdata, flags, _ = sock.recvmsg(size, socket.CMSG_SPACE(fds_max * _INT), socket.MSG_CMSG_CLOEXEC)
    return data, fds_in(ancdata), bool(flags & _CUT)


def fds_in(ancdata: list) -> list[int]:
    """The descriptors that recvmsg's ancillary data carries (SCM_RIGHTS)."""
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % _INT])
    return list(fds)


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

    def deliver(self, messid: int, fd: int, sender: str, recipient: str,
                sync_new: maildir.Sync | None = None) -> tuple[int, str]:
        """Runs in the child: one delivery, returned as qmail-local's (exit code, report).

        In system mode the message comes open (fd), from the scheduler, as
        qmail-lspawn hands qmail-local its fd 0: a child that has switched to its
        user could not read the queue. In user mode the child opens it itself."""
        try:
            message = open(fd if fd >= 0 else self.queue.mess(messid), "rb")
        except OSError as e:
            return 111, f"Unable to open the queued message: {e.strerror} (#4.3.0)"
        with message:
            localpart, _, domain = recipient.rpartition("@")
            if not localpart:
                return 0, "Nothing to deliver for an empty local part."
            try:
                user = users.resolve(self.root.path, localpart, system_mode=self.system_mode)
            except Exception as e:
                return 111, f"Unable to find the user for {localpart}: {e} (#4.3.0)"
            return self._deliver_as(user, localpart, domain, sender, message, sync_new)

    def _deliver_as(self, user: users.UserEntry, localpart: str, domain: str, sender: str,
                    message: BinaryIO, sync_new: maildir.Sync | None) -> tuple[int, str]:
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
            elif self.switched != (user.uid, user.gid):  # the scheduler's key_for() prevents it
                return 111, f"Unable to switch to user {user.user}: this child serves another. (#4.3.0)"
        req = local.LocalRequest(user=user.user, uid=user.uid, gid=user.gid, home=user.home,
                                 local=localpart, dash=user.dash, ext=user.ext, domain=domain,
                                 sender=sender, defaultdelivery=self.defaultdelivery, env=self.env)
        res = local.deliver(req, message, self.inject_forward(user.uid), sync_new)
        return res.code, res.text

    def worker(self, chan: socket.socket) -> None:
        """The child: deliveries one after another until the scheduler closes its end; never returns."""
        gc.disable()
        try:
            for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE, signal.SIGALRM):
                signal.signal(sig, signal.SIG_DFL)  # as programs run by a delivery expect them
            new_dirs: list[int] = []

            def hand_over(dfd: int) -> None:
                """maildir's sync: the scheduler fsyncs new/ (see the module's docstring)."""
                if len(new_dirs) < NEW_DIRS_MAX:
                    new_dirs.append(os.dup(dfd))  # close-on-exec: no program run later sees it
                else:
                    maildir.fsync_dir(dfd)

            while True:
                data, fds, truncated = receive(chan, REQUEST_MAX)
                if not data and not fds:
                    return
                fields = data.split(b"\0")
                if len(fds) > 1 or len(fields) != 3 or not fields[0].isdigit() or truncated:
                    for fd in fds:
                        os.close(fd)
                    code, text = 111, "Delivery request mangled. (#4.3.0)"
                else:
                    signal.alarm(DEATH)
                    try:
                        code, text = self.deliver(int(fields[0]), fds[0] if fds else -1,
                                                  fields[1].decode("utf-8", "surrogateescape"),
                                                  fields[2].decode("utf-8", "surrogateescape"),
                                                  hand_over)
                    except Exception as e:
                        code, text = 111, f"Delivery failed unexpectedly: {type(e).__name__}. (#4.3.0)"
                    signal.alarm(0)
                report = f"{code}\0{clean_text(text)}".encode("utf-8", "surrogateescape")
                try:
                    chan.sendmsg([report], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                             array.array("i", new_dirs))] if new_dirs else [])
                finally:
                    for fd in new_dirs:
                        os.close(fd)
                    new_dirs.clear()
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

    def serve(self, sock: socket.socket) -> None:
        """Fork a child for each socket the scheduler sends, until it hangs up."""
        # Children would otherwise copy every page the collector touches: keep
        # what is loaded now out of its sight, and let children skip it entirely.
        users.preload(self.root.path)
        self.warm_up()
        gc.collect()
        gc.freeze()
        # Nobody waits for a child: the scheduler hears of its end on its socket,
        # and the kernel reaps it.
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        try:
            sock.sendall(b"+")
        except OSError:
            return
        while True:
            try:
                data, fds, _ = receive(sock, 16)
            except OSError:
                return
            if not data and not fds:
                return  # the scheduler is gone; so are its ends of the children's sockets
            if data == b"F" and len(fds) == 1:
                self.fork(sock, fds[0])
            for fd in fds:
                os.close(fd)  # a failed fork leaves nothing open: the scheduler sees the end of file

    def fork(self, sock: socket.socket, chan: int) -> None:
        try:
            pid = os.fork()
        except OSError:
            return
        if pid == 0:
            try:
                # Nothing a delivery runs may touch the scheduler's socket (fd 0).
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, 0)
                os.dup2(null, 1)
                os.close(null)
                sock.detach()
                self.worker(socket.socket(fileno=chan))
            finally:
                os._exit(111)


def main() -> None:
    # Only fds 0, 1 and 2 are ours: whatever else the scheduler's event loop let
    # through (uvloop's spawn leaves its copies of the pipes open) would reach
    # every delivery and every program a .qmail runs.
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    root = Root(sys.argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the scheduler decides when we stop
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_IGN)  # the scheduler's; children take it back for DEATH
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a scheduler gone is an error, not a death
    Spawner(root).serve(socket.socket(fileno=0))


if __name__ == "__main__":
    main()
