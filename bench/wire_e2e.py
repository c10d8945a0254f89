"""End-to-end check of the receive path's cost per message: a real gateway (mxgate.testing.gateway, queue on disk)
and one raw client in the same process, pipelining N transactions on one connection; reports wall time and the
process's CPU time per message (server and client together). Compare two trees by running this script with each
on ``PYTHONPATH`` (e.g. ``git archive <commit> mxgate | tar -x -C /tmp/base``). Not a test; not ``make bench``::

    .venv/bin/python bench/wire_e2e.py [--messages 3000] [--size 10240] [--window 50]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import tempfile
import time
from pathlib import Path

from mxgate.testing.gateway import running_gateway


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config() -> str:
    return f"""
        [server]
        accepted_domains = ["example.org"]
        max_message_size = 10485760
        [[listener]]
        name = "smtp"
        address = "127.0.0.1:{free_port()}"
        [[outbound_connector]]
        name = "inside"
        recipient_domains = ["example.org"]
        smart_hosts = ["127.0.0.1:{free_port()}"]
        tls = "none"
        retry_first = 3600.0
    """


async def run(messages: int, size: int, window: int) -> tuple[float, float]:
    body = (b"Lorem ipsum dolor sit amet, consectetur adipiscing elit.\r\n" * (size // 58 + 1))[:size]
    body = body[: body.rfind(b"\r\n") + 2]
    tx = (
        b"MAIL FROM:<a@example.net>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n"
        + b"From: a@example.net\r\nSubject: bench\r\n\r\n"
        + body
        + b".\r\n"
    )
    with tempfile.TemporaryDirectory(prefix="mxgate-wire-e2e-") as d:
        async with running_gateway(config(), Path(d)) as gw:
            reader, writer = await asyncio.open_connection(gw.smtp_host, gw.smtp_port)
            await reader.readline()
            writer.write(b"EHLO c.example\r\n")
            while not (await reader.readline()).startswith(b"250 "):
                pass
            wall, cpu = time.perf_counter(), time.process_time()
            sent = done = 0
            while done < messages:
                while sent < messages and sent - done < window:  # pipelined: a window of transactions in flight
                    writer.write(tx)
                    sent += 1
                await writer.drain()
                for _ in range(4):  # MAIL, RCPT, DATA (354), end of data
                    line = await reader.readline()
                    assert line[:1] in (b"2", b"3"), line
                done += 1
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            writer.write(b"QUIT\r\n")
            await reader.readline()
            writer.close()
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--size", type=int, default=10240)
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    runs = [asyncio.run(run(args.messages, args.size, args.window)) for _ in range(args.repeat)]
    for wall, cpu in runs:
        print(
            f"{args.messages} x {args.size} octets: {args.messages / wall:7.0f} msg/s wall, "
            f"{cpu / args.messages * 1e6:7.1f} us CPU/msg"
        )
    print(f"best CPU/msg: {min(c for _, c in runs) / args.messages * 1e6:.1f} us")


if __name__ == "__main__":
    main()
