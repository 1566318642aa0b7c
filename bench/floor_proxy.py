"""The floor: the least a proxy on asyncio streams + httptools can do per request, on uvloop.

Usage: python bench/floor_proxy.py LISTEN_PORT UPSTREAM_PORT

What the sidecar's data path is built from, with nothing else: each client connection gets its
own upstream connection, a request head and body are parsed and re-sent, the response is parsed
and relayed. Content-Length bodies only, no pool, no timeouts, no error handling, no policies.
It is not a product; it shows how much of the sidecar's cost is the transport itself.
"""

import asyncio
import sys

import httptools
import uvloop

HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"host"}


class Message:
    """httptools callbacks collecting one message's head and body."""

    def __init__(self) -> None:
        self.headers: list[bytes] = []
        self.body: list[bytes] = []
        self.url = b""
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in HOP:
            self.headers.append(name + b": " + value + b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True


async def read_message(reader: asyncio.StreamReader, msg: Message, parser: object) -> bool:
    while not msg.done:
        data = await reader.read(65536)
        if not data:
            return False
        parser.feed_data(data)  # type: ignore[attr-defined]
    return True


async def serve(cr: asyncio.StreamReader, cw: asyncio.StreamWriter, port: int) -> None:
    ur, uw = await asyncio.open_connection("127.0.0.1", port)
    try:
        while True:
            req = Message()
            if not await read_message(cr, req, httptools.HttpRequestParser(req)):
                return
            body = b"".join(req.body)
            uw.write(
                b"POST "
                + req.url
                + b" HTTP/1.1\r\nhost: upstream\r\n"
                + b"".join(req.headers)
                + b"\r\n"
                + body
            )
            resp = Message()
            parser = httptools.HttpResponseParser(resp)
            if not await read_message(ur, resp, parser):
                return
            status = parser.get_status_code()
            payload = b"".join(resp.body)
            cw.write(b"HTTP/1.1 %d OK\r\n" % status + b"".join(resp.headers) + b"\r\n" + payload)
            await cw.drain()
    finally:
        uw.close()
        cw.close()


async def main(port: int, upstream_port: int) -> None:
    server = await asyncio.start_server(
        lambda r, w: serve(r, w, upstream_port), "127.0.0.1", port, backlog=2048
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
