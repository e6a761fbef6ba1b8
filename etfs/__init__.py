"""etfs, the e-transfer filesystem: the client, and the parts the server shares with it.

Shared with `etfs_server` (the sibling package, which imports nothing else of this one;
``tests/test_layout.py`` checks it): `protocol` (wire format, no I/O), `_sendfile_cffi` (the
data-path syscalls), `common` (YAML config reading, rate limits, files written safely,
logging for systemd).  The client: `client` (connections to servers), `fs` (the pyfuse3
filesystem), `copyrange` (copy_file_range requests next to pyfuse3), `transfer`
(server-to-server copies driven by the client), `api` (the Python API of ``etfs cp`` /
``etfs status``), `mount`, `cli`.
"""

__version__ = "0.1.0"
