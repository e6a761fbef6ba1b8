"""The data port: each connection says hello, then is served as a pull (this server is the
source) or handed to its push transfer (this server is the destination).
"""

from __future__ import annotations

import errno
import hmac
import logging
import socket
import time
from collections.abc import Callable

import msgspec
import trio

from etfs.protocol import data as d

from .datapath import MAX_FRAME, DataLinks, send, set_timeouts
from .destination import DestinationTransfer
from .errors import TransferError, failure_code
from .source import SourceRole

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0  # a data connection must present its hello this fast, in total


class DataListener:
    def __init__(
        self,
        links: DataLinks,
        source: SourceRole,
        find_transfer: Callable[[str], DestinationTransfer | None],
        data_threads: trio.CapacityLimiter,
        data_timeout: float,
    ) -> None:
        self.links = links
        self.source = source
        self.find_transfer = find_transfer
        self.data_threads = data_threads
        self.data_timeout = data_timeout
        # Connections that have not said hello yet get their own, small pool of threads, so
        # idle or slow peers cannot starve the transfers.
        self.hello_threads = trio.CapacityLimiter(32)

    async def handle(self, stream: trio.SocketStream) -> None:
        """A data connection arrived: a pull (we are the source) or a push (we are the destination)."""
        tsock = stream.socket
        sock = socket.socket(fileno=tsock.detach())
        sock.setblocking(True)
        peer = "?"
        handed_over = False
        try:
            host, port = sock.getpeername()[:2]
            peer = f"{host}:{port}"
            sock, hello = await trio.to_thread.run_sync(self._read_hello, sock, limiter=self.hello_threads)
            handed_over = await trio.to_thread.run_sync(
                self._dispatch, sock, hello, limiter=self.data_threads
            )
        except (OSError, msgspec.MsgspecError) as exc:
            log.warning("data connection from %s: %s", peer, exc)
        except Exception:
            log.exception("data connection from %s: internal error", peer)
        finally:
            if not handed_over:
                sock.close()

    def _read_hello(self, plain: socket.socket) -> tuple[socket.socket, d.DataHello]:
        """TLS handshake (if any) and the hello, within HELLO_TIMEOUT in total."""
        deadline = time.monotonic() + HELLO_TIMEOUT
        set_timeouts(plain, HELLO_TIMEOUT / 4)
        tls = self.links.tls_server
        sock = tls.wrap_socket(plain, server_side=True) if tls else plain
        try:
            return sock, self._hello_frame(sock, deadline)
        except BaseException:
            if sock is not plain:
                sock.close()  # wrapping detached `plain`: the caller's close would miss this one
            raise

    def _hello_frame(self, sock: socket.socket, deadline: float) -> d.DataHello:
        head = bytearray()
        while len(head) < d.LENGTH.size or len(head) < d.LENGTH.size + d.LENGTH.unpack_from(head)[0]:
            if time.monotonic() > deadline:
                raise TransferError(errno.ETIMEDOUT, "no data-connection hello in time")
            if len(head) >= d.LENGTH.size and d.LENGTH.unpack_from(head)[0] > MAX_FRAME:
                raise TransferError(errno.EPROTO, "oversized data-connection hello")
            want = (
                d.LENGTH.size if len(head) < d.LENGTH.size else d.LENGTH.size + d.LENGTH.unpack_from(head)[0]
            )
            chunk = sock.recv(want - len(head))
            if not chunk:
                raise ConnectionResetError(errno.ECONNRESET, "peer closed before its hello")
            head += chunk
        set_timeouts(sock, self.data_timeout)
        return d.decode_hello(bytes(head[d.LENGTH.size :]))

    def _dispatch(self, sock: socket.socket, hello: d.DataHello) -> bool:
        """Serve a pull, or hand a push connection to its transfer (then True: do not close it)."""
        if hello.kind == "pull":
            try:
                body, fd = self.source.open(hello.token)
            except OSError as exc:
                send(sock, d.encode(refusal(exc)))
                raise
            self.source.serve(sock, body, fd)
            return False
        transfer = self.find_transfer(hello.transfer_id)
        if (
            transfer is None
            or not hmac.compare_digest(transfer.ticket, hello.token)
            or transfer.push_sockets is None
        ):
            raise TransferError(errno.EACCES, "push refused: unknown transfer or wrong ticket")
        try:
            trio.from_thread.run_sync(transfer.push_sockets.send_nowait, sock)
        except (trio.WouldBlock, trio.ClosedResourceError):
            raise TransferError(errno.EACCES, "push refused: the transfer has all its streams") from None
        return True


def refusal(exc: OSError) -> d.DataError:
    return d.DataError(errno=exc.errno or errno.EIO, message=exc.strerror or str(exc), code=failure_code(exc))
