"""Client-side services of the mount daemon: transfer engine, copy requests, control socket.

`run_client_services` is started by `etfs.daemon.mount` inside the daemon's nursery, after the
filesystem object exists and before `pyfuse3.main` runs.  It lives until the mount ends.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from etfs import copyrange
from etfs.client import Pool
from etfs.common.safefile import write_atomic
from etfs.config import ClientConfig
from etfs.transfer.engine import TransferEngine

from .control import ControlServer, ensure_registry_dir, forget_dead_daemons

if TYPE_CHECKING:
    from etfs.fs.operations import EtfsOperations

log = logging.getLogger(__name__)


async def run_client_services(
    ops: EtfsOperations,
    pool: Pool,
    config: ClientConfig,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    from etfs.fs.copy import CopyDispatcher
    from etfs.identities import Identities

    engine = TransferEngine(pool, config)
    shared = os.geteuid() == 0  # a root mount: every local user may use the control socket
    try:
        reg: Path | None = ensure_registry_dir(shared=shared)
    except OSError as exc:
        # A planted or shared registry directory: serving the control socket (or writing our
        # record) there could hand `etfs cp` requests to someone else.  The mount itself still
        # works; only `etfs cp` / `etfs status` cannot find it.
        log.error("not starting the control socket (etfs cp/status will not find this mount): %s", exc)
        reg = None
    async with trio.open_nursery() as nursery:
        identities = Identities(config, pool, engine, nursery)
        ops.identities = identities
        dispatcher = CopyDispatcher(ops, engine, nursery)
        copyrange.set_handler(dispatcher.on_request)
        socket_path = record = None
        if reg is not None:
            forget_dead_daemons(reg)
            socket_path = reg / f"{os.getpid()}.sock"
            record = reg / f"{os.getpid()}.json"
            control = ControlServer(engine, socket_path, identities, shared=shared)
            await nursery.start(control.serve)
            # Readable by all on a shared mount: local users' `etfs login` / `etfs cp` find it.
            write_atomic(
                record,
                json.dumps(
                    {
                        "pid": os.getpid(),
                        "config": str(config.file),
                        "root": str(config.root),
                        "socket": str(socket_path),
                        "servers": {
                            name: str(e.mountpoint) if e.mountpoint else str(config.root / name)
                            for name, e in config.servers.items()
                        },
                    }
                ),
                0o644 if shared else 0o600,
            )
        task_status.started(None)
        try:
            await trio.sleep_forever()
        finally:
            identities.forget_all()
            copyrange.set_handler(None)
            if record is not None:
                record.unlink(missing_ok=True)
            if socket_path is not None:
                socket_path.unlink(missing_ok=True)
