"""Where this server may open data connections: the `transfer.peers` allow-list of server.yaml.

A transfer makes one server connect to another: the destination pulls from the source's
data port, or the source pushes to the destination's. The address comes from the client
that starts the transfer, so without a list an authenticated user with transfer rights can
make this server connect to any host:port (it only sends a data hello, but that is still a
request forged on the user's behalf). With ``peers`` set, only the listed networks and host
names are reached; a name that is not listed is resolved and every address it connects to
must lie in a listed network.

Some addresses are never a peer unless listed on their own (an entry inside them, such as
``169.254.10.0/24``; a wide entry like ``0.0.0.0/0`` does not count): link-local (where
cloud metadata services live), multicast, broadcast and unspecified addresses.  Loopback
stays allowed: a data connection sends nothing a client chose to anything that has not
proven it is an etfs data port (`etfs.protocol.data`), and a single host's servers use it.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# (family, type, proto, sockaddr), as socket.getaddrinfo gives them
Target = tuple[int, int, int, tuple[Any, ...]]


class PeerRefused(PermissionError):
    """The address is not in `transfer.peers`."""


# Never peers unless a listed entry lies inside them (see the module's docstring).
SPECIAL: tuple[Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "169.254.0.0/16",
        "fe80::/10",
        "224.0.0.0/4",
        "ff00::/8",
        "0.0.0.0/8",
        "255.255.255.255/32",
        "::/128",
    )
)


def parse_entry(text: str) -> Network | str:
    """A network (``10.0.0.0/8``, ``192.0.2.7``, ``2001:db8::/32``) or a host name."""
    text = text.strip()
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        pass
    name = text.rstrip(".").lower()
    if not name or any(c.isspace() or c in "/[]" for c in name):
        raise ValueError(f"{text!r} is neither a network (a.b.c.d/n) nor a host name")
    return name


@dataclass(frozen=True)
class PeerPolicy:
    """``None`` entries: anywhere but the special addresses (the default)."""

    entries: tuple[Network | str, ...] | None = None

    @property
    def restricted(self) -> bool:
        return self.entries is not None

    def _ip_allowed(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        listed = [e for e in self.entries or () if not isinstance(e, str) and addr in e]
        special = [n for n in SPECIAL if addr in n]
        if special:
            # Only an entry inside the special network itself allows it.
            return any(e.version == n.version and e.subnet_of(n) for e in listed for n in special)  # type: ignore[arg-type]
        return self.entries is None or bool(listed)

    def check_host(self, host: str) -> None:
        """Refuse early, without resolving, a literal address or a name that cannot be allowed.

        Names not listed are decided at connect time (`addresses`), on what they resolve to.
        """
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return  # a name: resolved and checked when connecting
        if not self._ip_allowed(host):
            raise PeerRefused(errno.EACCES, f"{host} is not in this server's transfer.peers")

    def addresses(self, host: str, port: int) -> list[Target]:
        """Resolved (family, type, proto, sockaddr) for ``host:port`` that may be connected to.

        Raises PeerRefused when none may, OSError (gaierror) when the name does not resolve.
        """
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        found: list[Target] = [(fam, typ, proto, addr) for fam, typ, proto, _, addr in infos]
        if self.entries is not None and host.rstrip(".").lower() in self.entries:
            return found  # listed by name: the site trusts whatever it resolves to
        allowed = [a for a in found if self._ip_allowed(str(a[3][0]))]
        if not allowed:
            raise PeerRefused(errno.EACCES, f"{host} is not in this server's transfer.peers")
        return allowed


def connect(
    policy: PeerPolicy,
    host: str,
    port: int,
    timeout: float,
    prepare: Callable[[socket.socket], None] | None = None,
) -> socket.socket:
    """Like `socket.create_connection`, but only to addresses the policy allows.

    ``prepare`` sees each socket before it connects (options that must precede the SYN).
    """
    last: OSError | None = None
    for fam, typ, proto, addr in policy.addresses(host, port):
        sock = socket.socket(fam, typ, proto)
        try:
            if prepare is not None:
                prepare(sock)
            sock.settimeout(timeout)
            sock.connect(addr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
        except BaseException:
            sock.close()
            raise
    raise last or OSError(errno.EHOSTUNREACH, f"no address for {host}")
