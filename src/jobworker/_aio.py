"""Small asyncio helpers shared by the server and jobctl."""

from __future__ import annotations

import asyncio

__all__ = ["wait_fd"]


async def wait_fd(fd: int, *, write: bool = False) -> None:
    """Wait until ``fd`` is readable (or writable); the watch is removed however this ends."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    add, remove = (
        (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    )
    add(fd, ready)
    try:
        await fut
    finally:
        remove(fd)
