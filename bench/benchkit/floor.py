"""The floor: a bare aiosmtpd server whose handler answers 250 after DATA and stores nothing.

It is driven exactly like the systems under test, so ``mxgate / floor`` shows what mxgate's own work (queue,
fsync, hooks, delivery) costs on top of the SMTP front end both share. uvloop when installed (as mxgate).

    python floor.py --port 2527 [--tls-cert chain.pem --tls-key key.pem] [--max-seconds 3600]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import ssl
from typing import Any

from aiosmtpd.smtp import SMTP


class NullHandler:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 2.0.0 OK: discarded"


async def main(args: argparse.Namespace) -> None:
    ctx = None
    if args.tls_cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.call_later(args.max_seconds, stop.set)
    handler = NullHandler()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="floor.bench.test", tls_context=ctx, data_size_limit=104857600, loop=loop),
        sock=args.sock,
        backlog=4096,
    )
    await stop.wait()
    server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    parser.add_argument("--asyncio", action="store_true", help="plain asyncio even when uvloop is installed")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the listening socket (fork)")
    ns = parser.parse_args()
    ns.sock = socket.create_server((ns.host, ns.port), backlog=4096, reuse_port=False)
    for _ in range(ns.workers - 1):
        if os.fork() == 0:  # children share the listener; the kernel spreads accepts between the processes
            break
    runner = asyncio.run
    if not ns.asyncio:
        with contextlib.suppress(ImportError):
            import uvloop

            runner = uvloop.run
    runner(main(ns))
