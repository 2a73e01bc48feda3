"""Receivers for the remote-delivery tests: scriptable SMTP and QMTP servers on loopback
addresses (run in a loop thread), a host that never answers, and a test certificate.

A peer's answers default to a well-behaved server; a test replaces any of them
by key (GREETING, EHLO, HELO, STARTTLS, MAIL, RCPT, DATA, BODY, DOT) with bytes,
a function of the command's argument, STALL (never answer) or CLOSE (hang up).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Any

STALL = object()
CLOSE = object()
#: a queued message as remote delivery gets it: LF line ends, a Received line first
MESSAGE = b"Received: (qmail 1 invoked by uid 0); 1 Jan 2030 00:00:00 -0000\nSubject: hi\n\nbody\n"


class LoopThread:
    """An event loop in a daemon thread; `call(coro)` runs a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def cancel_all() -> None:  # sessions a test left stalled end here, not at exit
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.call(cancel_all(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            if not self.thread.is_alive():
                self.loop.close()


async def _listen(peer, **kw):
    """Start a peer's server on its host and port (0: any); the bound port goes back into it."""
    peer.server = await asyncio.start_server(peer._session, peer.host, peer.port, **kw)
    peer.port = peer.server.sockets[0].getsockname()[1]
    return peer


def _stop(peer) -> None:
    if peer.server:
        peer.server.close()
        peer.server = None


@dataclass
class Mail:
    helo: str
    sender: str
    rcpts: list[str]
    data: bytes          # as received on the wire, dot-stuffing undone, CRLF kept
    tls: bool


@dataclass
class SmtpPeer:
    host: str
    port: int = 0
    extensions: tuple[str, ...] = ("PIPELINING", "8BITMIME")
    tls: ssl.SSLContext | None = None      # offer STARTTLS with this context
    replies: dict[str, Any] = field(default_factory=dict)
    mails: list[Mail] = field(default_factory=list)
    commands: list[bytes] = field(default_factory=list)
    connections: int = 0
    active: int = 0
    peak: int = 0                            # most sessions at once
    server: asyncio.AbstractServer | None = None

    async def start(self) -> "SmtpPeer":
        return await _listen(self, limit=1 << 20, backlog=1000)

    async def close(self) -> None:
        _stop(self)

    async def _answer(self, writer, key: str, arg: str, default: bytes) -> bool:
        value = self.replies.get(key, default)
        if callable(value):
            value = value(arg)
        if value is STALL:
            await asyncio.sleep(3600)
        if value is CLOSE:
            writer.transport.abort()
            return False
        writer.write(value)
        await writer.drain()
        return True

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        helo, sender, rcpts, tls = "", "", [], False
        try:
            if not await self._answer(writer, "GREETING", "", b"220 peer.test ESMTP\r\n"):
                return
            while line := await reader.readline():
                self.commands.append(line)
                verb, _, arg = line.rstrip(b"\r\n").decode("utf-8", "replace").partition(" ")
                verb = verb.upper()
                if verb == "EHLO":
                    ext = list(self.extensions) + (["STARTTLS"] if self.tls and not tls else [])
                    text = b"".join(b"250-" + e.encode() + b"\r\n" for e in ["peer.test"] + ext[:-1])
                    text += b"250 " + (ext[-1] if ext else "peer.test").encode() + b"\r\n"
                    helo = arg
                    ok = await self._answer(writer, "EHLO", arg, text)
                elif verb == "HELO":
                    helo = arg
                    ok = await self._answer(writer, "HELO", arg, b"250 peer.test\r\n")
                elif verb == "STARTTLS":
                    value = self.replies.get("STARTTLS", b"220 ready\r\n")
                    ok = await self._answer(writer, "STARTTLS", arg, value)
                    if ok and self.tls is not None and value[:3] == b"220":
                        await writer.start_tls(self.tls)
                        tls, helo = True, ""
                elif verb == "MAIL":
                    sender = arg.split(":", 1)[1].split(">")[0].lstrip("<")
                    rcpts = []
                    ok = await self._answer(writer, "MAIL", arg, b"250 ok\r\n")
                elif verb == "RCPT":
                    addr = arg.split(":", 1)[1].split(">")[0].lstrip("<")
                    value = self.replies.get("RCPT", b"250 ok\r\n")
                    value = value(addr) if callable(value) else value
                    if isinstance(value, bytes) and value[:1] == b"2":
                        rcpts.append(addr)
                    ok = await self._answer(writer, "RCPT", addr, value)
                elif verb == "DATA":
                    value = self.replies.get("DATA", b"354 go ahead\r\n")
                    ok = await self._answer(writer, "DATA", "", value)
                    if ok and isinstance(value, bytes) and value[:1] == b"3":
                        ok = await self._data(reader, writer, helo, sender, rcpts, tls)
                elif verb == "QUIT":
                    writer.write(b"221 bye\r\n")
                    ok = False
                else:
                    writer.write(b"502 unimplemented\r\n")
                    ok = True
                if not ok:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError):
            pass
        finally:
            self.active -= 1
            writer.transport.abort() if writer.transport.is_closing() else writer.close()

    async def _data(self, reader, writer, helo, sender, rcpts, tls) -> bool:
        body = bytearray()
        first = True
        while True:
            line = await reader.readline()
            if not line:
                return False
            if first and self.replies.get("BODY") is CLOSE:
                writer.transport.abort()
                return False
            first = False
            if line == b".\r\n":
                break
            body += line[1:] if line.startswith(b".") else line
        self.mails.append(Mail(helo, sender, list(rcpts), bytes(body), tls))
        return await self._answer(writer, "DOT", "", b"250 ok 1234 qp 5678\r\n")


async def _netstring(reader: asyncio.StreamReader) -> bytes:
    digits = await reader.readuntil(b":")
    data = await reader.readexactly(int(digits[:-1]))
    if await reader.readexactly(1) != b",":
        raise ValueError("no comma")
    return data


def _split(data: bytes) -> list[bytes]:
    out = []
    while data:
        n, _, rest = data.partition(b":")
        out.append(rest[:int(n)])
        data = rest[int(n) + 1:]
    return out


@dataclass
class QmtpPeer:
    host: str
    port: int = 0
    answer: Any = lambda rcpt: b"Kok thanks"     # bytes per recipient, or CLOSE
    packages: list[tuple[bytes, str, list[str]]] = field(default_factory=list)
    connections: int = 0
    server: asyncio.AbstractServer | None = None

    async def start(self) -> "QmtpPeer":
        return await _listen(self)

    async def close(self) -> None:
        _stop(self)

    async def _session(self, reader, writer) -> None:
        self.connections += 1
        try:
            message = await _netstring(reader)
            sender = (await _netstring(reader)).decode()
            rcpts = [r.decode() for r in _split(await _netstring(reader))]
            self.packages.append((message, sender, rcpts))
            for r in rcpts:
                a = self.answer(r)
                if a is CLOSE:
                    break
                writer.write(b"%d:%s," % (len(a), a))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.transport.abort()


class Blackhole:
    """A host that never completes a connection: its one-place accept queue is kept full."""

    def __init__(self, host: str, port: int):
        self.listener = socket.socket()
        self.listener.bind((host, port))
        self.listener.listen(0)
        self.filler = socket.create_connection((host, port), timeout=2)

    def close(self) -> None:
        self.filler.close()
        self.listener.close()


def common_port(hosts: list[str]) -> int:
    """A port free on every one of `hosts` (peers on several loopback addresses share it)."""
    for _ in range(50):
        socks = []
        try:
            s = socket.socket(socket.AF_INET6 if ":" in hosts[0] else socket.AF_INET)
            s.bind((hosts[0], 0))
            socks.append(s)
            port = s.getsockname()[1]
            for h in hosts[1:]:
                t = socket.socket(socket.AF_INET6 if ":" in h else socket.AF_INET)
                socks.append(t)
                t.bind((h, port))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no common free port")


def make_cert(directory, names: list[str], ips: list[str]) -> tuple[str, str]:
    """A self-signed certificate (it is its own CA) from `openssl req -x509`: (cert, key) paths."""
    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    san = ",".join([f"DNS:{n}" for n in names] + [f"IP:{i}" for i in ips])
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={names[0]}",
                    "-addext", f"subjectAltName={san}"], check=True, capture_output=True, timeout=60)
    return cert, key


def server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx
