"""config-mini: provision a mini-qmail client (after mini-qmail-kit's config-mini).

    config-mini [--smarthost-root DIR] me defaultdomain plusdomain idhost qmqpserver...

Writes control/me, defaultdomain, plusdomain, idhost and qmqpservers under
$MINIQMAIL_ROOT. Every argument is checked first and the files are written all
or nothing (each to a temporary name, then renamed), so a typo never leaves a
half-configured client. With --smarthost-root, the smart host whose root that
is also gets an allow rule for this client's address in its QMQP rules (through
its own `smarthost rules allow`, so the client never imports the server).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

from miniqmail import qmqpservers, root as client_root
from miniqmail.progmain import fatal, run

PROG = "config-mini"
USAGE = ("usage: config-mini [--smarthost-root DIR] me defaultdomain plusdomain idhost "
         "qmqpserver [qmqpserver ...]")


def valid_domain(name: str) -> bool:
    if not name or len(name) > 253 or name.startswith(".") or ".." in name:
        return False
    return all(ch.isascii() and (ch.isalnum() or ch in "-.") for ch in name) and \
        all(0 < len(label) <= 63 and not label.startswith("-") and not label.endswith("-")
            for label in name.rstrip(".").split("."))


def _write_all_or_nothing(control: str, files: dict[str, str]) -> None:
    os.makedirs(control, mode=0o755, exist_ok=True)
    tmps = []
    try:
        for name, text in files.items():
            tmp = os.path.join(control, f".{name}.config-mini.{os.getpid()}")
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            tmps.append((tmp, os.path.join(control, name)))
        for tmp, final in tmps:
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in tmps:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise


def _client_address(server: qmqpservers.Server) -> str:
    """The source address this host uses to reach `server` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((server.host, server.port))
        return s.getsockname()[0]


def _smarthost_program() -> str | None:
    beside = os.path.join(os.path.dirname(sys.executable), "smarthost")
    return beside if os.path.exists(beside) else shutil.which("smarthost")


def config_mini(argv: list[str]) -> int:
    smarthost_root = None
    args = list(argv)
    if args and args[0].startswith("--smarthost-root"):
        opt = args.pop(0)
        if "=" in opt:
            smarthost_root = opt.split("=", 1)[1]
        elif args:
            smarthost_root = args.pop(0)
    if len(args) < 5 or any(a.startswith("-") for a in args):
        sys.stderr.write(f"{PROG}: {USAGE}\n")
        return 100
    me, defaultdomain, plusdomain, idhost, *servers = args
    for what, value in (("me", me), ("defaultdomain", defaultdomain),
                        ("plusdomain", plusdomain), ("idhost", idhost)):
        if not valid_domain(value):
            return fatal(PROG, f"{what} is not a domain name: {value!r}", 100)
    parsed = []
    for s in servers:
        server = qmqpservers.parse_line(s)
        if server is None:
            return fatal(PROG, f"not a QMQP server (IP, host, host:port or [IPv6]:port): {s!r}", 100)
        parsed.append(server)
    control = os.path.join(client_root(), "control")
    try:
        _write_all_or_nothing(control, {
            "me": me + "\n", "defaultdomain": defaultdomain + "\n", "plusdomain": plusdomain + "\n",
            "idhost": idhost + "\n", "qmqpservers": "".join(s + "\n" for s in servers)})
    except OSError as e:
        return fatal(PROG, f"unable to write {control}: {e.strerror or e}", 111)
    for name in ("me", "defaultdomain", "plusdomain", "idhost", "qmqpservers"):
        print(f"{PROG}: wrote {os.path.join(control, name)}")
    if smarthost_root:
        prog = _smarthost_program()
        if prog is None:
            return fatal(PROG, "the smarthost program is not installed here; add the rule on the smart host", 111)
        try:
            addrs = sorted({_client_address(s) for s in parsed if s.literal})
        except OSError as e:
            return fatal(PROG, f"unable to find this host's address towards the smart host: {e}", 111)
        for addr in addrs:
            p = subprocess.run([prog, "rules", "allow", addr], capture_output=True, text=True,
                               env=dict(os.environ, SMARTHOST_ROOT=os.path.abspath(smarthost_root)))
            if p.returncode != 0:
                return fatal(PROG, f"smarthost rules allow {addr} failed: {p.stderr.strip()}", 111)
            print(f"{PROG}: allowed {addr} in {smarthost_root}/rules/qmqp.rules")
    return 0


def main() -> None:
    run(PROG, lambda: config_mini(sys.argv[1:]))


if __name__ == "__main__":
    main()
