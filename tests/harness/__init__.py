"""The one test and benchmark harness: real servers, real mounts, namespaces, a proxy, polling.

Tests (through ``tests/conftest.py``'s fixtures) and ``bench/`` (which puts ``tests/`` on
``sys.path``) use the same code, so a server or a mount is started, waited for and stopped
in exactly one way:

* `harness.process`: the child environment, polling with a deadline, stopping our own
  processes by pid, pausing one (``throttled``).
* `harness.server`: `ServerProcess` (one ``etfs-server`` subprocess), ``server.yaml`` and key
  writers, the standard multi-user layout, and `RawClient` for malformed traffic.
* `harness.mount`: `Mount` (one ``etfs mount`` daemon), ``mountpoints.yaml`` writer,
  ``force_unmount``; `make_env` for two servers and a mount.
* `harness.netlab`: network namespaces, veth pairs, shaping, servers and mounts inside them.
* `harness.transfers`: a `Cluster` of servers with a `TransferEngine` in-process, the data-path
  `Proxy`, a copy run in a subprocess, test files and part-file leftovers.

Nothing here kills a process by name or touches an address outside loopback and the
namespaces it created.
"""
