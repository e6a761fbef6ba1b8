"""`TransferService`: the transfer requests of one server, and the state they share.

Offers and pushes go to the source role (`source`), starts to a `DestinationTransfer`
(`destination`), data connections to the data port (`listener`), same-server copies to
`localcopy`; waiting, cancelling and listing read the records (`records`).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from etfs.common.ratelimit import TokenBucket, throttle_of
from etfs.protocol import data as d
from etfs.protocol import messages as m
from etfs.protocol.transfer import DATA_DIRECTIONS, TERMINAL, CopyMode, Direction, FailureCode, TransferState

from ..acl import Right
from ..config import ServerConfig
from ..exports import ExportRoot, normalize
from ..handlers import Session
from ..identity import as_account
from .datapath import DataLinks
from .destination import MAX_SIZE, DestinationTransfer, Settings, block_size_for
from .errors import TransferError, failure_code
from .listener import DataListener
from .localcopy import copy_within
from .records import KEEP_RECORDS, Record, RecordStore
from .source import SourceRole
from .workdir import WorkDir

log = logging.getLogger(__name__)

TRANSFER_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


def _enum(kind: type[CopyMode] | type[Direction], value: str, allowed: tuple[Any, ...] | None = None) -> Any:
    """A wire string as its enum member, or EINVAL naming what was wrong."""
    try:
        member = kind(value)
    except ValueError:
        member = None
    if member is None or (allowed is not None and member not in allowed):
        what = "mode" if kind is CopyMode else "direction"
        raise TransferError(errno.EINVAL, f"unknown {what} {value!r}")
    return member


class TransferService:
    """All transfer state of one server: offers (source role) and transfers (destination role)."""

    def __init__(self, config: ServerConfig, roots: dict[str, ExportRoot]) -> None:
        self.config = config
        self.roots = roots
        self.links = DataLinks(config)
        self.data_threads = trio.CapacityLimiter(config.max_transfers * config.max_streams * 2 + 8)
        self.by_ticket: dict[bytes, DestinationTransfer] = {}  # push transfers by key id of their ticket
        self.source = SourceRole(config, roots, self.links, self.data_threads)
        self.listener = DataListener(
            self.links, self.source, self.by_ticket.get, self.data_threads, config.data_timeout
        )
        self.store = RecordStore(config.state_dir)
        self.records: dict[str, Record] = {r.id: r for r in self.store.load_all()}
        self.active: dict[str, DestinationTransfer] = {}
        # One transfer per destination file at a time: they would share the part file.
        self.by_path: dict[tuple[str, str], str] = {}
        # transfer.max_active: more transfers wait, "queued", for a slot (in order of arrival).
        self.slots = trio.Semaphore(config.max_transfers)
        # transfer.bwlimit_in: every byte this server receives as a destination, all transfers together.
        self.in_bucket = TokenBucket(config.bwlimit_in) if config.bwlimit_in else None
        self.data_port = 0
        self._nursery: trio.Nursery | None = None
        # Records left "running" by a crash are failed, resumable ones keep their part files.
        for rec in self.records.values():
            if rec.state not in TERMINAL:
                rec.fail(errno.EINTR, "server restarted during the transfer", FailureCode.CANCELLED)
                rec.finished = time.time()
                self.store.save(rec)

    async def start(self, nursery: trio.Nursery, data_port: int) -> None:
        self._nursery = self.source.nursery = nursery
        self.data_port = self.source.data_port = data_port

    async def shutdown(self) -> None:
        for t in list(self.active.values()):
            t.cancel("server shutting down", errno.EINTR)

    async def handle_data_connection(self, stream: trio.SocketStream) -> None:
        await self.listener.handle(stream)

    def handles(self, req: m.Request[Any]) -> bool:
        return type(req) in self._handlers

    async def dispatch(self, session: Session, req: m.Request[Any]) -> Any:
        return await self._handlers[type(req)](self, session, req)

    def _export_name(self, session: Session) -> str:
        return next(n for n, r in self.roots.items() if r is session.root)

    # --- source role ------------------------------------------------------------------------------
    async def op_offer(self, session: Session, req: m.TransferOffer) -> m.Capability:
        return await self.source.offer(session, self._export_name(session), req)

    async def op_push(self, session: Session, req: m.TransferPush) -> None:
        await self.source.push(session, req)

    # --- destination role -------------------------------------------------------------------------
    async def op_start(self, session: Session, req: m.TransferStart) -> m.TransferStarted:
        cap = req.capability
        mode: CopyMode = _enum(CopyMode, req.mode)
        direction: Direction = _enum(Direction, req.direction, DATA_DIRECTIONS)
        if not 0 <= cap.size <= MAX_SIZE:
            raise TransferError(errno.EFBIG, f"file size {cap.size} out of range")
        tid = req.transfer_id or cap.transfer_id
        if not TRANSFER_ID.fullmatch(tid):
            raise TransferError(errno.EINVAL, "a transfer id is 1-64 letters, digits, '-' or '_'")
        if tid != cap.transfer_id:
            # A capability means one transfer: the source refuses any other id anyway.
            raise TransferError(errno.EINVAL, "the transfer id must be the capability's")
        if tid in self.active or tid in self.records:
            raise TransferError(errno.EEXIST, f"transfer {tid} exists already")
        if direction == Direction.PULL:
            self.links.check_peer(cap.data_host)

        def resolve() -> tuple[str, WorkDir]:
            # Resolved and checked once; the transfer keeps this very directory open.
            with as_account(session.account), session.at(req.path, Right.TRANSFER_IN, Right.WRITE) as loc:
                if not loc.name:
                    raise TransferError(errno.EISDIR, "the export root is not a file")
                owner = session.account.uid if session.account is not None else os.geteuid()
                return loc.asked, WorkDir.of(loc, owner)

        path, workdir = await trio.to_thread.run_sync(resolve)
        export = self._export_name(session)
        if (export, path) in self.by_path:
            workdir.close()
            raise TransferError(errno.EBUSY, f"another transfer into {path} is running")
        rec = Record(
            id=tid,
            source=f"{req.source_name}:{cap.path}",
            destination=f"{self.config.name}:{path}",
            export=export,
            path=path,
            user=session.user,
            bytes_total=cap.size,
            streams=max(1, min(req.streams, self.config.max_streams)),
            direction=direction,
            mode=mode,
        )
        settings = Settings(
            mode, direction, req.verify, req.preserve_times, self.config.receiver, req.forget_relay
        )
        block_size = block_size_for(cap.size, req.block_size or self.config.block_size)
        t = DestinationTransfer(rec, cap, workdir, block_size, settings, session.account)
        t.throttle = throttle_of([self.in_bucket])
        # Claim the id and the destination before the first await: a TransferCancel or the
        # client's disconnect from now on reaches this transfer.
        self.active[tid] = t
        self.by_path[(export, path)] = tid

        def on_close() -> None:
            t.cancel("the client that started it disconnected", errno.ECONNABORTED)

        session.on_close.append(on_close)

        def forget() -> None:
            self._release(t)
            if on_close in session.on_close:
                session.on_close.remove(on_close)

        t.on_finish = lambda: self._finish(t, forget)
        try:
            resumed = await trio.to_thread.run_sync(t.prepare)
            if t.cancelled:
                raise TransferError(t.rec.errno or errno.EINTR, t.rec.reason or "cancelled")
        except BaseException:
            t.close_files()
            t.close_dir()
            forget()
            raise
        self.records[tid] = rec
        if rec.state == TransferState.SKIPPED:
            self._finish(t, forget)
            return m.TransferStarted(tid, b"", "", 0, True, 0)
        # No more streams than blocks still to fetch (the source opens exactly this many on push).
        todo = len(t.missing())
        rec.streams = min(rec.streams, todo) if todo else 0
        if direction == Direction.PUSH:
            t.push_sockets, t.push_receive = trio.open_memory_channel[socket.socket](max(1, rec.streams))
            self.by_ticket[d.key_id(t.ticket)] = t
        self.store.save(rec)
        assert self._nursery is not None
        self._nursery.start_soon(
            t.run, self.slots, self.data_threads, lambda stream: self._connect_source(t, stream)
        )
        return m.TransferStarted(
            tid,
            t.ticket if direction == Direction.PUSH else b"",
            self.config.advertise_host,
            self.data_port,
            False,
            resumed,
            data_tls=self.links.tls_server is not None,
            streams=rec.streams,
        )

    def _connect_source(self, t: DestinationTransfer, stream: int) -> socket.socket:
        """One pull data connection to the source, past its answer to our hello (blocking)."""
        cap = t.cap
        if not cap.secret:
            raise TransferError(errno.EACCES, "capability refused: it carries no secret")
        hello = d.DataHello("pull", cap.token, cap.transfer_id, stream, b"", t.rec.destination, t.rec.streams)
        sock = self.links.open(cap.data_host, cap.data_port, cap.data_tls, cap.secret, hello)
        try:
            t.expect_ready(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    def _finish(self, t: DestinationTransfer, forget: Callable[[], None]) -> None:
        t.rec.finished = time.time()
        t.close_files()
        t.close_dir()
        forget()
        self.records[t.rec.id] = t.rec
        self.store.save(t.rec)
        self._prune_records()
        t.finished.set()
        t.notify()

    def _release(self, t: DestinationTransfer) -> None:
        """Forget a transfer that is over: its id, its destination claim, its sockets."""
        self.active.pop(t.rec.id, None)
        self.by_ticket.pop(d.key_id(t.ticket), None)
        if self.by_path.get((t.rec.export, t.rec.path)) == t.rec.id:
            del self.by_path[(t.rec.export, t.rec.path)]
        if t.push_sockets is not None:
            t.push_sockets.close()
        if t.push_receive is not None:
            # Push connections that arrived but were never used.
            while True:
                try:
                    t.push_receive.receive_nowait().close()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break

    def _prune_records(self) -> None:
        finished = [r for r in self.records.values() if r.state in TERMINAL and r.id not in self.active]
        if len(finished) <= KEEP_RECORDS:
            return
        for rec in sorted(finished, key=lambda r: r.finished)[: len(finished) - KEEP_RECORDS]:
            del self.records[rec.id]
            self.store.remove(rec.id)

    # --- watching, cancelling, listing ------------------------------------------------------------
    def _own(self, session: Session, transfer_id: str) -> tuple[DestinationTransfer | None, Record]:
        """A transfer of this user (others' transfers are not even said to exist)."""
        t = self.active.get(transfer_id)
        rec = t.rec if t is not None else self.records.get(transfer_id)
        if rec is None or rec.user != session.user:
            raise TransferError(errno.ENOENT, f"no transfer {transfer_id}")
        return t, rec

    async def op_wait(self, session: Session, req: m.TransferWait) -> m.TransferInfo:
        t, rec = self._own(session, req.transfer_id)
        if t is not None:
            with trio.move_on_after(max(0.0, min(req.timeout, 30.0))):
                await t.changed.wait()
                with trio.move_on_after(max(0.0, min(req.patience, 1.0))):
                    while rec.state not in TERMINAL:
                        await t.changed.wait()  # (notify replaces the event: this is the next one)
        return rec.info()

    async def op_cancel(self, session: Session, req: m.TransferCancel) -> m.TransferInfo:
        t, rec = self._own(session, req.transfer_id)
        if t is not None:
            t.cancel(req.reason, errno.EINTR)
            with trio.move_on_after(5):
                await t.finished.wait()
        return rec.info()

    async def op_list(self, session: Session, req: m.TransferList) -> list[m.TransferInfo]:
        return [r.info() for r in self.records.values() if r.user == session.user]

    # --- same-server copies -----------------------------------------------------------------------
    async def op_localcopy(self, session: Session, req: m.LocalCopy) -> m.TransferInfo:
        mode: CopyMode = _enum(CopyMode, req.mode)

        src, dst = normalize(req.src), normalize(req.dst)
        export = self._export_name(session)
        if (export, dst) in self.by_path:
            raise TransferError(errno.EBUSY, f"another transfer into {dst} is running")
        tid = secrets.token_hex(8)
        rec = Record(tid, f"{self.config.name}:{src}", f"{self.config.name}:{dst}", export, dst, session.user)
        rec.mode, rec.direction, rec.state = mode, Direction.LOCAL, TransferState.RUNNING
        self.by_path[(export, dst)] = tid
        try:
            await trio.to_thread.run_sync(
                copy_within, session, src, dst, mode, req.preserve_times, rec, limiter=self.data_threads
            )
        except OSError as exc:
            rec.fail(exc.errno or errno.EIO, exc.strerror or str(exc), failure_code(exc))
            raise
        finally:
            if self.by_path.get((export, dst)) == tid:
                del self.by_path[(export, dst)]
            rec.finished = time.time()
            self.records[tid] = rec
            self.store.save(rec)
        return rec.info()

    # The server dispatches transfer requests through this table.
    _handlers: dict[type[m.Request[Any]], Callable[[TransferService, Session, Any], Awaitable[Any]]] = {
        m.TransferOffer: op_offer,
        m.TransferStart: op_start,
        m.TransferPush: op_push,
        m.TransferWait: op_wait,
        m.TransferCancel: op_cancel,
        m.TransferList: op_list,
        m.LocalCopy: op_localcopy,
    }
