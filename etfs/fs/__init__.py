"""The etfs filesystem: pyfuse3 operations over etfs servers (one top-level directory each).

`EtfsOperations` (in `operations`) holds the handlers; `inodes` maps inode numbers to
(server, path); `handles` implements open files with readahead and write-behind.
Importing this package imports pyfuse3: call `etfs.copyrange.install()` first.
"""

from __future__ import annotations

from .handles import OpenFile
from .operations import EtfsOperations

__all__ = ["EtfsOperations", "OpenFile"]
