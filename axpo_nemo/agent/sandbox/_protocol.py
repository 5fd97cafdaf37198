"""Message framing between the trainer, the zygote and the workers.

A message is a JSON header plus binary blobs (image pixels or PNG files) over a stream socket:
``u32 header length | header JSON | blob bytes...``; the header lists the blob sizes under
``"_blobs"``. Nothing is pickled, so a compromised worker cannot run code in the trainer.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any

_LEN = struct.Struct("!I")
MAX_HEADER = 64 * 1024 * 1024
MAX_NAME_CHARS = 100


def exception_name(value: object) -> str | None:
    """``value`` if it can be an exception's class name (a Python identifier of at most
    `MAX_NAME_CHARS` characters), else None. The name comes from the sandboxed code, which
    chooses it (``type("E" * 10**6, (Exception,), {})``) or forges the whole status frame."""
    if isinstance(value, str) and len(value) <= MAX_NAME_CHARS and value.isidentifier():
        return value
    return None


def short_text(value: object, limit: int = 2000) -> str:
    """``value`` as text of at most ``limit`` characters (the middle elided)."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    half = (limit - 40) // 2
    return f"{text[:half]} ... [{len(text) - 2 * half} characters omitted] ... {text[len(text) - half:]}"


class ProtocolError(Exception):
    """The peer sent something malformed, too large, or went away mid-message."""


def send_msg(
    sock: socket.socket, header: dict[str, Any], blobs: Sequence[bytes] = (), fds: Sequence[int] = ()
) -> None:
    """Send one message; ``fds`` travel as SCM_RIGHTS ancillary data with its first byte."""
    head = json.dumps({**header, "_blobs": [len(b) for b in blobs]}).encode()
    payload = _LEN.pack(len(head)) + head
    if fds:
        sent = socket.send_fds(sock, [payload[:1]], list(fds))
        payload = payload[sent:]
    sock.sendall(payload)
    for blob in blobs:
        sock.sendall(blob)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out receiving a message")
            sock.settimeout(remaining)
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError("peer closed the connection")
        got += k
    return bytes(buf)


def recv_msg(
    sock: socket.socket,
    *,
    max_bytes: int = 1 << 31,
    max_header: int = MAX_HEADER,
    deadline: float | None = None,
    with_fds: bool = False,
) -> tuple[dict[str, Any], list[bytes], list[int]]:
    """Receive one message: (header, blobs, fds). Raises EOFError, TimeoutError or ProtocolError.

    A header longer than ``max_header`` bytes, or blobs longer than ``max_bytes`` in all, is a
    `ProtocolError` before anything of it is read.
    """
    fds: list[int] = []
    if deadline is None:
        sock.settimeout(None)
    if with_fds:
        if deadline is not None:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
        first, fds, _, _ = socket.recv_fds(sock, 1, 8)
        if not first:
            raise EOFError("peer closed the connection")
        first += _recv_exact(sock, _LEN.size - 1, deadline)
    else:
        first = _recv_exact(sock, _LEN.size, deadline)
    (n,) = _LEN.unpack(first)
    if n > min(MAX_HEADER, max_header, max_bytes):
        raise ProtocolError(f"header of {n} bytes is too large")
    try:
        header = json.loads(_recv_exact(sock, n, deadline))
        sizes = header.pop("_blobs")
        if not isinstance(header, dict) or not all(isinstance(s, int) and s >= 0 for s in sizes):
            raise ValueError("bad header")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ProtocolError(f"malformed header: {e}") from None
    if sum(sizes) > max_bytes:
        raise ProtocolError("message too large")
    blobs = [_recv_exact(sock, s, deadline) for s in sizes]
    return header, blobs, fds
