"""The server's listening socket: connections it accepts send small writes at once."""

from __future__ import annotations

import asyncio
import socket

import pytest

from searchsvc.core.errors import ConfigError
from searchsvc.serving.http.listen import listening_socket


def accepted_nodelay(sock: socket.socket) -> int:
    """TCP_NODELAY on the server side of one connection accepted through asyncio, as
    uvicorn accepts them from the socket handed to it."""
    seen: list[int] = []

    async def main() -> None:
        done = asyncio.Event()

        def on_connect(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = writer.get_extra_info("socket")
            seen.append(peer.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()
            done.set()

        server = await asyncio.start_server(on_connect, sock=sock)
        port = sock.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.wait_for(done.wait(), 10)
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
    return seen[0]


def test_accepted_connections_have_nagle_off() -> None:
    # With Nagle on, every kept-alive request after the first waited ~40 ms for a delayed ACK.
    assert accepted_nodelay(listening_socket("127.0.0.1", 0)) != 0


def test_a_plain_socket_would_keep_nagle_on() -> None:
    # The reason for naming the protocol: asyncio leaves a proto-0 socket alone.
    plain = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    plain.bind(("127.0.0.1", 0))
    assert accepted_nodelay(plain) == 0


def test_a_taken_port_names_the_address() -> None:
    first = listening_socket("127.0.0.1", 0)
    first.listen()
    port = first.getsockname()[1]
    try:
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            listening_socket("127.0.0.1", port)
    finally:
        first.close()
