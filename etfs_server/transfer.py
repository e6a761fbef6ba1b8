"""placeholder"""
from __future__ import annotations
from typing import Any
import trio
from etfs.protocol import messages as m

class TransferService:
    def __init__(self, config: Any, roots: Any, threads: Any) -> None:
        pass
    async def start(self, nursery: trio.Nursery, data_port: int) -> None:
        pass
    def handles(self, req: m.Request) -> bool:
        return False
    async def dispatch(self, session: Any, req: m.Request) -> Any:
        raise NotImplementedError
    async def handle_data_connection(self, stream: trio.SocketStream) -> None:
        await stream.aclose()
    async def shutdown(self) -> None:
        pass
