"""Server-to-server transfers, one file per part:

* `capabilities` - what a source signs: one file, one transfer, one destination, a few minutes
* `records`      - transfer records, restart records and journals (what a resume rests on)
* `datapath`     - blocking socket I/O of data connections, run in worker threads
* `source`       - the source role: offers, serving blocks, pushing
* `destination`  - the destination role: `DestinationTransfer` owns part file, journal and state
* `listener`     - the data port: greetings, hellos, handing connections to their transfer
* `localcopy`    - same-server copies
* `service`      - request handlers (`TransferService`), wiring the above together

Roles.  The *source* server only answers block requests for a capability it signed
itself.  The *destination* owns the transfer: it keeps the persisted record, decides
which blocks to fetch, receives into a hidden part file, verifies each block's digest,
and renames the part file onto the final name only when every block arrived and matched.
Direction only decides who connects (see `etfs.protocol.data`).
"""

from __future__ import annotations

from .service import TransferService

__all__ = ["TransferService"]
