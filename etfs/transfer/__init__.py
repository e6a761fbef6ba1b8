"""The client side of server-to-server transfers: the engine the mount daemon drives
(`engine`), the daemon's control socket for `etfs cp` / `etfs status` (`control`), and
those commands (`commands`)."""
