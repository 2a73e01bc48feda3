"""qmail-qread: list the queued messages and their recipients, in qmail-qread's form."""

from __future__ import annotations

import os
import sys

from miniqmail.datefmt import date_gmt
from miniqmail.progmain import fatal, run
from smarthost.queue import Queue
from smarthost.root import Root
from smarthost.sendqueue import CHANNELS


def printable(raw: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 else "_" for b in raw)


def entry(q: Queue, n: int) -> str | None:
    try:
        with open(q.info(n), "rb") as f:
            birth = os.fstat(f.fileno()).st_mtime
            info = f.read()
    except FileNotFoundError:
        return None
    sender = info[1:].split(b"\0", 1)[0] if info[:1] == b"F" else b"???"
    try:
        size = os.stat(q.mess(n)).st_size
    except FileNotFoundError:
        size = 0
    bouncing = " bouncing" if os.path.exists(q.bounce(n)) else ""
    lines = [f"{date_gmt(birth)}  #{n}  {size}  <{printable(sender)}> {bouncing}"]
    for chan in CHANNELS:
        try:
            with open(q.channel(chan, n), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue
        for rec in data.split(b"\0"):
            if rec[:1] == b"T":
                lines.append(f"\t{chan}\t{printable(rec[1:])}")
            elif rec[:1] == b"D":
                lines.append(f"  done\t{chan}\t{printable(rec[1:])}")
    return "\n".join(lines) + "\n"


def qread() -> int:
    q = Queue(Root.from_env().queue_dir)
    try:
        q.check()
        ids = q.info_ids()
    except OSError as e:
        return fatal("qmail-qread", f"unable to read the queue: {e}", 111)
    except Exception as e:
        return fatal("qmail-qread", str(e), 111)
    for n in ids:
        text = entry(q, n)
        if text:
            sys.stdout.write(text)
    return 0


def main() -> None:
    run("qmail-qread", qread)


if __name__ == "__main__":
    main()
