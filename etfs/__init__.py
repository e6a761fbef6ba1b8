"""etfs, the e-transfer filesystem: client side (mount, transfers, command line).

Folders: `protocol` (wire format, no I/O), `client` (connections to servers), `fs`
(the pyfuse3 filesystem), `copyrange` (copy_file_range requests next to pyfuse3),
`transfer` (server-to-server copies driven by the client), `_sendfile_cffi` (the
data-path syscalls).  The server lives in the sibling package `etfs_server`.
"""

__version__ = "0.1.0"
