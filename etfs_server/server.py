"""The server's listeners and control connections: handshake, authentication, request dispatch.

One trio task per connection reads messages; every request runs in its own task, so
requests pipeline and replies may come back out of order.  File operations run in
worker threads (`handlers.Session`); transfer requests go to `transfer.TransferService`.
"""

from __future__ import annotations

import errno
import logging
import os
import ssl
from dataclasses import dataclass
from typing import Any

import trio

from etfs.protocol import auth
from etfs.protocol import messages as m
from etfs.protocol.connection import LocalProtocolError, RemoteProtocolError, Role
from etfs.protocol.trio_stream import MessageStream

from .config import ServerConfig
from .exports import ExportRoot
from .handlers import MAX_IO, Session
from .limits import Budget, LimitError, UserLoad
from .transfer import TransferService

log = logging.getLogger(__name__)

# Requests answered on the trio thread itself, without the hop to a worker thread and back
# (two cross-thread wakeups, ~0.1 ms on a loaded machine: a third of a small request's round
# trip).  Each is a name lookup or an inode creation: a path walk on the dentry cache plus one
# cheap metadata syscall (fstatat, openat2 without O_TRUNC, mkdirat, symlinkat, linkat,
# fchmod/utimensat, getxattr/listxattr of small values).  Nothing here moves file data, frees
# blocks or waits for writeback: reads, writes, fsync, close (may flush on network
# filesystems), truncation, unlink/rmdir/rename (may free a large file's blocks), listings
# (unbounded) and checksums stay in worker threads.
_INLINE = frozenset({m.Ping, m.Stat, m.Readlink, m.GetXattr, m.ListXattr, m.Mkdir, m.Symlink, m.Link})


def runs_inline(req: m.Request[Any]) -> bool:
    """Whether a request is cheap enough to answer without a worker thread (see `_INLINE`)."""
    if type(req) in _INLINE:
        return True
    if isinstance(req, (m.Open, m.Create)):
        return not req.flags & os.O_TRUNC
    if isinstance(req, m.SetAttr):
        return req.size is None
    return False


@dataclass(frozen=True)
class Ports:
    control: int
    data: int


def error_reply(rid: int, exc: BaseException) -> m.Err:
    """Convert an exception from a handler into the `Err` the client sees."""
    if isinstance(exc, OSError):
        code = exc.errno or errno.EIO
        text = exc.strerror or str(exc) or os.strerror(code)
        if exc.filename is not None and str(exc.filename) not in text:
            text = f"{text}: {exc.filename}"
        return m.Err(rid, code, text)
    if isinstance(exc, OverflowError):  # a client's number too large for a syscall (uid, time...)
        return m.Err(rid, errno.EINVAL, f"value out of range: {exc}")
    if isinstance(exc, ValueError):  # e.g. an embedded NUL in a name or symlink target
        return m.Err(rid, errno.EINVAL, f"invalid argument: {exc}")
    log.error("internal error in request %d", rid, exc_info=exc)
    return m.Err(rid, errno.EIO, f"internal server error: {type(exc).__name__}")


class EtfsServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.roots = {name: ExportRoot(e.path) for name, e in config.exports.items()}
        self.threads = trio.CapacityLimiter(config.limits.threads)
        self.loads: dict[str, UserLoad] = {}  # per user, over all their connections
        self.authenticating = 0  # connections that have not logged in yet
        self.transfers = TransferService(config, self.roots)
        self.ssl_context: ssl.SSLContext | None = None
        if config.tls:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(str(config.tls.cert_file), str(config.tls.key_file))
            self.ssl_context = ctx
        self.ports: Ports | None = None

    async def serve(self, *, task_status: trio.TaskStatus[Ports] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on the control and data ports until cancelled; reports the bound ports."""
        host, port = self.config.listen
        dhost, dport = self.config.data_listen
        control = await trio.open_tcp_listeners(port, host=host)
        data = await trio.open_tcp_listeners(dport, host=dhost)
        self.ports = Ports(control[0].socket.getsockname()[1], data[0].socket.getsockname()[1])
        async with trio.open_nursery() as nursery:
            await self.transfers.start(nursery, self.ports.data)
            nursery.start_soon(trio.serve_listeners, self._handle_control, control)
            nursery.start_soon(trio.serve_listeners, self.transfers.handle_data_connection, data)
            log.info(
                "server %s listening: control %s:%d data %s:%d",
                self.config.name,
                host,
                self.ports.control,
                dhost,
                self.ports.data,
            )
            task_status.started(self.ports)

    def _load(self, user: str) -> UserLoad:
        load = self.loads.get(user)
        if load is None:
            lim = self.config.limits
            load = self.loads[user] = UserLoad(
                max_handles=lim.handles_per_user,
                max_connections=lim.connections_per_user,
                threads_per_user=lim.threads_per_user,
                payload_units=lim.payload_bytes_per_user // _UNIT,
            )
        return load

    async def _handle_control(self, stream: trio.SocketStream) -> None:
        peer = _peer_name(stream)
        if self.authenticating >= self.config.limits.preauth_connections:
            # Unauthenticated connections cost little each (a small frame limit, a deadline),
            # but their number must be bounded too; a legitimate client retries.
            log.warning(
                "limit reached: %d connections authenticating (limits.preauth_connections); dropping %s",
                self.authenticating,
                peer,
            )
            await stream.aclose()
            return
        if self.ssl_context is not None:
            stream = trio.SSLStream(stream, self.ssl_context, server_side=True)  # type: ignore[assignment]
        ms = MessageStream(stream, Role.SERVER)
        session: Session | None = None
        try:
            self.authenticating += 1
            try:
                with trio.move_on_after(self.config.handshake_timeout) as scope:
                    session = await self._handshake(ms, peer)
            finally:
                self.authenticating -= 1
            if scope.cancelled_caught:
                log.warning("%s: handshake timed out", peer)
            if session is not None:
                try:
                    session.load.take_connection(session.user)
                except LimitError as exc:
                    await _try_send(ms, m.Err(0, exc.errno or errno.EUSERS, exc.strerror or str(exc)))
                    session.closed.set()
                    session = None
                    return
                try:
                    await self._serve_requests(ms, session, peer)
                finally:
                    session.load.drop_connection()
        except RemoteProtocolError as exc:
            log.warning("%s: protocol error: %s", peer, exc)
            await _try_send(ms, m.Err(0, errno.EPROTO, f"protocol error: {exc}"))
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as exc:
            log.info("%s: connection lost: %s", peer, exc)
        except Exception:
            # Never let one connection's bug escape into serve_listeners and stop the server.
            log.exception("%s: internal error on the control connection", peer)
        finally:
            if session is not None:
                for callback in session.on_close:
                    callback()
                await trio.to_thread.run_sync(session.close_all)
            with trio.CancelScope(shield=True):
                with trio.move_on_after(1):
                    await ms.aclose()

    async def _handshake(self, ms: MessageStream, peer: str) -> Session | None:
        hello = await ms.receive()
        if hello is None:
            return None
        assert isinstance(hello, m.Hello)  # the connection enforces the order
        if hello.version != m.PROTOCOL_VERSION:
            await ms.send(m.Err(0, errno.EPROTONOSUPPORT, f"protocol version {hello.version} not supported"))
            return None
        server_nonce = auth.new_nonce()
        await ms.send(m.Challenge(m.PROTOCOL_VERSION, server_nonce, self.config.name))
        prove = await ms.receive()
        if prove is None:
            return None
        assert isinstance(prove, m.Prove)
        user = self.config.users.get(hello.user)
        # Compute a MAC even for unknown users so both failures look and take the same.
        key = user.key if user else b"\0" * 32
        expected = auth.client_proof(key, server_nonce, hello.nonce, hello.user, hello.export)
        if user is None or not auth.verify(expected, prove.mac):
            why = "unknown user" if user is None else "wrong key"
            log.warning("%s: authentication failed for user %r (%s)", peer, hello.user, why)
            await ms.send(m.Err(0, errno.EACCES, "authentication failed"))
            return None
        export_name = hello.export or self.config.default_export
        export = self.config.exports.get(export_name)
        if export is None:
            await ms.send(m.Err(0, errno.ENOENT, f"no export named {export_name!r}"))
            return None
        proof = auth.server_proof(user.key, server_nonce, hello.nonce, hello.user, hello.export)
        assert self.ports is not None
        await ms.send(m.Welcome(proof, self.ports.data, self.config.advertise_host))
        log.info("%s: user %s authenticated for export %s", peer, user.name, export_name)
        return Session(
            user.name,
            user.groups,
            self.roots[export_name],
            export.acl,
            account=user.account,
            may_chown=user.may_chown,
            may_setid=user.may_setid,
            umask=export.umask,
            load=self._load(user.name),
        )

    async def _serve_requests(self, ms: MessageStream, session: Session, peer: str) -> None:
        lim = self.config.limits
        limit = trio.Semaphore(lim.inflight_per_connection)
        # Payload bytes held for this connection (Write data received, Read data to send), in
        # MiB units: a client that sends faster than we write, or never reads its replies,
        # stops being read from (TCP backpressure) instead of growing the server.
        budget = Budget(lim.reply_bytes_per_connection // _UNIT)
        user_budget = session.load.payload()
        # An exception leaving the nursery body would come out wrapped in an ExceptionGroup
        # (strict exception groups) that `_handle_control` does not catch, so one bad client
        # would take the whole server down: carry it out of the nursery by hand instead.
        failure: BaseException | None = None
        async with trio.open_nursery() as nursery:
            try:
                while True:
                    try:
                        msg = await ms.receive()
                    except RemoteProtocolError as exc:
                        if exc.fatal:
                            raise
                        log.warning("%s: bad request: %s", peer, exc)
                        await ms.send(m.Err(exc.request_id, errno.EPROTO, f"protocol error: {exc}"))
                        continue
                    if msg is None:
                        break
                    assert isinstance(msg, m.Call)  # the connection enforces the order
                    log.debug("%s: %s #%d", peer, type(msg.req).__name__, msg.id)  # -v: every request
                    if runs_inline(msg.req):
                        await self._answer_inline(ms, session, msg)
                        continue
                    await limit.acquire()
                    units = _payload_units(msg.req)
                    taken = (await budget.take(units), await user_budget.take(units)) if units else (0, 0)
                    nursery.start_soon(self._answer, ms, session, msg, limit, (budget, user_budget), taken)
            except (RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                failure = exc
            session.closed.set()  # long handlers (checksums) in threads stop early
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _answer_inline(self, ms: MessageStream, session: Session, call: m.Call) -> None:
        try:
            reply: m.Ok | m.Err = m.Ok(call.id, m.check_reply(call.req, session.dispatch(call.req)))
        except Exception as exc:
            reply = error_reply(call.id, exc)
        try:
            await ms.send(reply)
        except LocalProtocolError:
            pass

    async def _answer(
        self,
        ms: MessageStream,
        session: Session,
        call: m.Call,
        limit: trio.Semaphore,
        budgets: tuple[Budget, Budget],
        taken: tuple[int, int],
    ) -> None:
        req = call.req
        try:
            try:
                value: Any
                if self.transfers.handles(req):
                    value = await self.transfers.dispatch(session, req)
                else:
                    # Fair: one user's requests hold at most threads_per_user of the workers.
                    async with session.load.limiter():
                        value = await trio.to_thread.run_sync(session.dispatch, req, limiter=self.threads)
                # A reply that is not what the request declares is our bug: EIO, logged.
                reply: m.Ok | m.Err = m.Ok(call.id, m.check_reply(req, value))
            except Exception as exc:
                reply = error_reply(call.id, exc)
            try:
                await ms.send(reply)
            except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
                pass  # the connection died (or hit a fatal protocol error) while we worked
        finally:
            limit.release()
            for budget, units in zip(budgets, taken, strict=True):
                if units:
                    budget.give_back(units)


_UNIT = 1024 * 1024


def _payload_units(req: m.Request[Any]) -> int:
    """MiB of payload a request holds in the server: its Write data or its Read reply."""
    if isinstance(req, m.Write):
        size = len(req.data)
    elif isinstance(req, m.Read):
        size = min(max(req.size, 0), MAX_IO)
    else:
        return 0
    return (size + _UNIT - 1) // _UNIT


async def _try_send(ms: MessageStream, msg: m.Err) -> None:
    try:
        with trio.move_on_after(1):
            await ms.send_farewell(msg)
    except Exception:
        pass


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"
