"""RESP2/RESP3 replies read straight off a Redis connection's socket, each bulk string into a buffer of its own size.

redis-py's pure-Python reader copies a bulk reply four times on its way to the
caller (socket chunk → its buffer → a slice → the slice minus CRLF); for the
store's containers (hundreds of KB to tens of MB) those copies cost more than the
round trip. Here a bulk string is received once, by ``recv_into`` into a
``bytearray`` allocated at its announced length: one copy, from the kernel, and a
writable buffer the decoder can wrap as a tensor.

Used only where the connection's own reader holds no unread bytes, so nothing is
taken out of order (`idle_socket`); anywhere else the caller reads with redis-py.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import redis
from redis.connection import Connection

# Header lines are short; one recv of this much takes a small reply whole.
_READ_SIZE = 64 * 1024
_CRLF = b"\r\n"


def idle_socket(connection: Connection) -> socket.socket | None:
    """The socket under ``connection`` when its replies can be read from it directly, else None.

    That needs redis-py's pure-Python reader (hiredis keeps its own state) with
    nothing buffered, and binary replies (``decode_responses=False``).
    """
    buffered = getattr(getattr(connection, "_parser", None), "_buffer", None)
    sock = getattr(connection, "_sock", None)
    if sock is None or not hasattr(buffered, "unread_bytes") or buffered.unread_bytes():
        return None
    if str(getattr(connection, "protocol", 2)) not in ("2", "3") or connection.encoder.decode_responses:
        return None
    return sock


class ReplyReader:
    """Reads replies in order — what the store's commands answer: simple and bulk strings as ``bytearray``,
    integers, nulls (RESP2's and RESP3's) as None, arrays as lists; an error reply raises the exception
    redis-py would raise for it."""

    def __init__(self, sock: socket.socket, connection: Connection):
        self._sock = sock
        self._connection = connection  # for redis-py's mapping of error replies to exception types
        self._buffer = bytearray()
        self._pos = 0

    def read(self) -> Any:
        line = self._line()
        kind, body = line[:1], line[1:]
        if kind == b"$":
            length = int(body)
            return None if length < 0 else self._bulk(length)
        if kind == b":":
            return int(body)
        if kind == b"*":
            count = int(body)
            return None if count < 0 else [self.read() for _ in range(count)]
        if kind == b"_":  # RESP3's null
            return None
        if kind == b"+":
            return bytearray(body)
        if kind == b"-":
            raise self._connection._parser.parse_error(bytes(body).decode(errors="replace"))
        if kind == b">":
            # A RESP3 push (tracking invalidation, maintenance hint) is not a reply: vlmq turns on
            # no push feature, so it is read past, and the reply is what follows it.
            [self.read() for _ in range(int(body))]
            return self.read()
        # Not retried (not a connection error); the caller drops the connection, whose rest is unread.
        raise redis.RedisError(f"RESP reply type {bytes(kind)!r} is not one vlmq's direct reader handles")

    def has_unread(self) -> bool:
        """Whether bytes beyond the replies read were received (the connection's reader would not see them)."""
        return self._pos != len(self._buffer)

    def _line(self) -> bytearray:
        while (end := self._buffer.find(_CRLF, self._pos)) < 0:
            self._receive()
        line = self._buffer[self._pos : end]
        self._pos = end + 2
        return line

    def _bulk(self, length: int) -> bytearray:
        out = bytearray(length)
        buffered = min(length, len(self._buffer) - self._pos)
        with memoryview(self._buffer) as received:  # released at once: the buffer must stay resizable
            out[:buffered] = received[self._pos : self._pos + buffered]
        self._pos += buffered
        view = memoryview(out)
        while buffered < length:  # the rest straight from the socket into its place
            buffered += self._recv(lambda: self._sock.recv_into(view[buffered:]))
        while len(self._buffer) - self._pos < 2:
            self._receive()
        if self._buffer[self._pos : self._pos + 2] != _CRLF:
            raise redis.ConnectionError("a bulk reply from Redis does not end in CRLF")
        self._pos += 2
        return out

    def _receive(self) -> None:
        if self._pos == len(self._buffer):  # everything consumed: start over instead of growing
            self._buffer.clear()
            self._pos = 0
        self._buffer += self._recv(lambda: self._sock.recv(_READ_SIZE))

    @staticmethod
    def _recv(receive: Callable[[], Any]) -> Any:
        # redis-py's exception types, so its retry and reconnect logic applies unchanged.
        try:
            received = receive()
        except socket.timeout as exc:
            raise redis.TimeoutError("Timeout reading from socket") from exc
        except OSError as exc:
            raise redis.ConnectionError(f"Error while reading from socket: {exc}") from exc
        if not received:  # b"" or 0: the server closed the connection
            raise redis.ConnectionError("Connection closed by server.")
        return received
