"""A private Postfix instance whose qmqpd delivers into a Maildir: the peer the QMQP
benchmark compares against. Needs Debian's postfix package and root; touches no
system configuration (its own config, queue and data directories under BASE).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

from smarthost.fsspread import spread_subdirs  # the importing benchmark puts the checkout on sys.path

DEBIAN_CONFIG = "/etc/postfix"
POSTCONF = "/usr/sbin/postconf"
POSTFIX = "/usr/sbin/postfix"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available() -> str | None:
    """None when a private Postfix can run here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "a private Postfix needs root"
    for tool in (POSTCONF, POSTFIX, "/usr/sbin/qmqp-source"):
        if not os.path.exists(tool):
            return f"{tool} not installed (Debian package postfix)"
    if not os.path.exists(os.path.join(DEBIAN_CONFIG, "master.cf")):
        return "no master.cf to start from"
    return None


class PrivatePostfix:
    def __init__(self, base: str, port: int):
        self.base = os.path.abspath(base)
        self.port = port
        self.conf = os.path.join(self.base, "conf")
        self.queue = os.path.join(self.base, "queue")
        self.data = os.path.join(self.base, "data")
        self.mail = os.path.join(self.base, "mail")
        self.log = os.path.join(self.base, "postfix.log")
        self.maildir_new = os.path.join(self.mail, "Maildir", "new")

    def _pc(self, *args: str) -> None:
        subprocess.run([POSTCONF, "-c", self.conf, *args], check=True, capture_output=True)

    def setup(self) -> None:
        # Our init spreads a smart host's queue and homes over the filesystem's
        # block groups (smarthost.fsspread); a real Postfix has them apart too
        # (/var/spool/postfix and /home). Without this its queue's churn would
        # slow every Maildir file it creates, on ext4 without a journal.
        os.makedirs(self.base, exist_ok=True)
        spread_subdirs(self.base)
        for d in (self.conf, self.queue, self.data, self.mail):
            os.makedirs(d, exist_ok=True)
        # Debian's master.cf; main.cf from scratch (without a configured system
        # Postfix there is none to copy).
        shutil.copy(os.path.join(DEBIAN_CONFIG, "master.cf"), os.path.join(self.conf, "master.cf"))
        open(os.path.join(self.conf, "main.cf"), "w").close()
        shutil.chown(self.data, "postfix")
        os.chmod(self.data, 0o700)
        shutil.chown(self.mail, "nobody", "nogroup")
        self._pc("-e", f"queue_directory={self.queue}", f"data_directory={self.data}",
                 "inet_interfaces=127.0.0.1", "inet_protocols=ipv4", "mynetworks=127.0.0.0/8",
                 "myhostname=pfx.bench.test", "mydestination=", "relayhost=",
                 "alias_maps=", "alias_database=", "compatibility_level=3.6",
                 "mail_owner=postfix", "setgid_group=postdrop",
                 "sendmail_path=/usr/sbin/sendmail", "newaliases_path=/usr/bin/newaliases",
                 "mailq_path=/usr/bin/mailq", "command_directory=/usr/sbin",
                 "daemon_directory=/usr/lib/postfix/sbin", "meta_directory=/etc/postfix",
                 "shlib_directory=/usr/lib/postfix", "data_directory=" + self.data,
                 f"maillog_file={self.log}", f"maillog_file_prefixes={self.base}",
                 "qmqpd_authorized_clients=127.0.0.1",
                 "virtual_mailbox_domains=bench.test", f"virtual_mailbox_base={self.mail}",
                 "virtual_mailbox_maps=static:Maildir/",
                 "virtual_uid_maps=static:65534", "virtual_gid_maps=static:65534",
                 "header_checks=", "virtual_transport=virtual")
        self._pc("-MX", "smtp/inet")
        self._pc("-M", f"127.0.0.1:{self.port}/inet=127.0.0.1:{self.port} inet n - n - - qmqpd")
        self._pc("-F", "*/*/chroot = n")

    def start(self) -> None:
        # Postfix tells its fatal errors only to a terminal, else to its log.
        p = subprocess.run(["script", "-qc", f"{POSTFIX} -c {self.conf} start", "/dev/null"],
                           capture_output=True, text=True)
        if p.returncode != 0 or "fatal" in p.stdout:
            raise RuntimeError(f"private postfix did not start: {p.stdout.strip()}")
        import socket
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"private postfix did not start; see {self.log}")

    def stop(self) -> None:
        subprocess.run([POSTFIX, "-c", self.conf, "stop"], capture_output=True)

    def delivered(self) -> int:
        try:
            return len(os.listdir(self.maildir_new))
        except FileNotFoundError:
            return 0

    def accepted(self) -> int:
        """Messages durably in Postfix's queue or already delivered."""
        n = self.delivered()
        for sub in ("incoming", "active", "deferred", "hold", "maildrop"):
            for _, _, files in os.walk(os.path.join(self.queue, sub)):
                n += len(files)
        return n

    def queued(self) -> int:
        """Messages still in Postfix's queue."""
        n = 0
        for sub in ("incoming", "active", "deferred", "hold", "maildrop"):
            for _, _, files in os.walk(os.path.join(self.queue, sub)):
                n += len(files)
        return n
