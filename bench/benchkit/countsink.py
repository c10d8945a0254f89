"""A counting SMTP sink: answers 250 to everything, stores nothing, counts messages (CRLF.CRLF), offers STARTTLS.

Used as the delivery target where Postfix's ``smtp-sink`` cannot serve (it has no STARTTLS): the TLS and DANE
scenarios. One ``asyncio.Protocol`` per connection scanning its buffer in bulk (uvloop when installed), so the
sink costs little next to the systems measured. It prints ``mesg=N`` lines on standard output (at most every
20 ms, and at exit) for the harness to follow.

    python countsink.py --port 2526 [--tls-cert chain.pem --tls-key key.pem] [--max-seconds 3600]

Self-contained on purpose (no imports from the harness): it runs as its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl
import sys

_EOD = b"\r\n.\r\n"


class Stats:
    messages = 0
    sessions = 0


class SinkProtocol(asyncio.Protocol):
    def __init__(self, ctx: ssl.SSLContext | None, hostname: bytes) -> None:
        self.ctx = ctx
        self.hostname = hostname
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.in_data = False
        self.scan_from = 0
        self.upgrading = False
        self.tls = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's classes
        Stats.sessions += 1
        transport.write(b"220 " + self.hostname + b" ESMTP countsink\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.upgrading:  # plaintext that arrived right after the handshake: handled once the swap is done
            return
        out: list[bytes] = []
        buf = self.buf
        while buf:
            if self.in_data:
                if buf.startswith(b".\r\n") and self.scan_from == 0:
                    end = 0
                    consumed = 3
                else:
                    end = buf.find(_EOD, max(0, self.scan_from - 4))
                    consumed = end + 5
                if end < 0:
                    self.scan_from = len(buf)
                    break
                del buf[:consumed]
                self.in_data = False
                self.scan_from = 0
                Stats.messages += 1
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            eol = buf.find(b"\r\n")
            if eol < 0:
                break
            line = bytes(buf[:eol])
            del buf[: eol + 2]
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                caps = [b"250-" + self.hostname, b"250-PIPELINING", b"250-SIZE 104857600", b"250-8BITMIME"]
                if self.ctx is not None and not self.tls:
                    caps.append(b"250-STARTTLS")
                caps.append(b"250 ENHANCEDSTATUSCODES")
                out.append(b"\r\n".join(caps) + b"\r\n")
            elif verb == b"MAIL":
                out.append(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                out.append(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                self.in_data = True
                self.scan_from = 0
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                self._flush(out)
                if self.transport is not None:
                    self.transport.close()
                return
            elif verb == b"STAR" and line.upper() == b"STARTTLS" and self.ctx is not None and not self.tls:
                out.append(b"220 2.0.0 Ready to start TLS\r\n")
                self._flush(out)
                buf.clear()  # anything pipelined after STARTTLS is discarded
                if self.transport is not None:
                    self.transport.pause_reading()  # the ClientHello is for start_tls, not for us
                self.upgrading = True
                asyncio.get_running_loop().create_task(self._starttls())
                return
            elif verb in (b"RSET", b"NOOP"):
                out.append(b"250 2.0.0 Ok\r\n")
            else:
                out.append(b"502 5.5.2 Error: command not recognized\r\n")
        self._flush(out)

    def _flush(self, out: list[bytes]) -> None:
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    async def _starttls(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None and self.ctx is not None
        try:
            new = await loop.start_tls(self.transport, self, self.ctx, server_side=True)
        except (OSError, ssl.SSLError, ConnectionError):
            self.transport.abort()
            return
        self.transport = new  # type: ignore[assignment]
        self.tls = True
        self.upgrading = False
        if self.buf:
            self.data_received(b"")


async def report(stop: asyncio.Event) -> None:
    last = -1
    while not stop.is_set():
        if Stats.messages != last:
            last = Stats.messages
            sys.stdout.write(f"mesg={last} sess={Stats.sessions}\n")
            sys.stdout.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.02)
    sys.stdout.write(f"mesg={Stats.messages} sess={Stats.sessions}\n")
    sys.stdout.flush()


async def main(args: argparse.Namespace) -> None:
    ctx = None
    if args.tls_cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        ctx.num_tickets = args.tickets
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.call_later(args.max_seconds, stop.set)
    hostname = args.hostname.encode()
    server = await loop.create_server(
        lambda: SinkProtocol(ctx, hostname), args.host, args.port, backlog=4096, reuse_address=True
    )
    reporter = asyncio.create_task(report(stop))
    await stop.wait()
    server.close()
    await reporter


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--hostname", default="countsink.bench.test")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="exit by itself after this long")
    parser.add_argument("--tickets", type=int, default=2, help="TLS 1.3 session tickets sent after a handshake")
    parser.add_argument("--asyncio", action="store_true", help="plain asyncio even when uvloop is installed")
    ns = parser.parse_args()
    runner = asyncio.run
    if not ns.asyncio:
        with contextlib.suppress(ImportError):
            import uvloop

            runner = uvloop.run
    runner(main(ns))
