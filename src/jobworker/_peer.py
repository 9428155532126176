"""Who is at the other end of a Unix socket. Light: the launcher imports it."""

from __future__ import annotations

import socket
import struct

__all__ = ["peer_uid"]

_UCRED = struct.Struct("3i")


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket (SO_PEERCRED).

    Raises:
        OSError: ``conn`` is not a connected Unix socket.
    """
    cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return int(_UCRED.unpack(cred)[1])
