"""A fault-injecting HTTP proxy on loopback, in front of the test S3 server: a flaky object store.

    proxy = FlakyStore("http://127.0.0.1:5000", rate=0.2, seed=7).start()
    os.environ["AWS_ENDPOINT_URL"] = proxy.url     # every S3 client now goes through it
    ...
    proxy.down()    # the store is gone: connections are refused
    proxy.up()      # and back, on the same port
    proxy.stop()

Each request is forwarded whole (HTTP/1.1, keep-alive towards the client, one upstream connection
per request) unless its fault is drawn. A fault is drawn for `rate` of the requests: an answer 503
SlowDown, an answer 500 InternalError, a connection reset before the request is forwarded, a reset
after it was forwarded (the answer is lost: the client cannot tell whether a PUT landed), or a 1 s
stall before forwarding. The draw is seeded by (seed, method, target, how many times this proxy
has seen that method and target), so it does not depend on the order in which concurrent clients
(Ray workers) arrive, and at most `max_in_a_row` faults hit one method and target in a row: whether
a run completes then depends on the clients' retries (6 attempts) being more than that, not on luck.

`down_after(marker, n)`: the store goes down for good (refused connections) right after the `n`th
successful PUT whose target contains `marker`: a deterministic point mid-run.
"""

from __future__ import annotations

import asyncio
import collections
import random
import socket
import struct
import threading
from urllib.parse import urlsplit

FAULTS = ("slowdown", "internal", "reset", "reset_after", "stall")
_ERROR_BODY = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
               '<RequestId>flaky</RequestId></Error>')
_ERRORS = {"slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
           "internal": (500, "Internal Server Error", "InternalError", "We encountered an internal error.")}


class FlakyStore:
    def __init__(self, upstream: str, *, rate: float = 0.2, seed: int = 0, max_in_a_row: int = 3,
                 stall_seconds: float = 1.0):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.rate, self.seed, self.max_in_a_row, self.stall_seconds = rate, seed, max_in_a_row, stall_seconds
        self.counts: collections.Counter[str] = collections.Counter()  # "requests", "forwarded", and each fault
        self.puts: collections.Counter[str] = collections.Counter()  # answered 200, by path
        self._seen: collections.Counter[str] = collections.Counter()
        self._in_a_row: collections.Counter[str] = collections.Counter()
        self._down_after: tuple[str, int] | None = None
        self._clients: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="flaky-store")
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- control, from any thread
    def start(self) -> FlakyStore:
        self._thread.start()
        self.up()
        return self

    def up(self) -> None:
        async def listen():
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
            self.port = self._server.sockets[0].getsockname()[1]
        asyncio.run_coroutine_threadsafe(listen(), self._loop).result(10)

    def down(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)

    def down_after(self, marker: str, n: int) -> None:
        self._down_after = (marker, n)

    def stop(self) -> None:
        self.down()

        async def drop_clients():
            for writer in list(self._clients):
                writer.transport.abort()
            await asyncio.sleep(0.1)  # their handlers see the abort and finish
        asyncio.run_coroutine_threadsafe(drop_clients(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    # --- the proxy
    def _draw(self, method: str, target: str) -> str | None:
        key = f"{method} {target}"
        n = self._seen[key]
        self._seen[key] += 1
        rng = random.Random(f"{self.seed}|{key}|{n}")
        if rng.random() >= self.rate or self._in_a_row[key] >= self.max_in_a_row:
            self._in_a_row[key] = 0
            return None
        fault = rng.choice(FAULTS)
        self._in_a_row[key] = 0 if fault == "stall" else self._in_a_row[key] + 1
        return fault

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        try:
            while self._server is not None:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
                headers = _headers(head)
                if headers.get(b"expect", b"").lower() == b"100-continue":  # botocore's PUTs wait for it
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await writer.drain()
                    head = _with_header(head, b"Expect", None)
                body = await _read_body(reader, headers, method=None)
                self.counts["requests"] += 1
                fault = self._draw(method, target)
                if fault:
                    self.counts[fault] += 1
                if fault == "reset":
                    return _reset(writer)
                if fault in _ERRORS:
                    writer.write(_error_response(*_ERRORS[fault]))
                    await writer.drain()
                    continue
                if fault == "stall":
                    await asyncio.sleep(self.stall_seconds)
                answer = await self._forward(head, body, method)
                self.counts["forwarded"] += 1
                if fault == "reset_after":
                    return _reset(writer)
                if method == "PUT" and answer.startswith(b"HTTP/1.1 200"):
                    self.puts[target.split("?", 1)[0]] += 1
                writer.write(answer)
                await writer.drain()
                if method == "PUT" and self._down_after and self._down_after[0] in target \
                        and answer.startswith(b"HTTP/1.1 200"):
                    self.counts["down_marker_puts"] += 1
                    if self.counts["down_marker_puts"] >= self._down_after[1]:
                        self._down_after = None
                        await self._close()
                        return _reset(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._clients.discard(writer)
            writer.close()

    async def _forward(self, head: bytes, body: bytes, method: str) -> bytes:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            up_writer.write(_with_header(head, b"Connection", b"close") + body)
            await up_writer.drain()
            answer_head = await up_reader.readuntil(b"\r\n\r\n")
            status = int(answer_head.split(b" ", 2)[1])
            headers = _headers(answer_head)
            if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                answer_body = b""
            else:
                answer_body = await _read_body(up_reader, headers, method=method)
                if b"content-length" not in headers and b"chunked" not in headers.get(b"transfer-encoding", b""):
                    answer_head = _with_header(answer_head, b"Content-Length", str(len(answer_body)).encode())
            return _with_header(answer_head, b"Connection", b"keep-alive") + answer_body
        finally:
            up_writer.close()


def _headers(head: bytes) -> dict[bytes, bytes]:
    out = {}
    for line in head.split(b"\r\n")[1:]:
        if b":" in line:
            name, value = line.split(b":", 1)
            out[name.strip().lower()] = value.strip()
    return out


def _with_header(head: bytes, name: bytes, value: bytes | None) -> bytes:
    """`head` with header `name` set to `value` (None: removed)."""
    lines = [ln for ln in head.rstrip(b"\r\n").split(b"\r\n") if not ln.lower().startswith(name.lower() + b":")]
    return b"\r\n".join(lines + ([name + b": " + value] if value is not None else [])) + b"\r\n\r\n"


async def _read_body(reader: asyncio.StreamReader, headers: dict[bytes, bytes], method: str | None) -> bytes:
    """The raw body as framed by the headers (chunked bodies kept chunked); with `method` (an answer)
    and no framing, everything up to the end of the connection."""
    if b"chunked" in headers.get(b"transfer-encoding", b""):
        raw = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            raw += size_line
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                    raw += line
                return bytes(raw + b"\r\n")
            raw += await reader.readexactly(size + 2)
    if b"content-length" in headers:
        return await reader.readexactly(int(headers[b"content-length"]))
    return await reader.read() if method else b""


def _error_response(status: int, phrase: str, code: str, message: str) -> bytes:
    body = _ERROR_BODY.format(code=code, message=message).encode()
    return (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
            f"Connection: keep-alive\r\n\r\n").encode() + body


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed or overloaded server's kernel would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
