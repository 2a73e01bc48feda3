"""`smarthost init`: make a user-mode root — layout, default control files, an example user."""

from __future__ import annotations

import os
import pwd
import socket

from smarthost.fsspread import spread_subdirs
from smarthost.queue import Queue
from smarthost.root import Root
from smarthost.users import compile_assign

EXAMPLE_USER = "example"
ALIASES = ("postmaster", "mailer-daemon", "root")


def _write_new(path: str, text: str, mode: int = 0o644) -> bool:
    """Write a file unless it exists: init never overwrites what an administrator set."""
    if os.path.exists(path):
        return False
    with open(path, "x") as f:
        f.write(text)
    os.chmod(path, mode)
    return True


def _maildir(path: str) -> None:
    for sub in ("", "tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)


def init(path: str, me: str | None = None) -> Root:
    """Create (or complete) a user-mode root at `path`; idempotent."""
    root = Root(os.path.abspath(path))
    me = me or socket.getfqdn() or "localhost"
    os.makedirs(root.path, exist_ok=True)
    spread_subdirs(root.path)  # the queue and the homes in block groups apart (fsspread)
    for d in ("control", "users", "rules", "bin", "home"):
        os.makedirs(root.sub(d), mode=0o755, exist_ok=True)
    Queue(root.queue_dir).create()
    ctl = root.control_dir
    _write_new(os.path.join(ctl, "mode"), "user\n")
    _write_new(os.path.join(ctl, "me"), me + "\n")
    _write_new(os.path.join(ctl, "locals"), f"{me}\nlocalhost\n")
    _write_new(os.path.join(ctl, "defaultdelivery"), "./Maildir/\n")
    _write_new(os.path.join(ctl, "concurrencylocal"), "10\n")
    _write_new(os.path.join(ctl, "concurrencyremote"), "20\n")

    # The alias user takes names nobody owns, and postmaster & co.
    os.makedirs(root.alias_dir, mode=0o755, exist_ok=True)
    os.chmod(root.alias_dir, 0o755)
    _maildir(os.path.join(root.alias_dir, "Maildir"))
    for name in ALIASES:
        _write_new(os.path.join(root.alias_dir, f".qmail-{name}"), "./Maildir/\n", 0o600)

    # An example user, delivered to ~/Maildir/ by control/defaultdelivery.
    home = root.sub("home", EXAMPLE_USER)
    os.makedirs(home, mode=0o755, exist_ok=True)
    os.chmod(home, 0o755)
    _maildir(os.path.join(home, "Maildir"))
    uid, gid = os.getuid(), os.getgid()
    try:
        login = pwd.getpwuid(uid).pw_name
    except KeyError:
        login = str(uid)
    assign = os.path.join(root.users_dir, "assign")
    _write_new(assign,
               f"={EXAMPLE_USER}:{login}:{uid}:{gid}:{home}:::\n"
               f"+{EXAMPLE_USER}-:{login}:{uid}:{gid}:{home}:-::\n"
               ".\n")
    compile_assign(assign, os.path.join(root.users_dir, "cdb"))
    return root
