"""The data port: each connection proves itself (`etfs.protocol.data.Listener`), then is served
as a pull (this server is the source) or handed to its push transfer (this server is the
destination).

Unauthenticated connections cost a trio task, not a thread (only a TLS handshake needs
one), for at most HELLO_TIMEOUT; at most MAX_UNAUTHENTICATED of them wait at a time and
a new one evicts the oldest, so connections trickling bytes cannot starve a transfer whose
own connections authenticate in a few milliseconds.
"""

from __future__ import annotations

import errno
import hmac
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import msgspec
import trio

from etfs.protocol import data as d

from .capabilities import UsedUp
from .datapath import DataLinks, receive_event, send, set_timeouts
from .destination import DestinationTransfer
from .errors import TransferError, failure_code
from .source import SourceRole

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 5.0  # a data connection must prove itself and say hello this fast, in total
MAX_UNAUTHENTICATED = 64


class DataListener:
    def __init__(
        self,
        links: DataLinks,
        source: SourceRole,
        push_target: Callable[[bytes], DestinationTransfer | None],
        data_threads: trio.CapacityLimiter,
        data_timeout: float,
    ) -> None:
        self.links = links
        self.source = source
        self.push_target = push_target  # key id of a ticket -> its transfer
        self.data_threads = data_threads
        self.data_timeout = data_timeout
        # TLS handshakes run in threads of their own pool: slow peers cannot starve transfers.
        self.hello_threads = trio.CapacityLimiter(MAX_UNAUTHENTICATED)
        self._pending: dict[object, Callable[[], None]] = {}  # oldest first: how to abort each
        self.evicted = 0

    def _secret(self, kid: bytes) -> bytes | None:
        secret = self.source.caps.secret_for(kid)
        if secret is None and (t := self.push_target(kid)) is not None:
            secret = t.ticket
        return secret

    async def handle(self, stream: trio.SocketStream) -> None:
        """A data connection arrived: authenticate it, then serve it or hand it over."""
        peer = "?"
        sock: socket.socket | None = None
        handed_over = False
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"{host}:{port}"
            opened = await self._authenticate(stream)
            if opened is None:
                return
            sock, hello, kid = opened
            handed_over = await trio.to_thread.run_sync(
                self._dispatch, sock, hello, kid, limiter=self.data_threads
            )
        except UsedUp as exc:
            log.info("data connection from %s: %s", peer, exc)
        except (OSError, msgspec.MsgspecError, d.DataProtocolError) as exc:
            log.warning("data connection from %s: %s", peer, exc)
        except Exception:
            log.exception("data connection from %s: internal error", peer)
        finally:
            if sock is not None and not handed_over:
                sock.close()
            if sock is None:
                await trio.aclose_forcefully(stream)

    async def _authenticate(self, stream: trio.SocketStream) -> tuple[Any, d.DataHello, bytes] | None:
        """(blocking socket, hello, key id) of a connection that proved itself, or None."""
        key = object()
        with trio.CancelScope(deadline=trio.current_time() + HELLO_TIMEOUT) as scope:
            plain = stream.socket
            self.links.tune(plain)  # before the first byte: the whole connection runs with it
            self._pending[key] = lambda: _abort(scope, plain)
            if len(self._pending) > MAX_UNAUTHENTICATED:
                oldest = next(iter(self._pending))
                self._pending.pop(oldest)()
                self.evicted += 1
                if self.evicted in (1, 10, 100) or self.evicted % 1000 == 0:
                    log.warning(
                        "data port: more than %d connections without a hello; evicted the oldest (%d so far)",
                        MAX_UNAUTHENTICATED,
                        self.evicted,
                    )
            try:
                if self.links.tls_server is not None:
                    raw = socket.socket(fileno=plain.detach())
                    raw.setblocking(True)
                    self._pending[key] = lambda: _abort(scope, raw)
                    return await trio.to_thread.run_sync(self._accept_tls, raw, limiter=self.hello_threads)
                opened = await _drive_trio(stream, d.Listener(self._secret))
                if opened is None:
                    return None
                sock = socket.socket(fileno=plain.detach())
                sock.setblocking(True)
                set_timeouts(sock, self.data_timeout)
                return sock, opened.hello, opened.key_id
            finally:
                self._pending.pop(key, None)
        log.info("data connection: no hello within %.0f s (or evicted)", HELLO_TIMEOUT)
        return None

    def _accept_tls(self, plain: socket.socket) -> tuple[Any, d.DataHello, bytes] | None:
        """TLS handshake and the opening in a worker thread, within HELLO_TIMEOUT in total."""
        deadline = time.monotonic() + HELLO_TIMEOUT
        set_timeouts(plain, HELLO_TIMEOUT / 4)
        assert self.links.tls_server is not None
        try:
            sock = self.links.tls_server.wrap_socket(plain, server_side=True)
        except BaseException:
            plain.close()
            raise
        try:
            opened = _drive_blocking(sock, d.Listener(self._secret), deadline)
        except BaseException:
            sock.close()
            raise
        if opened is None:
            sock.close()
            return None
        set_timeouts(sock, self.data_timeout)
        return sock, opened.hello, opened.key_id

    def _dispatch(self, sock: socket.socket, hello: d.DataHello, kid: bytes) -> bool:
        """Serve a pull, or hand a push connection to its transfer (then True: do not close it)."""
        if hello.kind == "pull":
            try:
                issued = self.source.caps.admit(kid, hello)
            except OSError as exc:
                send(sock, d.encode(refusal(exc)))
                raise
            try:
                fd = self.source.open_file(issued)
            except OSError as exc:
                self.source.caps.release(issued, False)
                send(sock, d.encode(refusal(exc)))
                raise
            self.source.serve(sock, issued, fd)
            return False
        transfer = self.push_target(kid)
        if (
            transfer is None
            or transfer.rec.id != hello.transfer_id
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


def _abort(scope: trio.CancelScope, sock: Any) -> None:
    """Evict a connection: cancel its opening; the shutdown wakes a thread in its TLS handshake."""
    scope.cancel()
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


async def _drive_trio(stream: trio.SocketStream, conn: d.Listener) -> d.Opened | None:
    """Feed the opening from a trio stream: only the bytes it asks for, its answers sent back."""
    try:
        while True:
            if out := conn.data_to_send():
                await stream.send_all(out)
            event = conn.next_event()
            if isinstance(event, d.Opened):
                return event
            if isinstance(event, d.Refused):
                return None
            conn.receive_data(bytes(await stream.receive_some(conn.wanted)))
    except trio.BrokenResourceError as exc:
        raise ConnectionResetError(errno.ECONNRESET, f"peer went away: {exc}") from None


def _drive_blocking(sock: socket.socket, conn: d.Listener, deadline: float) -> d.Opened | None:
    """`_drive_trio` on a blocking (TLS) socket in a worker thread, within ``deadline``."""
    event = receive_event(sock, conn, deadline)
    send(sock, conn.data_to_send())  # a refusal's greeting
    return event if isinstance(event, d.Opened) else None
