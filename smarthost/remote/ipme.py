"""This host's own addresses, for qmail-remote's loop check (qmail's ipme.c).

The addresses of every interface that is up, IPv4 and IPv6, from getifaddrs(3);
plus 0.0.0.0 and :: (a connection to them reaches this host, as netqmail
noticed); plus the lines of `control/moreipme` and minus those of
`control/notipme` (the names of the qmail "moreipme" patch, for NAT and port
forwarding that the interfaces do not show).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import socket
import sys

from smarthost.remote.routing import IP, parse_ip

IFF_UP = 0x1
ALWAYS = frozenset({ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")})


class _Ifaddrs(ctypes.Structure):
    pass


_Ifaddrs._fields_ = [
    ("ifa_next", ctypes.POINTER(_Ifaddrs)),
    ("ifa_name", ctypes.c_char_p),
    ("ifa_flags", ctypes.c_uint),
    ("ifa_addr", ctypes.c_void_p),
    ("ifa_netmask", ctypes.c_void_p),
    ("ifa_ifu", ctypes.c_void_p),
    ("ifa_data", ctypes.c_void_p),
]

_libc = None


def _family(sa: int) -> int:
    if sys.platform.startswith("linux"):
        return ctypes.c_ushort.from_address(sa).value
    return ctypes.c_ubyte.from_address(sa + 1).value  # BSD: sa_len, then sa_family


def interface_addresses() -> frozenset[IP]:
    """Addresses of the interfaces that are up; OSError if the system will not say."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _libc.getifaddrs.argtypes = [ctypes.POINTER(ctypes.POINTER(_Ifaddrs))]
        _libc.freeifaddrs.argtypes = [ctypes.POINTER(_Ifaddrs)]
    head = ctypes.POINTER(_Ifaddrs)()
    if _libc.getifaddrs(ctypes.byref(head)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "getifaddrs failed")
    found: set[IP] = set()
    try:
        node = head
        while node:
            ifa = node.contents
            if ifa.ifa_addr and ifa.ifa_flags & IFF_UP:
                fam = _family(ifa.ifa_addr)
                if fam == socket.AF_INET:
                    found.add(ipaddress.IPv4Address(ctypes.string_at(ifa.ifa_addr + 4, 4)))
                elif fam == socket.AF_INET6:
                    found.add(ipaddress.IPv6Address(ctypes.string_at(ifa.ifa_addr + 8, 16)))
            node = ifa.ifa_next
    finally:
        _libc.freeifaddrs(head)
    return frozenset(found)


def _listed(lines: list[str] | None) -> set[IP]:
    out = set()
    for line in lines or []:
        ip = parse_ip(line)
        if ip is not None:
            out.add(ip)
    return out


def ipme(moreipme: list[str] | None = None, notipme: list[str] | None = None) -> frozenset[IP]:
    """qmail's ipme list, with the moreipme/notipme corrections."""
    return frozenset((interface_addresses() | ALWAYS | _listed(moreipme)) - _listed(notipme))
