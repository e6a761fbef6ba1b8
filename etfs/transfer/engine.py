"""The transfer engine the mount daemon drives: one entry point, `TransferEngine.copy`.

Between two servers it orders a server-to-server transfer (capability from the
source, receive order to the destination, push order to the source when the pair
is configured to push) and follows it to the end; no data byte passes through the
client.  On one server it asks for a server-side copy.  When the servers cannot
reach each other and the pair's `third_party` policy is `auto` (or always, with
`never`), it relays the bytes through the client instead, into a hidden part file
renamed into place at the end, and counts them in `bytes_via_client`.

Every copy is a `ClientTransfer` in `TransferEngine.transfers`, which `etfs status`
shows.  Cancelling the calling task (Ctrl-C on `cp`, unmount) cancels the transfer
on the servers.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import os
import secrets
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import msgspec
import trio
import xxhash

from etfs.client import ConnectionLost, Pool, RemoteError, ServerClient
from etfs.common import excgroups
from etfs.common.ratelimit import TokenBucket
from etfs.config import ClientConfig, TransferDefaults
from etfs.protocol import messages as m
from etfs.protocol.transfer import (
    TERMINAL,
    CopyMode,
    FailureCode,
    noreplace,
    parse_code,
    relay_id_name,
    relay_part_name,
)

log = logging.getLogger(__name__)

RELAY_BLOCK = 1024 * 1024
RELAY_INFLIGHT = 8
MAX_RETRIES = 3
KEEP_FINISHED = 500
# Failures that mean "the two servers cannot reach each other" (policy auto -> relay).
UNREACHABLE = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT, errno.ECONNABORTED)


class TransferFailed(OSError):
    """A copy failed; ``errno`` and ``strerror`` say why (also kept in the transfer record).

    ``code`` is the destination's typed reason (`TransferInfo.code`) when it gave one.
    """

    def __init__(self, errno: int, message: str, code: FailureCode | None = None) -> None:
        super().__init__(errno, message)
        self.code = code or FailureCode.NONE


@dataclass
class ClientTransfer:
    """One copy as the client sees it (what `etfs status` lists)."""

    id: str
    source: str
    destination: str
    kind: str = "third-party"  # third-party | local | relay
    state: str = "starting"
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_via_client: int = 0
    bytes_resent: int = 0
    resumed_from: int = 0  # bytes already at the destination when this copy started (a resume)
    streams: int = 0
    direction: str = ""
    mode: str = ""
    digest: str = ""
    reason: str = ""
    started: float = field(default_factory=time.time)
    finished: float = 0.0
    server_transfer_id: str = ""
    # After a cancel: did every server involved confirm the transfer stopped?  (None: no cancel)
    cancel_confirmed: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CopySpec:
    """What one `TransferEngine.copy` call asked for, with the pair's settings resolved."""

    src_server: str
    src_path: str
    dst_server: str
    dst_path: str
    mode: str
    opts: TransferDefaults
    preserve_times: bool = False
    bwlimit: int = 0  # `etfs cp --bwlimit`: for all copies naming ``bwlimit_group`` together
    bwlimit_group: str = ""

    def limits(self, instance: str) -> tuple[m.RateLimit, ...]:
        """The bandwidth limits of this copy: its command's and its server pair's (`opts.bwlimit`).

        ``instance`` makes the pair's group this engine's own: another mount of the same
        user has its own pair limit.
        """
        out = []
        if self.bwlimit:
            out.append(m.RateLimit(self.bwlimit, self.bwlimit_group))
        if self.opts.bwlimit:
            out.append(m.RateLimit(self.opts.bwlimit, f"pair:{instance}:{self.src_server}>{self.dst_server}"))
        return tuple(out)


def is_cancellation(exc: BaseException) -> bool:
    """`trio.Cancelled`, or a group of nothing else (what a cancelled nursery raises)."""
    return excgroups.only(exc, trio.Cancelled)


class TransferEngine:
    def __init__(self, pool: Pool, config: ClientConfig) -> None:
        self.pool = pool
        self.config = config
        self.transfers: dict[str, ClientTransfer] = {}
        self._ids = itertools.count(1)
        self.changed = trio.Event()
        self._relaying: set[tuple[str, str]] = set()  # (server, path) of relays running now
        self.instance = f"{os.getpid()}-{secrets.token_hex(4)}"
        # Bandwidth limits of relays (copies through this client), by group, while in use.
        self._relay_buckets: weakref.WeakValueDictionary[str, TokenBucket] = weakref.WeakValueDictionary()

    # --- bookkeeping ------------------------------------------------------------------------------
    def _new(
        self,
        source: str,
        destination: str,
        on_record: Callable[[ClientTransfer], None] | None = None,
        **kw: Any,
    ) -> ClientTransfer:
        tid = f"c{os.getpid()}-{next(self._ids)}"
        t = ClientTransfer(id=tid, source=source, destination=destination, **kw)
        if on_record is not None:
            on_record(t)
        self.transfers[tid] = t
        finished = [x for x in self.transfers.values() if x.state in TERMINAL]
        for old in sorted(finished, key=lambda x: x.finished)[: max(0, len(finished) - KEEP_FINISHED)]:
            del self.transfers[old.id]
        self._notify()
        return t

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _end(self, t: ClientTransfer, state: str, reason: str = "") -> None:
        t.state, t.finished = state, time.time()
        if reason:
            t.reason = reason
        self._notify()

    def _data_host(
        self, server: str, client: ServerClient, advertised: str, connected: tuple[str, int]
    ) -> str:
        """Where *other servers* reach ``server``: its own advertisement, the config, or our address."""
        if advertised:
            return advertised
        peer = self.config.servers[server].peer_address
        return peer[0] if peer else connected[0]

    # --- entry point ------------------------------------------------------------------------------
    async def copy(
        self,
        src_server: str,
        src_path: str,
        dst_server: str,
        dst_path: str,
        *,
        mode: str = "overwrite",
        streams: int | None = None,
        direction: str | None = None,
        verify: bool | None = None,
        preserve_times: bool = False,
        policy: str | None = None,
        on_record: Callable[[ClientTransfer], None] | None = None,
        bwlimit: int = 0,
        bwlimit_group: str = "",
    ) -> ClientTransfer:
        """Copy one file between (or within) servers: the finished record, or `TransferFailed`.

        ``on_record`` is called with every record the copy creates (a fallback to a relay makes a
        second one), so a caller whose task is cancelled can still tell how the copy ended.
        ``bwlimit`` (bytes/s) caps this copy together with every other copy naming the same
        ``bwlimit_group`` ("": this copy alone); the pair's `bwlimit` applies besides.
        """
        opts = self.config.transfer_for(src_server, dst_server)
        opts = TransferDefaults(
            streams=streams or opts.streams,
            direction=direction or opts.direction,
            third_party=policy or opts.third_party,
            verify=opts.verify if verify is None else verify,
            block_size=opts.block_size,
            bwlimit=opts.bwlimit,
        )
        spec = CopySpec(
            src_server, src_path, dst_server, dst_path, mode, opts, preserve_times, bwlimit, bwlimit_group
        )
        source, destination = f"{src_server}:{src_path}", f"{dst_server}:{dst_path}"
        if src_server == dst_server:
            t = self._new(
                source, destination, on_record, kind="local", mode=mode, streams=0, direction="local"
            )
            return await self._guard(t, self._local(t, spec))
        if opts.third_party == "never":
            t = self._new(source, destination, on_record, kind="relay", mode=mode, direction="client")
            return await self._guard(t, self._relay(t, spec))
        t = self._new(
            source, destination, on_record, mode=mode, streams=opts.streams, direction=opts.direction
        )
        try:
            return await self._guard(t, self._third_party(t, spec))
        except TransferFailed as exc:
            if opts.third_party == "auto" and exc.errno in UNREACHABLE and t.bytes_done == 0:
                log.warning(
                    "%s -> %s: servers cannot reach each other (%s); copying through the client",
                    source,
                    destination,
                    exc.strerror,
                )
                t.reason = f"fell back to a copy through the client: {exc.strerror}"
                r = self._new(source, destination, on_record, kind="relay", mode=mode, direction="client")
                return await self._guard(r, self._relay(r, spec))
            raise

    async def _guard(self, t: ClientTransfer, work: Any) -> ClientTransfer:
        """Run one copy coroutine; turn every outcome into a final state on the record."""
        try:
            await work
        except TransferFailed as exc:
            self._end(t, "failed", exc.strerror or str(exc))
            raise
        except OSError as exc:
            self._end(t, "failed", exc.strerror or str(exc))
            raise TransferFailed(exc.errno or errno.EIO, exc.strerror or str(exc)) from None
        except BaseException as exc:
            if not is_cancellation(exc):
                raise
            # (the destination may have finished before the cancel reached it: then it is done)
            if t.state != "done":
                if t.cancel_confirmed is None:
                    # A relay stops with our own task, and a server-to-server copy cancelled before
                    # its start reached the destination never ran; a same-server copy is the
                    # server's to finish.
                    t.cancel_confirmed = t.kind != "local"
                    if t.kind == "local":
                        t.reason = "cancelled; the server finishes a same-server copy on its own"
                self._end(t, "cancelled", t.reason or "cancelled by the client")
            raise
        if t.state not in TERMINAL:
            self._end(t, "done")
        return t

    # --- kinds of copy ----------------------------------------------------------------------------
    async def _local(self, t: ClientTransfer, spec: CopySpec) -> None:
        info = await self.pool[spec.src_server].call(
            m.LocalCopy(
                src=spec.src_path, dst=spec.dst_path, mode=spec.mode, preserve_times=spec.preserve_times
            ),
        )
        t.server_transfer_id = info.id
        t.bytes_total = t.bytes_done = info.bytes_done
        if info.state == "skipped":
            self._end(t, "skipped", "destination has the same size and time")

    async def _third_party(self, t: ClientTransfer, spec: CopySpec) -> None:
        src, dst = self.pool[spec.src_server], self.pool[spec.dst_server]
        mode = spec.mode
        if (
            mode == CopyMode.SKIP_EXISTING
            and await self._skip_check(src, spec.src_path, dst, spec.dst_path) != "skipped"
        ):
            # Different after all: copy, and stamp the source's time so the next run can skip.
            mode = "overwrite"
            spec = dataclasses.replace(spec, preserve_times=True)
        # (when the digests match, the destination still gets the order and records the skip)
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._third_party_once(t, src, dst, spec, mode)
                return
            except (ConnectionLost, RemoteError, TransferFailed) as exc:
                # Worth another try: our control connection broke (the destination stopped the
                # transfer but kept its part file and journal, so ordering it again resumes);
                # the destination is still tearing down that previous attempt (EBUSY); or the
                # capability expired while the transfer waited for a slot.
                retry = (
                    isinstance(exc, ConnectionLost)
                    or (isinstance(exc, RemoteError) and exc.errno == errno.EBUSY and attempt > 1)
                    or (isinstance(exc, TransferFailed) and exc.code == FailureCode.CAPABILITY_EXPIRED)
                )
                if not retry:
                    raise
                if attempt >= MAX_RETRIES:
                    raise TransferFailed(
                        exc.errno or errno.EIO,
                        f"gave up after {attempt} tries: {exc.strerror}",
                        exc.code if isinstance(exc, TransferFailed) else None,
                    ) from None
                log.warning("transfer %s: %s; resuming", t.id, exc.strerror)
                mode = "resume" if mode != "new" or t.bytes_done else mode
                await trio.sleep(min(2.0, 0.2 * 2**attempt))

    async def _skip_check(self, src: ServerClient, src_path: str, dst: ServerClient, dst_path: str) -> str:
        """skip-existing: "skipped" when size, mtime and digest match, else "overwrite".

        Each server digests its own copy, so the check moves no file data over the network.
        """
        try:
            dattr = await dst.call(m.Stat(path=dst_path))
        except RemoteError as exc:
            if exc.errno == errno.ENOENT:
                return "overwrite"
            raise
        sattr = await src.call(m.Stat(path=src_path))
        if (sattr.size, sattr.mtime_ns) != (dattr.size, dattr.mtime_ns):
            return "overwrite"
        digests: dict[str, str] = {}

        async def digest(name: str, client: ServerClient, path: str) -> None:
            digests[name] = await client.call(m.Checksum(path=path))

        with excgroups.single_errors():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(digest, "src", src, src_path)
                nursery.start_soon(digest, "dst", dst, dst_path)
        return "skipped" if digests["src"] == digests["dst"] else "overwrite"

    async def _third_party_once(
        self,
        t: ClientTransfer,
        src: ServerClient,
        dst: ServerClient,
        spec: CopySpec,
        mode: str,
    ) -> None:
        opts = spec.opts
        limits = spec.limits(self.instance)
        cap = await src.call(m.TransferOffer(path=spec.src_path, limits=limits))
        t.bytes_total = cap.size
        host = self._data_host(src.name, src, cap.data_host, await src.peer())
        cap = msgspec.structs.replace(cap, data_host=host)
        # The destination names the transfer after the capability: known before we ask, so a
        # cancel can reach a transfer whose start is still in flight.
        t.server_transfer_id = cap.transfer_id
        try:
            started = await dst.call(
                m.TransferStart(
                    capability=cap,
                    source_name=src.name,
                    path=spec.dst_path,
                    mode=mode,
                    streams=opts.streams,
                    direction=opts.direction,
                    verify=opts.verify,
                    block_size=opts.block_size,
                    preserve_times=spec.preserve_times,
                    transfer_id=cap.transfer_id,
                    # What a broken relay left at the path is abandoned once this copy lands
                    # (not while this client relays into it right now).
                    forget_relay=(spec.dst_server, spec.dst_path) not in self._relaying,
                ),
            )
            if not t.bytes_done:  # (a retry after a broken connection resumes this copy's own bytes)
                t.resumed_from = started.resumed_bytes
            if started.skipped:
                t.bytes_done = cap.size
                self._end(t, "skipped", "destination already has this file")
                return
            if opts.direction == "push":
                # A queued transfer must not get its data connections yet: they would sit
                # idle past transfer.data_timeout on the source.
                await self._follow(t, dst, started.transfer_id, until_running=True)
                dhost = self._data_host(dst.name, dst, started.data_host, await dst.peer())
                await src.call(
                    m.TransferPush(
                        capability=cap,
                        ticket=started.ticket,
                        host=dhost,
                        port=started.data_port,
                        streams=started.streams if started.streams >= 0 else opts.streams,
                        tls=started.data_tls,
                    ),
                )
            await self._follow(t, dst, started.transfer_id)
        except BaseException as exc:
            # Stop it on the destination (which closes the data connections, so the source stops
            # too) and wait until it did: the server answers once the transfer is over, its part
            # file and journal kept for a resume.
            final: m.TransferInfo | None = None
            problem = "no answer in 3 s"
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                try:
                    final = await dst.call(
                        m.TransferCancel(transfer_id=cap.transfer_id, reason="cancelled by the client"),
                    )
                except OSError as err:
                    problem = err.strerror or str(err)
            if is_cancellation(exc):
                self._after_cancel(t, dst.name, final, problem)
            raise

    async def _follow(
        self, t: ClientTransfer, dst: ServerClient, transfer_id: str, until_running: bool = False
    ) -> None:
        """Mirror the destination's record into ``t`` until the transfer is done (or, with
        ``until_running``, has left the queue); `TransferFailed` if it failed."""
        while True:
            # A small file's transfer ends within the patience of its first state change (one
            # round trip); waiting for a push transfer to leave the queue needs every change.
            info = await dst.call(
                m.TransferWait(transfer_id=transfer_id, timeout=1.0, patience=0.0 if until_running else 0.05)
            )
            t.state = info.state if info.state not in TERMINAL else t.state
            t.bytes_done, t.bytes_resent, t.streams, t.digest = (
                info.bytes_done,
                info.bytes_resent,
                info.streams,
                info.digest,
            )
            self._notify()
            if info.state == "failed":  # also while waiting for it to leave the queue
                raise TransferFailed(
                    info.errno or errno.EIO, info.reason or "transfer failed", parse_code(info.code)
                )
            if info.state == "done" or (until_running and info.state != "queued"):
                return

    def _after_cancel(
        self, t: ClientTransfer, dst_name: str, info: m.TransferInfo | None, problem: str
    ) -> None:
        """Record what a cancelled third-party transfer's destination said about its end."""
        if info is None or info.state not in TERMINAL:
            t.cancel_confirmed = False
            t.reason = f"cancelled; {dst_name} did not confirm that the transfer stopped ({problem})"
            log.warning("transfer %s: %s", t.id, t.reason)
        elif info.state == "done":
            # Finished before the cancel arrived: the file is complete, and we say so.
            t.bytes_done, t.digest, t.cancel_confirmed = info.bytes_done, info.digest, True
            self._end(t, "done", "finished before the cancel reached the destination")
        else:
            t.bytes_done, t.cancel_confirmed = info.bytes_done, True
            t.reason = "cancelled by the client; the part file is kept for a resume"

    async def _relay(self, t: ClientTransfer, spec: CopySpec) -> None:
        """Copy through the client: pipelined reads from the source, in-order writes into a part
        file (`relay_part_name`) renamed into place at the end.

        A broken relay (daemon killed, server gone, Ctrl-C) leaves the part file and its
        identity record: the next copy into the same destination resumes it after checking
        (digests computed by each server) that the bytes there match the source, or starts
        over.  Writes go in order, so the part file's size says how far it got.
        """
        src, dst = self.pool[spec.src_server], self.pool[spec.dst_server]
        src_path, dst_path, mode = spec.src_path, spec.dst_path, spec.mode
        if (
            mode == CopyMode.SKIP_EXISTING
            and await self._skip_check(src, src_path, dst, dst_path) == "skipped"
        ):
            self._end(t, "skipped", "destination has the same size, time and digest")
            return
        if mode == CopyMode.NEW:
            try:
                await dst.call(m.Stat(path=dst_path))
            except RemoteError as exc:
                if exc.errno != errno.ENOENT:
                    raise
            else:
                raise TransferFailed(errno.EEXIST, f"destination {dst_path} exists (mode new)")
        key = (spec.dst_server, dst_path)
        if key in self._relaying:
            raise TransferFailed(errno.EBUSY, f"another copy through the client into {dst_path} is running")
        self._relaying.add(key)
        try:
            await self._relay_locked(t, spec, src, dst)
        finally:
            self._relaying.discard(key)

    async def _relay_locked(
        self, t: ClientTransfer, spec: CopySpec, src: ServerClient, dst: ServerClient
    ) -> None:
        src_path, dst_path, mode, opts = spec.src_path, spec.dst_path, spec.mode, spec.opts
        sfile = await src.call(m.Open(path=src_path, flags=os.O_RDONLY))
        size = sfile.attr.size
        t.bytes_total = size
        part, id_path = relay_part_name(dst_path), relay_id_name(dst_path)
        identity = msgspec.json.encode(
            {
                "source": f"{spec.src_server}:{src_path}",
                "size": size,
                "ino": sfile.attr.ino,
                "mtime_ns": sfile.attr.mtime_ns,
                "ctime_ns": sfile.attr.ctime_ns,
            }
        )
        dfile: m.Opened | None = None
        digest = xxhash.xxh3_128()
        keep = True  # a failure keeps the part file for a resume, unless it is worthless
        ok = False
        try:
            start = 0 if mode == "new" else await self._relay_resumable(src, dst, spec, size, identity)
            if start:
                dfile = await dst.call(m.Open(path=part, flags=os.O_WRONLY))
                log.info("relay %s: resuming %s with %d of %d bytes already there", t.id, part, start, size)
            else:
                await _unlink_quietly(dst, id_path)
                dfile = await dst.call(m.Create(path=part, mode=0o600, flags=os.O_WRONLY | os.O_TRUNC))
                await _write_small(dst, id_path, identity)
            t.bytes_done = t.resumed_from = start
            buckets = self._relay_buckets_for(spec)
            results: dict[int, bytes] = {}
            ready = trio.Condition()
            offsets = list(range(start, size, RELAY_BLOCK))
            next_write = [start]  # readers stay at most RELAY_INFLIGHT blocks ahead of the writer

            async def reader(offs: list[int]) -> None:
                for off in offs:
                    async with ready:
                        while off >= next_write[0] + RELAY_INFLIGHT * RELAY_BLOCK:
                            await ready.wait()
                    data = await src.call(m.Read(handle=sfile.handle, offset=off, size=RELAY_BLOCK))
                    if len(data) != min(RELAY_BLOCK, size - off):
                        raise _SourceChanged(errno.ESTALE, f"source {src_path} changed size during the copy")
                    async with ready:
                        results[off] = data
                        ready.notify_all()

            async def writer() -> None:
                for off in offsets:
                    async with ready:
                        while off not in results:
                            await ready.wait()
                        data = results.pop(off)
                        next_write[0] = off + RELAY_BLOCK
                        ready.notify_all()
                    if opts.verify:
                        digest.update(data)
                    if buckets:  # bandwidth limits hold for copies through the client too
                        await trio.sleep(max(b.reserve(len(data)) for b in buckets))
                    await dst.call(m.Write(handle=dfile.handle, offset=off, data=data))
                    t.bytes_done += len(data)
                    t.bytes_via_client += len(data)
                    self._notify()

            try:
                with excgroups.single_errors():
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(writer)
                        for k in range(RELAY_INFLIGHT):
                            nursery.start_soon(reader, offsets[k::RELAY_INFLIGHT])
                now = await src.call(m.Stat(path=src_path))
                if (now.size, now.ino, now.mtime_ns, now.ctime_ns) != (
                    size,
                    sfile.attr.ino,
                    sfile.attr.mtime_ns,
                    sfile.attr.ctime_ns,
                ):
                    raise _SourceChanged(errno.ESTALE, f"source {src_path} changed during the copy")
            except _SourceChanged as exc:
                keep = False
                raise TransferFailed(exc.errno or errno.ESTALE, exc.strerror or "source changed") from None
            await dst.call(m.Fsync(handle=dfile.handle))
            if opts.verify:
                theirs = await dst.call(m.Checksum(path=part, offset=start))
                if theirs != digest.hexdigest():
                    keep = False
                    raise TransferFailed(errno.EIO, "verification failed: the destination's digest differs")
                t.digest = "xxh3-128:" + (theirs if not start else await dst.call(m.Checksum(path=part)))
            if spec.preserve_times or mode == CopyMode.SKIP_EXISTING:
                mtime = sfile.attr.mtime_ns
                await dst.call(m.SetAttr(path=part, atime_ns=mtime, mtime_ns=mtime))
            await dst.call(m.Rename(old=part, new=dst_path, noreplace=noreplace(mode)))
            ok = True
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                handles = [(src, sfile.handle)] + ([(dst, dfile.handle)] if dfile is not None else [])
                for client, h in handles:
                    try:
                        await client.call(m.Close(handle=h))
                    except OSError:
                        pass
                if ok or not keep:
                    if not ok:
                        await _unlink_quietly(dst, part)
                    await _unlink_quietly(dst, id_path)

    def _relay_buckets_for(self, spec: CopySpec) -> list[TokenBucket]:
        """The token buckets a relay pays into: its own or its group's, like a source server's."""
        out = []
        for limit in spec.limits(self.instance):
            bucket = self._relay_buckets.get(limit.group) if limit.group else None
            if bucket is None:
                bucket = TokenBucket(limit.rate)
                if limit.group:
                    self._relay_buckets[limit.group] = bucket
            out.append(bucket)
        return out

    async def _relay_resumable(
        self, src: ServerClient, dst: ServerClient, spec: CopySpec, size: int, identity: bytes
    ) -> int:
        """Bytes of a previous relay's part file that can be kept (0: start over).

        Kept: whole blocks, when the identity record names this very source file (path, size,
        inode, modification and change times) and, with verification on, the two servers'
        digests of that range agree.
        """
        part, id_path = relay_part_name(spec.dst_path), relay_id_name(spec.dst_path)
        try:
            old = await _read_small(dst, id_path)
            have = (await dst.call(m.Stat(path=part))).size
        except RemoteError as exc:
            if exc.errno == errno.ENOENT:
                return 0
            raise
        if old != identity:
            log.info("relay into %s: removing a part file of another source file or version", spec.dst_path)
            return 0
        start = min(have, size) // RELAY_BLOCK * RELAY_BLOCK
        if start and spec.opts.verify:
            mine = await src.call(m.Checksum(path=spec.src_path, offset=0, length=start))
            theirs = await dst.call(m.Checksum(path=part, offset=0, length=start))
            if mine != theirs:
                log.warning("relay into %s: the part file differs from the source; starting over", part)
                return 0
        return start

    def status(self) -> list[dict[str, Any]]:
        return [t.as_dict() for t in self.transfers.values()]


class _SourceChanged(OSError):
    """The relay's source changed under it: its part file is worthless."""


async def _unlink_quietly(client: ServerClient, path: str) -> None:
    try:
        await client.call(m.Unlink(path=path))
    except OSError:
        pass


async def _read_small(client: ServerClient, path: str, limit: int = 65536) -> bytes:
    f = await client.call(m.Open(path=path, flags=os.O_RDONLY))
    try:
        return await client.call(m.Read(handle=f.handle, offset=0, size=limit))
    finally:
        with trio.CancelScope(shield=True):
            await client.call(m.Close(handle=f.handle))


async def _write_small(client: ServerClient, path: str, data: bytes) -> None:
    f = await client.call(m.Create(path=path, mode=0o600, flags=os.O_WRONLY | os.O_TRUNC))
    try:
        await client.call(m.Write(handle=f.handle, offset=0, data=data))
    finally:
        with trio.CancelScope(shield=True):
            await client.call(m.Close(handle=f.handle))
