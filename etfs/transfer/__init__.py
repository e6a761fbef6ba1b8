"""The client side of server-to-server transfers: the engine the mount daemon drives
(`engine`), the daemon's control socket for `etfs cp` / `etfs status` (`control`), and
those commands (`commands`, on the Python API `etfs.api`; `tree` expands `cp -r`,
`status_view` renders transfers)."""
