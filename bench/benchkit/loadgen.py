"""An async SMTP load client that records per-transaction acceptance latency.

Postfix's smtp-source gives no per-message timing; this client does. Latency is measured from writing
``MAIL FROM`` to reading the reply after the final ``.`` of DATA (the "250 queued" of a durable server).
With ``--pipelining`` (default when the server offers PIPELINING) MAIL, RCPT and DATA go in one write.

    python loadgen.py --port 2525 --messages 5000 --sessions 50 --size 10240 [--starttls] [--reconnect]
    python loadgen.py --port 2525 --idle 1000            # hold N idle sessions after EHLO (see --help)

Prints one JSON object on standard output. Bounded: ``--max-seconds`` ends every run by itself.
Self-contained on purpose (no imports from the harness): it runs as its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import ssl
import sys
import time
from typing import Any


class SmtpError(Exception):
    pass


def make_body(size: int) -> bytes:
    """``size`` bytes of payload in 78-character lines (CRLF), none starting with '.'."""
    line = (b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnopqrstuv")[:76] + b"\r\n"
    n, rest = divmod(size, len(line))
    return line * n + (b"x" * max(0, rest - 2) + b"\r\n" if rest >= 2 else b"")


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.next_index = 0
        self.accepted = 0
        self.rejected = 0
        self.errors = 0
        self.latencies: list[float] = []
        self.setups: list[float] = []  # connect -> EHLO reply (after STARTTLS when used)
        self.body = make_body(args.size)
        self.ctx: ssl.SSLContext | None = None
        if args.starttls:
            # Nothing is verified, so no CA store is loaded: OpenSSL builds the server's chain against a loaded store
            # even with CERT_NONE, and create_default_context()'s system store made each client handshake cost
            # 0.91 ms of CPU instead of 0.57 (bench/RESULTS.md), on the same cores as the system under test.
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            self.ctx.check_hostname = False
            self.ctx.verify_mode = ssl.CERT_NONE
        self.pid = os.getpid()

    def take(self) -> int | None:
        if self.next_index >= self.args.messages:
            return None
        self.next_index += 1
        return self.next_index

    def message(self, n: int) -> bytes:
        head = (
            f"From: <{self.args.sender}>\r\nTo: <{self.args.rcpt}>\r\nSubject: bench {n}\r\n"
            f"Message-ID: <{n}.{self.pid}.{time.time_ns()}@loadgen.bench.test>\r\n"
            f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n\r\n"
        ).encode()
        return head + self.body + b".\r\n"


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, list[bytes]]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by server")
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            try:
                return int(line[:3]), lines
            except ValueError:
                raise SmtpError(f"bad reply {line!r}") from None


async def expect(reader: asyncio.StreamReader, code: int, what: str) -> list[bytes]:
    got, lines = await read_reply(reader)
    if got != code:
        raise SmtpError(f"{what}: expected {code}, got {b''.join(lines)!r}")
    return lines


async def open_session(run: Run) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
    a = run.args
    reader, writer = await asyncio.open_connection(a.host, a.port, limit=1 << 20)
    await expect(reader, 220, "banner")
    writer.write(f"EHLO {a.helo}\r\n".encode())
    caps = await expect(reader, 250, "EHLO")
    if run.ctx is not None:
        if not any(c[4:].upper().startswith(b"STARTTLS") for c in caps):
            raise SmtpError("server does not offer STARTTLS")
        writer.write(b"STARTTLS\r\n")
        await expect(reader, 220, "STARTTLS")
        await writer.start_tls(run.ctx)
        writer.write(f"EHLO {a.helo}\r\n".encode())
        caps = await expect(reader, 250, "EHLO after STARTTLS")
    pipelining = a.pipelining and any(c[4:].upper().startswith(b"PIPELINING") for c in caps)
    return reader, writer, pipelining


async def transaction(run: Run, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pipe: bool, n: int) -> None:
    a = run.args
    mail = f"MAIL FROM:<{a.sender}> SIZE={a.size + 300}\r\n".encode()
    rcpt = f"RCPT TO:<{a.rcpt}>\r\n".encode()
    data = run.message(n)
    t0 = time.perf_counter()
    if pipe:
        writer.write(mail + rcpt + b"DATA\r\n")
        codes = [(await read_reply(reader))[0] for _ in range(3)]
        ok = codes == [250, 250, 354]
    else:
        writer.write(mail)
        ok = (await read_reply(reader))[0] == 250
        if ok:
            writer.write(rcpt)
            ok = (await read_reply(reader))[0] == 250
        if ok:
            writer.write(b"DATA\r\n")
            ok = (await read_reply(reader))[0] == 354
    if not ok:
        run.rejected += 1
        writer.write(b"RSET\r\n")
        await read_reply(reader)
        return
    writer.write(data)
    code, _ = await read_reply(reader)
    t1 = time.perf_counter()
    if 200 <= code < 300:
        run.accepted += 1
        run.latencies.append(t1 - t0)
    else:
        run.rejected += 1


async def session(run: Run) -> None:
    a = run.args
    errors = 0
    while run.next_index < a.messages and errors <= a.max_errors:
        writer = None
        try:
            t_setup = time.perf_counter()
            reader, writer, pipe = await open_session(run)
            run.setups.append(time.perf_counter() - t_setup)
            while True:
                n = run.take()
                if n is None:
                    break
                await transaction(run, reader, writer, pipe, n)
                if a.reconnect:
                    break
            writer.write(b"QUIT\r\n")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(read_reply(reader), 5)
        except (OSError, ConnectionError, SmtpError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            errors += 1
            run.errors += 1
            if a.verbose:
                print(f"session error: {exc!r}", file=sys.stderr)
            await asyncio.sleep(0.05)
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 2)


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


async def load(args: argparse.Namespace) -> dict[str, Any]:
    run = Run(args)
    t_start = time.monotonic()  # CLOCK_MONOTONIC: comparable with the harness's clock
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(session(run)) for _ in range(args.sessions)]
    _done, pending = await asyncio.wait(tasks, timeout=args.max_seconds)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    elapsed = time.perf_counter() - t0
    lat = sorted(run.latencies)
    setups = sorted(run.setups)

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    return {
        "tool": "loadgen",
        "messages": args.messages,
        "accepted": run.accepted,
        "rejected": run.rejected,
        "errors": run.errors,
        "timed_out": bool(pending),
        "elapsed_s": round(elapsed, 4),
        "t_start": t_start,
        "rate": round(run.accepted / elapsed, 2) if elapsed > 0 else None,
        "latency_ms": {
            "p50": ms(percentile(lat, 0.50)),
            "p90": ms(percentile(lat, 0.90)),
            "p99": ms(percentile(lat, 0.99)),
            "max": ms(lat[-1] if lat else None),
            "mean": ms(sum(lat) / len(lat) if lat else None),
        },
        "setup_ms": {"p50": ms(percentile(setups, 0.50)), "p99": ms(percentile(setups, 0.99)), "n": len(setups)},
    }


async def idle(args: argparse.Namespace) -> dict[str, Any]:
    """Open ``--idle`` sessions (EHLO done, STARTTLS too with --starttls), report, hold until stdin closes."""
    run = Run(args)
    sem = asyncio.Semaphore(args.connect_concurrency)
    writers: list[asyncio.StreamWriter] = []
    failed = 0

    async def one() -> None:
        nonlocal failed
        async with sem:
            try:
                _reader, writer, _pipe = await asyncio.wait_for(open_session(run), args.connect_timeout)
                writers.append(writer)
            except (OSError, ConnectionError, SmtpError, ssl.SSLError, TimeoutError):
                failed += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(args.idle)))
    ready = {"ready": len(writers), "failed": failed, "elapsed_s": round(time.perf_counter() - t0, 3)}
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.read), args.max_seconds)
    for w in writers:
        w.transport.abort()
    return {"tool": "loadgen-idle", **ready}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--messages", type=int, default=1000)
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument("--size", type=int, default=10240, help="payload bytes (headers come on top, as smtp-source -l)")
    p.add_argument("--sender", default="loadgen@source.bench.test")
    p.add_argument("--rcpt", default="rcpt@sink.bench.test")
    p.add_argument("--helo", default="loadgen.bench.test")
    p.add_argument("--starttls", action="store_true")
    p.add_argument("--reconnect", action="store_true", help="one message per connection (smtp-source's default)")
    p.add_argument("--no-pipelining", dest="pipelining", action="store_false")
    p.add_argument("--max-errors", type=int, default=20, help="connection errors per session before it gives up")
    p.add_argument("--max-seconds", type=float, default=600.0)
    p.add_argument("--idle", type=int, default=0, help="hold this many idle sessions instead of sending mail")
    p.add_argument("--connect-concurrency", type=int, default=200)
    p.add_argument("--connect-timeout", type=float, default=30.0)
    p.add_argument("--asyncio", action="store_true", help="plain asyncio even when uvloop is installed")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    runner: Any = asyncio.run
    if not args.asyncio:
        with contextlib.suppress(ImportError):
            import uvloop

            runner = uvloop.run
    result = runner(idle(args) if args.idle else load(args))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
