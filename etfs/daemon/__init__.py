"""The mount daemon: what ``etfs mount`` runs until the mount goes away.

* `mount`: ``etfs mount`` / ``etfs umount``; the FUSE session (pyfuse3 with the copyrange shim),
  bind mounts or symlinks per server, the registry (``daemon.json``), stale-mount cleanup.
* `services`: the services the daemon starts in its nursery next to the filesystem (the
  transfer engine, the control socket).
* `control`: the daemon's control socket (``etfs cp`` / ``etfs status`` / ``etfs login`` talk
  to it) and the per-uid registry of running daemons.
* `fstab`: ``mount -t fuse.etfs`` / ``etfs#CONFIG`` lines of /etc/fstab turned into ``etfs mount``.
* `procs`: whether a registered pid still runs.
"""
