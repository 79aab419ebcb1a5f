"""The server's listening socket, bound before uvicorn starts (port 0 picks a free port, and
the embedded owner announces the port it got)."""

from __future__ import annotations

import socket

from searchsvc.core.errors import ConfigError


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for ``host:port``.

    The protocol is named (``IPPROTO_TCP``), not left at 0: asyncio turns Nagle's algorithm
    off (``TCP_NODELAY``) only on sockets whose ``proto`` says TCP, and with Nagle on, a
    response written in two pieces (headers, then body) waits for the client's delayed ACK:
    about 40 ms on every request after the first on a kept-alive connection.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    return sock
