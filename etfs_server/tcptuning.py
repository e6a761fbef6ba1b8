"""TCP settings of data connections for long fat networks: congestion control and buffers.

`transfer.congestion_control` in server.yaml names a Linux congestion control (``bbr``,
``cubic``...) set with the ``TCP_CONGESTION`` socket option on every data connection this
server opens or accepts, so transfers can use one without changing the host's default
(``net.ipv4.tcp_congestion_control``) for everything else.  `transfer.socket_buffer_mib`
fixes ``SO_SNDBUF``/``SO_RCVBUF`` of data connections (0, the default, leaves the kernel's
autotuning within ``net.ipv4.tcp_wmem/tcp_rmem``); see docs/architecture.md section 4
for the measurements behind both defaults.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import trio

log = logging.getLogger(__name__)

AVAILABLE = Path("/proc/sys/net/ipv4/tcp_available_congestion_control")
# Linux: the *FORCE variants pass net.core.wmem_max/rmem_max (CAP_NET_ADMIN only).
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

_warned: set[str] = set()


def available_congestion_controls() -> list[str]:
    try:
        return AVAILABLE.read_text().split()
    except OSError:
        return []


def congestion_control_problem(name: str) -> str | None:
    """Why ``name`` cannot be used for data connections here, or None.

    A name not yet available is tried once on a scratch socket: as root the kernel then
    loads its module (``tcp_NAME``) by itself.
    """
    if name in available_congestion_controls():
        return None
    with socket.socket() as probe:
        try:
            probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
        except OSError:
            pass
    if name in available_congestion_controls():
        return None
    have = " ".join(available_congestion_controls()) or "none listed"
    return (
        f"congestion control {name!r} is not available on this host (available: {have}); "
        f"load it with `modprobe tcp_{name}` or choose another"
    )


def _warn_once(what: str, exc: OSError) -> None:
    if what not in _warned:
        _warned.add(what)
        log.warning("data connections: %s failed: %s (continuing without it)", what, exc.strerror or exc)


def tune(sock: socket.socket | trio.socket.SocketType, congestion_control: str, buffer_bytes: int) -> None:
    """Apply the data-connection TCP settings to ``sock``; a refusal is logged once, never fatal."""
    if congestion_control:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion_control.encode())
        except OSError as exc:
            _warn_once(f"TCP_CONGESTION {congestion_control}", exc)
    if buffer_bytes:
        for opt, force in ((socket.SO_SNDBUF, SO_SNDBUFFORCE), (socket.SO_RCVBUF, SO_RCVBUFFORCE)):
            try:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, force, buffer_bytes)
                except PermissionError:  # no CAP_NET_ADMIN: the kernel caps what it grants
                    sock.setsockopt(socket.SOL_SOCKET, opt, buffer_bytes)
            except OSError as exc:
                _warn_once(f"socket buffer {buffer_bytes} bytes", exc)
                continue
            # Capped at net.core.wmem_max/rmem_max (getsockopt reports twice the usable size).
            if sock.getsockopt(socket.SOL_SOCKET, opt) < buffer_bytes and "cap" not in _warned:
                _warned.add("cap")
                log.warning(
                    "data connections: socket buffers capped below transfer.socket_buffer_mib "
                    "(raise net.core.wmem_max/rmem_max, or give the server CAP_NET_ADMIN)"
                )
