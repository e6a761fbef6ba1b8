"""Blocking I/O on data connections, run in worker threads: sends and receives bounded by
``transfer.data_timeout``, feeding the sans-IO machines of `etfs.protocol.data`, and hashing
file ranges.

The C loops (sendfile, read+send, recv+write, splice) need blocking file descriptors, so
every wait is bounded with SO_RCVTIMEO/SO_SNDTIMEO instead of non-blocking sockets.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import time
from typing import Any

import trio

from etfs.protocol import data as d
from etfs.protocol.transfer import FailureCode

from ..config import ServerConfig
from ..peers import PeerRefused, connect
from ..tcptuning import tune
from .errors import TransferError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
# Blocks pass through user space (read+send, recv+write, TLS, hashing for verification) in
# pieces of this size, through one buffer per stream that is reused for every block: no
# buffer or bytes object sized to a block (4-16 MiB, times the streams) is ever made.
CHUNK = 1 << 20


def silent_peer() -> TimeoutError:
    # A blocking socket whose SO_RCVTIMEO/SO_SNDTIMEO expired raises EAGAIN: say what it means.
    return TimeoutError(errno.ETIMEDOUT, "the peer went silent (transfer.data_timeout expired)")


def send(sock: socket.socket, data: bytes | memoryview) -> None:
    try:
        sock.sendall(data)
    except BlockingIOError:
        raise silent_peer() from None


def receive_event(sock: socket.socket, conn: d.DataMachine, deadline: float | None = None) -> d.DataEvent:
    """Feed ``conn`` from the socket until it has an event, receiving only the bytes it asks
    for (a block payload behind them stays in the socket for splice/recv+write); what it has
    to send goes out before each wait (not after the event: the caller decides when).

    A peer that breaks the protocol is an EPROTO `TransferError`; LookupError (an etfs data
    port that does not know the key) passes through.
    """
    while True:
        event = conn.next_event()
        if not isinstance(event, d.NeedData):
            return event
        if deadline is not None and time.monotonic() > deadline:
            raise TransferError(errno.ETIMEDOUT, "the data connection's peer is too slow to open it")
        if out := conn.data_to_send():
            send(sock, out)
        if not conn.wanted:
            raise d.DataLocalError(f"{type(conn).__name__} waits for an event but asks for no bytes")
        try:
            chunk = sock.recv(conn.wanted)
        except BlockingIOError:
            raise silent_peer() from None
        try:
            conn.receive_data(chunk)
        except d.DataProtocolError as exc:
            raise TransferError(errno.EPROTO, str(exc)) from None


def recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from the socket (the TLS path, where splice and recv+write cannot be used)."""
    got = 0
    while got < len(view):
        try:
            n = sock.recv_into(view[got:])
        except BlockingIOError:
            raise silent_peer() from None
        if not n:
            raise ConnectionResetError(errno.ECONNRESET, "peer closed the data connection")
        got += n


def hash_range(fd: int, offset: int, length: int, view: memoryview, hasher: Any) -> int | None:
    """xxh3-64 of ``length`` bytes of ``fd`` at ``offset``, read in pieces into ``view``.

    ``hasher`` is an ``xxhash.xxh3_64`` object, reset here and reused.  None if the file ends first.
    """
    hasher.reset()
    step = len(view)
    done = 0
    while done < length:
        n = os.preadv(fd, [view[: min(step, length - done)]], offset + done)
        if n <= 0:
            return None
        hasher.update(view[:n])
        done += n
    return int(hasher.intdigest())


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def set_timeouts(sock: socket.socket, seconds: float) -> None:
    # SO_RCVTIMEO/SNDTIMEO keep the fd blocking for the C loops yet bound every wait.
    tv = d.timeval(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class DataLinks:
    """Opening data connections to other servers: `transfer.peers`, timeouts and TLS in one place."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        # Data connections use TLS when this server has a certificate; sendfile and splice
        # then give way to read+send / recv+write through the TLS layer.
        self.tls_server: ssl.SSLContext | None = None
        self.tls_client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.tls_client.check_hostname = False  # peers are named by address; the CA vouches
        if config.tls is not None:
            self.tls_server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.tls_server.load_cert_chain(str(config.tls.cert_file), str(config.tls.key_file))
        if config.tls is not None and config.tls.ca_file is not None:
            self.tls_client.load_verify_locations(str(config.tls.ca_file))
        elif config.tls is not None:
            log.warning(
                "tls.ca_file not set: data connections to other servers are encrypted but not verified"
            )
            self.tls_client.verify_mode = ssl.CERT_NONE

    def tune(self, sock: socket.socket | trio.socket.SocketType) -> None:
        """Congestion control and socket buffers of a data connection (server.yaml `transfer:`)."""
        tune(sock, self.config.congestion_control, self.config.socket_buffer)

    def check_peer(self, host: str) -> None:
        try:
            self.config.peers.check_host(host)
        except PeerRefused as exc:
            log.warning("data connection to %s refused: not in transfer.peers", host)
            raise TransferError(errno.EACCES, exc.strerror or str(exc)) from None

    def open(self, host: str, port: int, tls: bool, secret: bytes, hello: d.DataHello) -> socket.socket:
        """A data connection to another server's data port: greeting checked, ``hello`` sent.

        Only to addresses `transfer.peers` allows (EACCES otherwise), and nothing but the
        opener (magic, key id, nonce: nothing a client chose) is sent until the listener
        proved it knows ``secret``; then ``hello``, with our proof.  Whatever keeps
        a proven etfs data port from answering (refused, timed out, unreachable, something
        else listening, TLS failing) is one and the same error: the client who named the
        address learns nothing about the network behind it.
        """
        try:
            sock = connect(self.config.peers, host, port, CONNECT_TIMEOUT, self.tune)
        except PeerRefused as exc:
            log.warning("data connection to %s refused: not allowed by transfer.peers", host)
            raise TransferError(errno.EACCES, exc.strerror or str(exc)) from None
        except OSError as exc:
            log.info("data connection to %s:%d: %s", host, port, exc)
            raise no_data_port(host, port) from None
        try:
            sock.settimeout(None)
            set_timeouts(sock, CONNECT_TIMEOUT)
            if tls:
                sock = self.tls_client.wrap_socket(sock)
            conn = d.Connector(secret, hello)
            send(sock, conn.data_to_send())  # the opener: nothing a client chose
            event = receive_event(sock, conn)
            assert isinstance(event, d.Greeted)
            set_timeouts(sock, self.config.data_timeout)
            send(sock, conn.data_to_send())  # the hello, with our proof
        except LookupError:
            sock.close()
            raise TransferError(
                errno.EACCES, "capability refused: not known at its data port", FailureCode.CAPABILITY_REFUSED
            ) from None
        except OSError as exc:  # a protocol error too (receive_event: EPROTO)
            sock.close()
            log.info("data connection to %s:%d: no etfs greeting: %s", host, port, exc)
            raise no_data_port(host, port) from None
        except BaseException:
            sock.close()
            raise
        return sock


def no_data_port(host: str, port: int) -> TransferError:
    return TransferError(
        errno.EHOSTUNREACH, f"no etfs data port answered at {host}:{port}", FailureCode.PEER_UNREACHABLE
    )
