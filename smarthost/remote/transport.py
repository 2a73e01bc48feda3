"""The sockets of remote delivery: connect, read and write with qmail-remote(8)'s timeouts.

Thin asyncio adapter. `connect()` applies timeoutconnect and tells a timeout
(which tcpto counts) from other failures; a `Channel` applies timeoutremote to
every read and write, feeds replies through the bounded `ReplyParser`, and
turns every kind of trouble into `Died` for the session; `drive()` runs an
`SmtpSession` over a channel. No threads: hundreds of these run in one loop.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from typing import BinaryIO, Callable

from smarthost.remote.report import Outcome
from smarthost.remote.routing import IP
from smarthost.remote.smtp_codec import DataEncoder, Reply, ReplyError, ReplyParser
from smarthost.remote.smtp_session import BODY, READ, Died, Send, SmtpSession, StartTls, TlsFailed, TlsInfo

READ_CHUNK = 65536
#: seconds to let a closing connection flush (QUIT, TLS close_notify); qmail does not wait at all
CLOSE_WAIT = 2.0


class ConnectFailed(Exception):
    def __init__(self, timed_out: bool, reason: str):
        super().__init__(reason)
        self.timed_out = timed_out


def seconds(n: float) -> str:
    return f"{n:g} second" + ("" if n == 1 else "s")


async def connect(ip: IP, port: int, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.wait_for(asyncio.open_connection(str(ip), port, limit=READ_CHUNK), timeout)
    except TimeoutError:  # asyncio's, or the kernel's ETIMEDOUT: both are "did not answer"
        raise ConnectFailed(True, f"timed out after {seconds(timeout)}") from None
    except OSError as e:  # asyncio rewrites strerror; the errno says it plainly
        raise ConnectFailed(False, os.strerror(e.errno) if e.errno else str(e)) from None


def _cause(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e) or type(e).__name__
    return text[:1].upper() + text[1:]


class Channel:
    """One connection with timeouts; any failure marks it dead and raises Died."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float):
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.parser = ReplyParser()
        self.dead = False

    def usable(self) -> bool:
        """Open, and nothing said that nobody asked for: a kept connection may carry another
        message only if the next reply read is surely the answer to the next command."""
        if self.dead or self.writer.is_closing() or self.reader.at_eof():
            return False
        return not self.parser.pending and not getattr(self.reader, "_buffer", b"")

    def die(self, cause: str) -> Died:
        """Mark the connection unusable; the Died to raise."""
        self.dead = True
        return Died(cause)

    async def send(self, data: bytes) -> None:
        if self.dead:
            raise Died("The connection failed")
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), self.timeout)
        except TimeoutError:
            raise self.die(f"No progress for {seconds(self.timeout)}") from None
        except (OSError, RuntimeError) as e:  # RuntimeError: writing to a closed transport
            raise self.die(_cause(e)) from None

    async def read_some(self, timeout: float | None = None) -> bytes:
        try:
            data = await asyncio.wait_for(self.reader.read(READ_CHUNK), self.timeout if timeout is None else timeout)
        except TimeoutError:
            raise self.die(f"No reply for {seconds(self.timeout)}") from None
        except OSError as e:
            raise self.die(_cause(e)) from None
        if not data:
            raise self.die("The connection closed")
        return data

    async def reply(self) -> Reply:
        # The whole reply within timeoutremote, not each piece: a server that drips
        # a byte at a time must not hold a delivery slot for ever.
        deadline = asyncio.get_running_loop().time() + self.timeout
        while True:
            try:
                r = self.parser.next()
            except ReplyError as e:
                raise self.die(_cause(e)) from None
            if r is not None:
                return r
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise self.die(f"No reply for {seconds(self.timeout)}")
            self.parser.feed(await self.read_some(left))

    async def send_body(self, f: BinaryIO) -> None:
        enc = DataEncoder()
        while True:
            try:
                chunk = f.read(READ_CHUNK)
            except OSError as e:
                raise self.die(f"Unable to read the message ({_cause(e)})") from None
            if not chunk:
                break
            out = enc.feed(chunk)
            if out:
                await self.send(out)
        await self.send(enc.end())

    async def starttls(self, ctx: ssl.SSLContext, server_hostname: str | None) -> TlsInfo:
        if self.parser.pending:
            # Bytes sent before the handshake must not be read as if they came through TLS.
            self.dead = True
            raise TlsFailed("the server sent more than its STARTTLS reply")
        try:
            await asyncio.wait_for(
                self.writer.start_tls(ctx, server_hostname=server_hostname, ssl_handshake_timeout=self.timeout),
                self.timeout + 1)
        except ssl.SSLCertVerificationError as e:
            self.dead = True
            raise TlsFailed(e.verify_message or "certificate verify failed") from None
        except TimeoutError:
            self.dead = True
            raise TlsFailed(f"no handshake within {seconds(self.timeout)}") from None
        except (ssl.SSLError, OSError, RuntimeError) as e:
            self.dead = True
            raise TlsFailed(getattr(e, "reason", None) or _cause(e)) from None
        obj = self.writer.get_extra_info("ssl_object")
        version = obj.version() if obj else "TLS"
        cipher = obj.cipher()[0] if obj and obj.cipher() else "unknown"
        return TlsInfo(version or "TLS", cipher, ctx.verify_mode == ssl.CERT_REQUIRED)

    async def close(self) -> None:
        """QUIT without waiting for the answer (as qmail-remote), then close."""
        try:
            if self.dead:
                self.writer.transport.abort()
                return
            self.writer.write(b"QUIT\r\n")
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), CLOSE_WAIT)
        except Exception:  # the connection's edge: it is over either way
            self.writer.transport.abort()


async def drive(chan: Channel, session: SmtpSession, open_body: Callable[[], BinaryIO],
                tls_context: Callable[[bool], ssl.SSLContext], server_hostname: str | None,
                keep: Callable[[Channel, SmtpSession], bool] | None = None) -> Outcome:
    """Run the session's dialogue over `chan`; then close it, unless `keep` takes it."""
    gen = session.run()
    value: object = None
    exc: BaseException | None = None
    try:
        while True:
            try:
                op = gen.throw(exc) if exc is not None else gen.send(value)
            except StopIteration as stop:
                result: Outcome = stop.value
                return result
            value = exc = None
            try:
                if isinstance(op, Send):
                    await chan.send(op.data)
                elif op is READ:
                    value = await chan.reply()
                elif op is BODY:
                    try:
                        f = open_body()
                    except OSError as e:
                        raise chan.die(f"Unable to read the message ({_cause(e)})") from None
                    with f:
                        await chan.send_body(f)
                elif isinstance(op, StartTls):
                    try:
                        ctx = tls_context(op.verify)
                    except (ssl.SSLError, OSError) as e:  # control/tlsca.pem unusable
                        chan.dead = True
                        raise TlsFailed(f"no TLS settings ({_cause(e)})") from None
                    value = await chan.starttls(ctx, server_hostname)
                else:
                    raise TypeError(f"unknown session request {op!r}")
            except (Died, TlsFailed) as e:
                exc = e
    finally:
        gen.close()
        if not (keep is not None and session.reusable and chan.usable() and keep(chan, session)):
            await chan.close()
