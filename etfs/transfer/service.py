"""Client-side services of the mount daemon (transfer engine, control socket, copy requests).

`run_client_services` is started by `etfs.mount` inside the daemon's nursery, after the
filesystem object exists and before `pyfuse3.main` runs.
"""

from __future__ import annotations

from typing import Any

import trio


async def run_client_services(
    ops: Any, pool: Any, config: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    task_status.started(None)
