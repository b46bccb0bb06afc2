"""A WebSocket server on loopback that misbehaves on purpose, for probe.locust.wsconn's tests.

Built on websockets' sans-I/O ``ServerProtocol`` over asyncio streams, so every byte's timing is
in the test's hands. Run as ``python tests/wsconn_peer.py [CERT KEY]``: prints its port (and,
given a certificate and key, a second line with the port of the same server over TLS), serves
until killed.
Behaviour by path:

- ``/early``: the first message (binary ``early``) goes out in the same write as the handshake
  response; then every message received is echoed;
- ``/frag``: a text message in three fragments, a binary one in two, then close 4001 "bye";
- ``/badutf8``: a text message that is not UTF-8, then echo;
- ``/reject``: HTTP 403;
- ``/silent``: never answers the handshake;
- ``/linger``: answers the client's close frame but never ends the TCP connection.
"""

from __future__ import annotations

import asyncio
import ssl
import sys

from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    proto = ServerProtocol()

    def flush() -> None:
        for chunk in proto.data_to_send():
            if chunk:
                writer.write(chunk)
            elif writer.can_write_eof():
                writer.write_eof()

    request = None
    while request is None:
        data = await reader.read(65536)
        if not data:
            writer.close()
            return
        proto.receive_data(data)
        events = proto.events_received()
        if events:
            request = events[0]
    path = request.path
    if path == "/silent":
        await asyncio.sleep(3600)
    if path == "/reject":
        proto.send_response(proto.reject(403, "not you\n"))
        flush()
        await writer.drain()
        writer.close()
        return
    proto.send_response(proto.accept(request))
    if path == "/early":
        proto.send_binary(b"early")
    if path == "/frag":
        proto.send_text(b"he", fin=False)
        proto.send_continuation(b"llo ", fin=False)
        proto.send_continuation("w\u00f6rld".encode(), fin=True)
        proto.send_binary(b"\x01\x02", fin=False)
        proto.send_continuation(b"\x03", fin=True)
        proto.send_close(4001, "bye")
    if path == "/badutf8":
        proto.send_frame(Frame(Opcode.TEXT, b"\xff\xfe"))
    flush()
    await writer.drain()
    while True:
        data = await reader.read(65536)
        if not data:
            proto.receive_eof()
            flush()
            break
        proto.receive_data(data)
        for event in proto.events_received():
            if isinstance(event, Frame) and event.opcode in (Opcode.TEXT, Opcode.BINARY):
                if event.opcode is Opcode.TEXT:
                    proto.send_text(event.data)
                else:
                    proto.send_binary(event.data)
        if path == "/linger":
            # The close reply goes out, the end of the connection does not.
            for chunk in proto.data_to_send():
                if chunk:
                    writer.write(chunk)
        else:
            flush()
        await writer.drain()
        if proto.close_expected() and path != "/linger":
            break
    await asyncio.sleep(0.05)
    writer.close()


async def _main() -> None:
    server = await asyncio.start_server(_handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    if len(sys.argv) > 2:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(sys.argv[1], sys.argv[2])
        secure = await asyncio.start_server(_handle, "127.0.0.1", 0, ssl=ctx)
        print(secure.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_main())
