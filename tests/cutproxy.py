"""A TCP proxy on 127.0.0.1 that records what it forwards and can cut one connection.

Clients under test talk to the relay through it. With ``cut_in_event=n`` the first
connection whose relay-to-client bytes reach the middle of event n's ``data:`` line
is closed right there, with a FIN or (``rst=True``) an RST; later connections pass
through untouched.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
import time
from dataclasses import dataclass

# How far into the event's data line the cut falls (the relay's lines are far longer).
CUT_OFFSET = len(b"data: ") + 20


@dataclass
class Connection:
    request: bytes = b""  # client to relay
    response: bytes = b""  # relay to client, as far as it was forwarded
    cut: bool = False

    def header(self, name: str) -> str | None:
        """The request header ``name`` of the connection's first request."""
        head = self.request.partition(b"\r\n\r\n")[0].decode("latin-1")
        for line in head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


def cut_position(response: bytes, event: int) -> int | None:
    """Where, in the relay-to-client bytes so far, the middle of ``event``'s data line is.

    That is the first ``data:`` line after the end of the block holding event n-1's
    ``id:`` line (comment lines and HTTP chunk-size lines may come between). It does
    not rely on where the relay puts the ``id:`` line in a block.
    """
    previous_id = response.find(b"\nid: %d\n" % (event - 1))
    if previous_id < 0:
        return None
    end = response.find(b"\n\n", previous_id + 1)
    data = response.find(b"\ndata: ", end) if end >= 0 else -1
    if data < 0 or len(response) < data + 1 + CUT_OFFSET:
        return None
    return data + 1 + CUT_OFFSET


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes the kernel still holds for the peer (not sent, or not acknowledged)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


class CuttingProxy:
    def __init__(self, target_port: int, cut_in_event: int | None = None, rst: bool = False):
        self.target_port = target_port
        self.cut_in_event = cut_in_event
        self.rst = rst
        self.connections: list[Connection] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cuts(self) -> int:
        return sum(c.cut for c in self.connections)

    async def start(self) -> CuttingProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection()
        self.connections.append(conn)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        upward = asyncio.ensure_future(self._client_to_relay(conn, reader, up_writer))
        try:
            await self._relay_to_client(conn, up_reader, writer)
        finally:
            upward.cancel()
            up_writer.close()
            if not writer.is_closing():
                writer.close()

    @staticmethod
    async def _client_to_relay(
        conn: Connection, reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter
    ) -> None:
        while data := await reader.read(65536):
            conn.request += data
            up_writer.write(data)
            await up_writer.drain()
        up_writer.close()

    async def _relay_to_client(
        self, conn: Connection, up_reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        at: int | None = None
        while data := await up_reader.read(65536):
            armed = self.cut_in_event is not None and not self.cuts
            if armed:
                at = cut_position(conn.response + data, self.cut_in_event)
                if at is not None:
                    data = data[: at - len(conn.response)]
            conn.response += data
            writer.write(data)
            await writer.drain()
            if armed and at is not None:
                conn.cut = True
                await self._cut(writer)
                return

    async def _cut(self, writer: asyncio.StreamWriter) -> None:
        """Close the client's connection once the forwarded bytes have left the socket."""
        sock = writer.get_extra_info("socket")
        deadline = time.monotonic() + 2
        while (
            writer.transport.get_write_buffer_size() or unsent_bytes(sock)
        ) and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        if self.rst:
            # SO_LINGER with a zero timeout: close() sends an RST instead of a FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()
