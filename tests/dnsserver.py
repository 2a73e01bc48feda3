"""A tiny authoritative DNS server for tests, built with dnspython: UDP on 127.0.0.1, port 0.

Serves the names it is given (any record type dnspython can read from text,
CNAMEs followed), answers NXDOMAIN for every other name, SERVFAIL for names in
`servfail`, and nothing at all for names in `silent`. Runs in a thread, so
child processes (qmail-remote) can ask it too.
"""

from __future__ import annotations

import select
import socket
import threading

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self, ttl: int = 0):
        self.ttl = ttl
        self.records: dict[str, list[tuple[str, str]]] = {}
        self.servfail: set[str] = set()
        self.silent: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def add(self, name: str, rdtype: str, text: str) -> "DnsServer":
        self.records.setdefault(name.lower().rstrip("."), []).append((rdtype.upper(), text))
        return self

    def remove(self, name: str) -> None:
        self.records.pop(name.lower().rstrip("."), None)

    def start(self) -> "DnsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.05)
            if not ready:
                continue
            try:
                wire, peer = self.sock.recvfrom(65535)
            except OSError:
                continue
            answer = self.answer(wire)
            if answer is not None:
                self.sock.sendto(answer, peer)

    def answer(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        q = query.question[0]
        name = q.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(q.rdtype)
        self.queries.append((name, rdtype))
        if name in self.silent:
            return None
        resp = dns.message.make_response(query)
        resp.flags |= dns.flags.AA
        if name in self.servfail:
            resp.set_rcode(dns.rcode.SERVFAIL)
            return resp.to_wire()
        for _ in range(8):  # follow CNAMEs inside the zone
            records = self.records.get(name)
            if records is None:
                if not resp.answer:
                    resp.set_rcode(dns.rcode.NXDOMAIN)
                break
            cname = [text for t, text in records if t == "CNAME"]
            if cname and rdtype != "CNAME":
                resp.answer.append(dns.rrset.from_text_list(name + ".", self.ttl, "IN", "CNAME", cname[:1]))
                name = cname[0].lower().rstrip(".")
                continue
            matches = [text for t, text in records if t == rdtype]
            if matches:
                resp.answer.append(dns.rrset.from_text_list(name + ".", self.ttl, "IN", rdtype, matches))
            break
        return resp.to_wire()
