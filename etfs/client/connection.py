"""A client's connection to one etfs server: authentication, pipelined requests, reconnect.

`ServerClient.call` sends a request and awaits its reply; many calls may be in
flight on one connection.  When the connection breaks, pending calls fail with
ECONNRESET and the next call reconnects (with backoff, failing fast with
EHOSTDOWN while the server stays unreachable), so one dead server never hangs the
callers of another.

A hung server (stopped, or its host frozen: the TCP connection stays up) is found by
silence: a call fails with ETIMEDOUT once the server has said nothing for
``request_timeout`` since the oldest request still waiting for it was sent (requests a
caller gave up on count too), the connection is dropped, every call waiting on it fails
with ETIMEDOUT as well, and the log names the server.  So a caller waits at most about
``request_timeout`` for a hung server, not one timeout per request it makes in a row.

`generation` counts connections: server-side file handles belong to one generation and
must be reopened after a reconnect.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import ssl
from dataclasses import dataclass
from typing import TypeVar

import msgspec
import trio

from etfs.config import CONNECT_TIMEOUT, REQUEST_TIMEOUT
from etfs.protocol import auth
from etfs.protocol import messages as m
from etfs.protocol.connection import ProtocolError, Role
from etfs.protocol.trio_stream import MessageStream

log = logging.getLogger(__name__)
R = TypeVar("R")


class RemoteError(OSError):
    """An `Err` reply from a server (errno and the server's message)."""


class ConnectionLost(OSError):
    pass


class TLSError(RemoteError):
    """TLS with the server failed for a reason retrying will not change (an unverifiable
    certificate, a server that does not speak TLS): reported like a refusal, not as down."""


# SSL errors that only say the connection went away (the server closed it, a reset): the
# server may be restarting, so they count as unreachable, not as a TLS problem.
_SSL_TRANSIENT = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


@dataclass(frozen=True)
class Endpoint:
    """Everything needed to reach and log in to one server export."""

    name: str
    addresses: tuple[tuple[str, int], ...]
    user: str
    key: bytes
    export: str = ""
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None
    connect_timeout: float = CONNECT_TIMEOUT
    request_timeout: float = REQUEST_TIMEOUT


class _Live:
    """One established connection and its pending requests."""

    def __init__(self, ms: MessageStream, generation: int, welcome: m.Welcome, peer: tuple[str, int]) -> None:
        self.ms = ms
        self.generation = generation
        self.welcome = welcome
        self.peer = peer
        self.pending: dict[int, tuple[trio.Event, list[m.Ok | m.Err]]] = {}
        self.closed = False
        # When we started waiting for the server without hearing from it since (None: not waiting).
        self.silent_since: float | None = None
        # What the calls still waiting get when the connection drops (ETIMEDOUT: the server hung).
        self.drop_errno = errno.ECONNRESET


# Requests that may make a name appear on the server (transfers write a part file and rename
# it into place).
_NAME_CREATORS = frozenset(
    {m.Create, m.Mkdir, m.Symlink, m.Link, m.Rename, m.TransferStart, m.TransferPush, m.LocalCopy}
)


class ServerClient:
    BACKOFF_MAX = 10.0

    def __init__(self, endpoint: Endpoint, nursery: trio.Nursery) -> None:
        self.endpoint = endpoint
        self._nursery = nursery
        self._live: _Live | None = None
        self._connecting = trio.Lock()
        self._ids = itertools.count(1)
        self._generation = 0
        self._backoff = 0.0
        self._retry_at = 0.0
        self._last_error = ""
        # The last connection attempt's refusal (bad login, unknown export, TLS): while backing
        # off, calls fail with its errno (EACCES...), not with "host is down".
        self._refused: RemoteError | None = None
        # Bumped by every request that may create a name, except those sent with `call_own`
        # (the filesystem's own, which it accounts for itself): the filesystem's knowledge of
        # a directory's complete contents (etfs.fs.inodes) is valid only while this is unchanged.
        self.namespace_epoch = 0
        self._forgotten = False

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def handle_generation(self) -> int:
        """The connection generation a handle opened now belongs to (the live connection's)."""
        return self._live.generation if self._live is not None else self._generation

    def is_live(self, generation: int) -> bool:
        """True while the connection of ``generation`` is open: its handles are still valid."""
        live = self._live
        return live is not None and not live.closed and live.generation == generation

    async def connection(self) -> _Live:
        if self._forgotten:
            raise ConnectionLost(errno.EACCES, f"{self.name}: logged out (etfs logout)")
        if self._live is not None and not self._live.closed:
            return self._live
        async with self._connecting:
            if self._live is not None and not self._live.closed:
                return self._live
            now = trio.current_time()
            if now < self._retry_at:
                if self._refused is not None:
                    raise RemoteError(self._refused.errno, self._refused.strerror)
                raise ConnectionLost(
                    errno.EHOSTDOWN, f"server {self.name} is unreachable ({self._last_error}); retrying later"
                )
            try:
                live = await self._connect()
            except OSError as exc:
                self._backoff = min(self.BACKOFF_MAX, max(0.5, self._backoff * 2))
                self._retry_at = trio.current_time() + self._backoff
                error = exc.strerror or str(exc)
                if error != self._last_error:  # once per new reason, not once per retry
                    log.warning(
                        "cannot log in to server %s: %s", self.name, error.removeprefix(f"{self.name}: ")
                    )
                self._last_error = error
                self._refused = exc if isinstance(exc, RemoteError) else None
                if isinstance(exc, RemoteError):
                    raise
                raise ConnectionLost(
                    errno.EHOSTDOWN, f"cannot reach server {self.name}: {self._last_error}"
                ) from None
            self._backoff = 0.0
            self._refused = None
            if self._last_error:
                log.warning("server %s is reachable again", self.name)
                self._last_error = ""
            self._live = live
            self._nursery.start_soon(self._reader, live)
            return live

    async def _connect(self) -> _Live:
        ep = self.endpoint
        last: OSError = OSError(errno.EHOSTDOWN, "no address")
        for host, port in ep.addresses:
            stream: trio.abc.Stream
            sock_stream: trio.SocketStream | None = None
            try:
                try:
                    with trio.fail_after(ep.connect_timeout):
                        sock_stream = await trio.open_tcp_stream(host, port)
                        stream = sock_stream
                        if ep.ssl_context is not None:
                            ssl_stream = trio.SSLStream(
                                sock_stream, ep.ssl_context, server_hostname=ep.server_hostname or host
                            )
                            await ssl_stream.do_handshake()
                            stream = ssl_stream
                        ms = MessageStream(stream, Role.CLIENT)
                        welcome = await self._handshake(ms)
                except BaseException:
                    # A failed handshake (wrong key, TLS error, timeout...) must not leak the socket.
                    if sock_stream is not None:
                        sock_stream.socket.close()
                    raise
            except trio.TooSlowError:
                last = OSError(errno.ETIMEDOUT, f"connecting to {host}:{port} timed out")
                continue
            except RemoteError:
                raise
            except (OSError, ssl.SSLError, trio.BrokenResourceError, ProtocolError) as exc:
                cause = exc if isinstance(exc, ssl.SSLError) else exc.__cause__
                if isinstance(cause, ssl.SSLError) and not isinstance(cause, _SSL_TRANSIENT):
                    reason = getattr(cause, "verify_message", None) or cause.reason or str(cause)
                    last = TLSError(errno.EPROTO, f"{ep.name}: TLS with {host}:{port} failed: {reason}")
                    continue
                # trio.BrokenResourceError has no text of its own: the cause (an SSL error) says why.
                detail = str(exc) or str(exc.__cause__ or "") or type(exc).__name__
                # trio's "all attempts to connect ... failed" hides why: its cause's OSError says.
                if isinstance(exc.__cause__, BaseExceptionGroup):
                    first = exc.__cause__.exceptions[0]
                    detail = getattr(first, "strerror", None) or detail
                last = OSError(getattr(exc, "errno", None) or errno.ECONNREFUSED, f"{host}:{port}: {detail}")
                continue
            self._generation += 1
            log.debug("connected to %s at %s:%d (generation %d)", ep.name, host, port, self._generation)
            return _Live(ms, self._generation, welcome, (host, port))
        raise last

    async def _handshake(self, ms: MessageStream) -> m.Welcome:
        ep = self.endpoint
        nonce = auth.new_nonce()
        await ms.send(m.Hello(m.PROTOCOL_VERSION, ep.user, ep.export, nonce))
        challenge = await ms.receive()
        if isinstance(challenge, m.Err):
            raise RemoteError(challenge.errno, f"{ep.name}: {challenge.message}")
        if not isinstance(challenge, m.Challenge):
            raise ConnectionLost(errno.ECONNRESET, f"{ep.name}: closed during handshake")
        await ms.send(m.Prove(auth.client_proof(ep.key, challenge.nonce, nonce, ep.user, ep.export)))
        welcome = await ms.receive()
        if isinstance(welcome, m.Err):
            raise RemoteError(welcome.errno, f"{ep.name}: {welcome.message}")
        if not isinstance(welcome, m.Welcome):
            raise ConnectionLost(errno.ECONNRESET, f"{ep.name}: closed during handshake")
        expected = auth.server_proof(ep.key, challenge.nonce, nonce, ep.user, ep.export)
        if not auth.verify(expected, welcome.mac):
            raise RemoteError(errno.EACCES, f"{ep.name}: the server could not prove it knows the key")
        return welcome

    async def _reader(self, live: _Live) -> None:
        reason = "connection closed by server"
        try:
            while True:
                msg = await live.ms.receive()
                if msg is None:
                    break
                if isinstance(msg, m.Err) and msg.id == 0:
                    reason = f"server error: {msg.message}"
                    break
                assert isinstance(msg, (m.Ok, m.Err))
                slot = live.pending.pop(msg.id, None)
                # Heard from it: whatever still waits starts its silence now.
                live.silent_since = trio.current_time() if live.pending else None
                if slot is not None:
                    slot[1].append(msg)
                    slot[0].set()
        except (
            OSError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            ProtocolError,
            ssl.SSLError,
        ) as exc:
            reason = f"connection lost: {exc}"
        finally:
            self._drop(live, reason)

    def _hung(self, live: _Live, what: str, silent: float) -> None:
        """The server said nothing for request_timeout: drop the connection, fail its waiters
        with ETIMEDOUT, and fail new calls fast (EHOSTDOWN) for a backoff before reconnecting."""
        log.warning(
            "server %s did not answer %s: silent for %.1f s (request_timeout %g s); "
            "dropping the connection, treating the server as down",
            self.name,
            what,
            silent,
            self.endpoint.request_timeout,
        )
        live.drop_errno = errno.ETIMEDOUT
        self._drop(live, f"request {what} timed out")
        self._backoff = min(self.BACKOFF_MAX, max(0.5, self._backoff * 2))
        self._retry_at = trio.current_time() + self._backoff
        self._last_error = f"it did not answer for {self.endpoint.request_timeout:g} s"

    def _drop(self, live: _Live, reason: str) -> None:
        if live.closed:
            return
        live.closed = True
        log.info("%s: %s", self.name, reason)
        for event, _ in live.pending.values():
            event.set()  # an empty result list means "connection lost"
        live.pending.clear()
        self._nursery.start_soon(_close_quietly, live.ms)

    async def call(self, req: m.Request[R]) -> R:
        """Send one request and return its reply's value, of the type the request declares
        (``await client.call(m.Stat(path))`` is an `m.Attr`); raises `RemoteError` or
        `ConnectionLost`."""
        if type(req) in _NAME_CREATORS:
            self.namespace_epoch += 1
        return await self.call_own(req)

    async def call_own(self, req: m.Request[R]) -> R:
        """`call` for a caller that keeps track of the names it creates itself (the filesystem)."""
        live = await self.connection()
        rid = next(self._ids)
        event = trio.Event()
        box: list[m.Ok | m.Err] = []
        live.pending[rid] = (event, box)
        timeout = self.endpoint.request_timeout
        now = trio.current_time()
        if live.silent_since is None:
            live.silent_since = now
        # Silent for request_timeout since the oldest unanswered request: hung.  (A healthy
        # server still gets connect_timeout, in case that request was one it takes long with.)
        deadline = max(live.silent_since + timeout, now + min(timeout, self.endpoint.connect_timeout))
        try:
            # The send counts too: a hung server stops reading, and a large request then blocks.
            with trio.fail_at(deadline):
                await live.ms.send(m.Call(rid, req))
                await event.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._drop(live, f"send failed: {exc}")
            raise ConnectionLost(errno.ECONNRESET, f"connection to {self.name} lost") from None
        except trio.TooSlowError:
            live.pending.pop(rid, None)
            self._hung(live, type(req).__name__, trio.current_time() - (live.silent_since or now))
            raise ConnectionLost(
                errno.ETIMEDOUT, f"server {self.name} did not answer in time (request_timeout {timeout:g} s)"
            ) from None
        except BaseException:
            # Cancelled.  If that cut a request in half, the connection cannot carry another:
            # drop it now, so that the next call reconnects instead of failing.
            if live.ms.broken:
                self._drop(live, f"{type(req).__name__} was cancelled while being sent")
            raise
        finally:
            live.pending.pop(rid, None)
        if not box:
            raise ConnectionLost(live.drop_errno, f"connection to {self.name} lost")
        reply = box[0]
        if isinstance(reply, m.Err):
            raise RemoteError(reply.errno, reply.message)
        try:
            return m.decode_reply(req, reply.value)
        except msgspec.ValidationError as exc:
            raise RemoteError(errno.EPROTO, f"{self.name}: malformed reply: {exc}") from None

    async def welcome(self) -> m.Welcome:
        return (await self.connection()).welcome

    async def peer(self) -> tuple[str, int]:
        return (await self.connection()).peer

    async def aclose(self) -> None:
        if self._live is not None:
            self._drop(self._live, "closed by client")

    def forget(self) -> None:
        """Drop the connection and the key for good (`etfs logout`): every later call,
        also through file handles opened with this client, fails with EACCES."""
        self._forgotten = True
        self.endpoint = dataclasses.replace(self.endpoint, key=b"")
        if self._live is not None:
            self._drop(self._live, "logged out")


async def _close_quietly(ms: MessageStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            await ms.aclose()
        except Exception:
            pass
