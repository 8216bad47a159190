"""The benchmark's upstream: a minimal HTTP/1.1 keep-alive responder on raw asyncio + uvloop.

It parses only what it must (end of head, Content-Length) and answers every request with the
same small 200, so that in the benchmark the upstream is never what limits the proxy. Not a
general HTTP server: the e2e tests and `make run` use echo_upstream.py.

    python loadtests/fast_upstream.py --port 9002
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n"
    b"Connection: keep-alive\r\n\r\n"
    b'{"status":"ok"}\n'
)


class Responder(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out = []
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buffer[:end].lower()
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                line_end = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : line_end if line_end >= 0 else None])
            if b"transfer-encoding: chunked" in head:
                stop = self.buffer.find(b"\r\n0\r\n\r\n", end)
                if stop < 0:
                    break
                self.buffer = self.buffer[stop + 7 :]
            else:
                if len(self.buffer) < end + 4 + length:
                    break
                self.buffer = self.buffer[end + 4 + length :]
            out.append(RESPONSE)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


async def serve(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Responder, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9002)
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
