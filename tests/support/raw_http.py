"""Raw HTTP/1.1 over a socket, for the clients whose timing or bytes matter (a stalled
reader, a client that goes away mid-request)."""

from __future__ import annotations

import socket


def read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """A raw HTTP answer's status, headers and whatever body bytes came with them."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"closed before the headers: {received!r}"
        received += chunk
    raw, rest = received.split(b"\r\n\r\n", 1)
    lines = raw.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, rest
